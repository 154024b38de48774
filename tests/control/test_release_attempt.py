"""ReleaseAttemptFunction and spotrun.attempts.release_attempt (and spotrun.budget)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spotrun import budget
from spotrun.jobs import JobStore
from spotrun.spec import JobSpec
from spotrun.status import JobStatus
from tests.control.conftest import load_handler
from tests.control.function_helpers import (
    JOB_ID,
    create_job,
    job_volume,
    launch,
    open_attempt,
    sample,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:No application metrics"),
    pytest.mark.usefixtures("shared_service_models"),
]


@pytest.fixture
def attempt(store: JobStore, ec2: Any, subnets: list[str]) -> dict[str, str]:
    create_job(store)
    instance_id = launch(ec2, subnets[0])
    open_attempt(store, instance_id, subnet_id=subnets[0], zone="us-east-1a")
    ids = {"instance_id": instance_id}
    for role in ("checkpoint", "data"):
        ids[role] = job_volume(ec2, "us-east-1a", role)
        ec2.attach_volume(
            VolumeId=ids[role],
            InstanceId=instance_id,
            Device="/dev/sdf" if role == "checkpoint" else "/dev/sdg",
        )
    return ids


def state_of(ec2: Any, instance_id: str) -> str:
    reservation = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    return reservation["Instances"][0]["State"]["Name"]


def volume_ids(ec2: Any) -> set[str]:
    found = ec2.describe_volumes(Filters=[{"Name": "tag:spotrun:job-id", "Values": [JOB_ID]}])
    return {volume["VolumeId"] for volume in found["Volumes"]}


def test_release_attempt_after_interruption_keeps_only_the_checkpoint_volume(
    execution_env: dict, store: JobStore, ec2: Any, lambda_context: Any, attempt: dict
) -> None:
    store.update(JOB_ID, add={"interruptions": 1})
    event = sample(
        "release_attempt",
        "after_interruption",
        instance_id=attempt["instance_id"],
        keep_volume_ids=[attempt["checkpoint"]],
    )
    result = load_handler("release_attempt").lambda_handler(event, lambda_context)

    assert result == {"relaunch": True, "reason": None}
    assert state_of(ec2, attempt["instance_id"]) == "terminated"
    assert volume_ids(ec2) == {attempt["checkpoint"]}
    kept = ec2.describe_volumes(VolumeIds=[attempt["checkpoint"]])["Volumes"][0]
    assert kept["State"] == "available" and kept["Attachments"] == []
    record = store.get(JOB_ID)
    assert record.status is JobStatus.RECOVERING
    assert record.current_instance_id is None
    closed = record.attempts[0]
    assert closed["outcome"] == "interrupted" and closed["ended_at"]
    assert closed["cost_usd"] > 0  # an hour and more at $0.50
    assert record.cost_ledger[0]["attempt"] == 1
    assert record.cost_usd == pytest.approx(closed["cost_usd"])


def test_release_attempt_twice_is_harmless(
    execution_env: dict, store: JobStore, ec2: Any, lambda_context: Any, attempt: dict
) -> None:
    event = sample("release_attempt", "after_interruption", instance_id=attempt["instance_id"])
    handler = load_handler("release_attempt")
    handler.lambda_handler(event, lambda_context)
    handler.lambda_handler(event, lambda_context)
    assert len(store.get(JOB_ID).cost_ledger) == 1


def test_release_attempt_after_failure_releases_everything(
    execution_env: dict, store: JobStore, ec2: Any, lambda_context: Any, attempt: dict
) -> None:
    result = load_handler("release_attempt").lambda_handler(
        sample("release_attempt", "after_failure"), lambda_context
    )
    assert result == {"relaunch": False, "reason": None}
    assert state_of(ec2, attempt["instance_id"]) == "terminated"
    assert volume_ids(ec2) == set()
    assert store.get(JOB_ID).attempts[0]["outcome"] == "failed"


def test_release_attempt_budget_exhausted_says_why(
    execution_env: dict, store: JobStore, lambda_context: Any, attempt: dict
) -> None:
    store.update(JOB_ID, add={"interruptions": 11})
    result = load_handler("release_attempt").lambda_handler(
        sample("release_attempt", "after_interruption", instance_id=attempt["instance_id"]),
        lambda_context,
    )
    assert result == {
        "relaunch": False,
        "reason": "interrupted 11 times; max_interruptions is 10",
    }


def test_budget_run_timeout_follows_deadline_and_cost_cap(
    store: JobStore, control_env: dict
) -> None:
    now = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
    record = create_job(store, cost_cap_usd=2.0)
    record.cost_usd = 1.0
    spec = JobSpec.model_validate(
        {**record.spec, "deadline": (now + timedelta(hours=3)).isoformat()}
    )
    # $1 left at $0.50/h is 2 h, before the 3 h deadline
    assert (
        budget.run_timeout_seconds(record, spec, 0.5, now=now, heartbeat_timeout_seconds=300)
        == 7200
    )
    # never below the heartbeat timeout (Step Functions requires it above)
    assert (
        budget.run_timeout_seconds(record, spec, 1000.0, now=now, heartbeat_timeout_seconds=300)
        == 301
    )
