"""PreserveCheckpointFunction and spotrun.attempts.preserve_checkpoint."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spotrun.jobs import JobStore
from spotrun.status import JobStatus
from tests.control.conftest import BUCKET_NAME, load_handler
from tests.control.function_helpers import (
    JOB_ID,
    create_job,
    job_volume,
    sample,
    start_attempt,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:No application metrics"),
    pytest.mark.usefixtures("shared_service_models"),
]


def running_attempt(store: JobStore, ec2: Any, subnets: list[str]) -> dict[str, str]:
    """A running first attempt in us-east-1a with its checkpoint volume."""
    instance_id = start_attempt(store, ec2, subnets[0])
    return {"instance_id": instance_id, "volume_id": job_volume(ec2, "us-east-1a", "checkpoint")}


def event_for(case: str, attempt: dict[str, str]) -> dict[str, Any]:
    event = sample("preserve_checkpoint", case, instance_id=attempt["instance_id"])
    event["volumes"][0]["volume_id"] = attempt["volume_id"]
    return event


def test_preserve_checkpoint_snapshots_when_the_next_zone_may_differ(
    execution_env: dict,
    store: JobStore,
    ec2: Any,
    lambda_context: Any,
    subnets: list[str],
) -> None:
    # GIVEN a job over two AZs (the default subnets) interrupted at step 120
    create_job(store)
    attempt = running_attempt(store, ec2, subnets)
    result = load_handler("preserve_checkpoint").lambda_handler(
        event_for("spot_interrupted", attempt), lambda_context
    )
    # THEN the checkpoint volume is snapshotted, not kept
    assert result == {"outcome": "interrupted", "checkpoint_step": 120, "keep_volume_ids": []}
    record = store.get(JOB_ID)
    assert record.status is JobStatus.INTERRUPTED and record.interruptions == 1
    assert record.task_token is None
    snapshot = ec2.describe_snapshots(SnapshotIds=[record.checkpoint["snapshot_id"]])
    found = {t["Key"]: t["Value"] for t in snapshot["Snapshots"][0]["Tags"]}
    assert found["spotrun:role"] == "checkpoint" and found["spotrun:checkpoint-step"] == "120"
    assert record.checkpoint["step"] == 120 and record.checkpoint["volume_id"] is None


def test_preserve_checkpoint_keeps_the_volume_in_a_single_zone(
    execution_env: dict,
    store: JobStore,
    ec2: Any,
    subnets: list[str],
    lambda_context: Any,
) -> None:
    create_job(store, subnets=[subnets[0]])
    attempt = running_attempt(store, ec2, subnets)
    result = load_handler("preserve_checkpoint").lambda_handler(
        event_for("spot_interrupted", attempt), lambda_context
    )
    assert result["keep_volume_ids"] == [attempt["volume_id"]]
    checkpoint = store.get(JOB_ID).checkpoint
    assert checkpoint["volume_id"] == attempt["volume_id"]
    assert checkpoint["availability_zone"] == "us-east-1a"
    assert checkpoint["snapshot_id"] is None


def test_preserve_checkpoint_counts_a_trainer_error_as_a_restart(
    execution_env: dict, store: JobStore, ec2: Any, lambda_context: Any, subnets: list[str]
) -> None:
    create_job(store)
    attempt = running_attempt(store, ec2, subnets)
    result = load_handler("preserve_checkpoint").lambda_handler(
        event_for("trainer_failed", attempt), lambda_context
    )
    assert result["outcome"] == "trainer-failed" and result["checkpoint_step"] == 80
    record = store.get(JOB_ID)
    assert record.restarts_on_error == 1 and record.interruptions == 0
    assert record.attempts[0]["error"].startswith("Trainer.Failed: RuntimeError: CUDA error")


def test_preserve_checkpoint_reads_the_mirror_when_the_trainer_said_nothing(
    execution_env: dict,
    store: JobStore,
    ec2: Any,
    s3: Any,
    lambda_context: Any,
    subnets: list[str],
) -> None:
    # GIVEN a heartbeat timeout, and the trainer's S3 mirror pointing at step 60
    create_job(store)
    attempt = running_attempt(store, ec2, subnets)
    s3.put_object(
        Bucket=BUCKET_NAME,
        Key=f"checkpoints/{JOB_ID}/LATEST",
        Body=json.dumps({"manifest": "manifests/000000000060.json", "step": 60}),
    )
    result = load_handler("preserve_checkpoint").lambda_handler(
        event_for("heartbeat_timeout", attempt), lambda_context
    )
    assert result["outcome"] == "interrupted" and result["checkpoint_step"] == 60


def test_preserve_checkpoint_never_moves_the_step_back(
    execution_env: dict, store: JobStore, ec2: Any, lambda_context: Any, subnets: list[str]
) -> None:
    create_job(store)
    attempt = running_attempt(store, ec2, subnets)
    store.commit_checkpoint(JOB_ID, {"step": 500})
    result = load_handler("preserve_checkpoint").lambda_handler(
        event_for("spot_interrupted", attempt), lambda_context
    )
    assert result["checkpoint_step"] == 500
    assert store.get(JOB_ID).checkpoint["step"] == 500


@pytest.mark.parametrize(("cost_cap_usd", "outcome"), [(None, "interrupted"), (0.01, "timed-out")])
def test_preserve_checkpoint_run_timeout_counts_the_running_attempts_cost(
    execution_env: dict,
    store: JobStore,
    ec2: Any,
    lambda_context: Any,
    subnets: list[str],
    cost_cap_usd: float | None,
    outcome: str,
) -> None:
    # GIVEN an attempt running since 09:00 at $0.50/h, not yet on the cost ledger
    create_job(store, cost_cap_usd=cost_cap_usd)
    attempt = running_attempt(store, ec2, subnets)
    assert store.get(JOB_ID).cost_usd == 0
    # WHEN Run Trainer times out (States.Timeout: moto's heartbeat timeout, or the
    # TimeoutSecondsPath set from the cost cap)
    event = event_for("heartbeat_timeout", attempt)
    event["failure"] = {"Error": "States.Timeout", "Cause": None}
    result = load_handler("preserve_checkpoint").lambda_handler(event, lambda_context)
    # THEN with a cap that the running attempt has spent, it is the cap, not a loss
    assert result["outcome"] == outcome
    assert store.get(JOB_ID).interruptions == (1 if outcome == "interrupted" else 0)
