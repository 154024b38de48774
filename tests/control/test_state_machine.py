"""Every path of the training-job state machine, run for real on moto's interpreter.

The ASL is the file in ``statemachine/`` substituted from ``template.yaml``; the
tasks are the real handlers; the trainer is a thread answering through the task
token in the ticket. After each path the record is terminal and right, and
nothing of the job is left running.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spotrun.status import JobStatus
from tests.control.statemachine_harness import (
    Cloud,
    FakeTrainer,
    cloud_session,
    fail,
    interrupt,
    lose,
    silent,
    succeed,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:No application metrics"),
    pytest.mark.usefixtures("shared_service_models"),
]


@pytest.fixture(scope="module")
def deployment() -> Iterator[Cloud]:
    yield from cloud_session()


@pytest.fixture
def cloud(deployment: Cloud) -> Cloud:
    deployment.reset()
    return deployment


def run(
    cloud: Cloud,
    job_id: str,
    acts: list[Any],
    *,
    heartbeat_timeout_seconds: int | None = None,
    timeout: float = 30.0,
) -> tuple[dict[str, Any], FakeTrainer]:
    trainer = FakeTrainer(cloud, job_id, acts)
    trainer.start()
    try:
        arn = cloud.start(job_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
        execution = cloud.wait(arn, timeout=timeout)
    except AssertionError as timed_out:
        states = cloud.entered_states(arn)
        raise AssertionError(f"{timed_out}; states {states}; trainer {trainer.errors}") from None
    finally:
        trainer.stop()
    assert not trainer.errors, trainer.errors
    return execution, trainer


def assert_nothing_left(cloud: Cloud, job_id: str) -> None:
    assert cloud.leftovers(job_id) == {"instances": [], "volumes": []}


# -- 1. success ---------------------------------------------------------------


def test_state_machine_success_records_model_cost_and_notifies(cloud: Cloud) -> None:
    # GIVEN a job with a dataset snapshot
    snapshot = cloud.ec2.create_snapshot(
        VolumeId=cloud.ec2.create_volume(AvailabilityZone="us-east-1a", Size=10)["VolumeId"]
    )["SnapshotId"]
    job_id = cloud.create_job(dataset={"snapshot_id": snapshot})

    # WHEN the trainer succeeds on the first attempt
    execution, trainer = run(cloud, job_id, [succeed(200)])

    # THEN the execution succeeds and the record holds the outcome
    assert execution["status"] == "SUCCEEDED"
    record = cloud.store.get(job_id)
    assert record.status is JobStatus.SUCCEEDED
    assert record.model_uri == f"s3://{cloud.bucket}/models/{job_id}/model.pt"
    assert record.metrics == {"loss": 1.25}
    assert record.checkpoint["step"] == 200
    assert len(record.attempts) == 1 and record.attempts[0]["outcome"] == "succeeded"
    assert len(record.cost_ledger) == 1 and record.cost_usd >= 0
    assert record.task_token is None and record.current_instance_id is None
    # the ticket followed the contract
    (ticket,) = trainer.tickets
    assert ticket["ticket_version"] == 1 and ticket["job_id"] == job_id
    assert ticket["resume"] == {"enabled": False, "checkpoint_step": None}
    assert [v["role"] for v in ticket["volumes"]] == ["checkpoint", "data"]
    assert ticket["dataset"] == {"mount_point": "/mnt/spotrun/data"}
    assert ticket["heartbeat_seconds"] == 100
    # one notification, and nothing left
    (message,) = cloud.notifications(job_id)
    assert message["status"] == "SUCCEEDED" and message["job_id"] == job_id
    assert_nothing_left(cloud, job_id)


def test_state_machine_transitions_do_not_grow_with_training_time(cloud: Cloud) -> None:
    # GIVEN two jobs, one trainer answering at once, one after a while
    quick, slow = cloud.create_job("quick"), cloud.create_job("slow")
    first, _ = run(cloud, quick, [succeed()])
    slow_trainer = [succeed()]
    slow_trainer[0].delay = 1.0
    second, _ = run(cloud, slow, slow_trainer)
    # THEN both take the same states: no polling loop while the trainer runs
    assert cloud.entered_states(first["executionArn"]) == cloud.entered_states(
        second["executionArn"]
    )


# -- 2. interruption ------------------------------------------------------------


def test_state_machine_spot_interruption_snapshots_and_resumes(cloud: Cloud) -> None:
    # GIVEN a job whose subnets span two AZs
    job_id = cloud.create_job()

    # WHEN the first attempt is interrupted after committing step 120
    execution, trainer = run(cloud, job_id, [interrupt(120), succeed(200)])

    # THEN the second attempt resumes from 120 on a volume restored from a snapshot
    assert execution["status"] == "SUCCEEDED"
    first, second = trainer.tickets
    assert first["resume"]["enabled"] is False
    assert second["resume"] == {"enabled": True, "checkpoint_step": 120}
    assert second["attempt"] == 2
    record = cloud.store.get(job_id)
    assert record.status is JobStatus.SUCCEEDED
    assert record.interruptions == 1 and record.restarts_on_error == 0
    assert [a["outcome"] for a in record.attempts] == ["interrupted", "succeeded"]
    snapshots = cloud.ec2.describe_snapshots(
        Filters=[{"Name": "tag:spotrun:job-id", "Values": [job_id]}]
    )["Snapshots"]
    assert len(snapshots) == 1  # kept per retention; the volumes are gone
    assert first["volumes"][0]["volume_id"] != second["volumes"][0]["volume_id"]
    assert_nothing_left(cloud, job_id)


def test_state_machine_single_zone_reuses_checkpoint_volume(cloud: Cloud) -> None:
    # GIVEN a job whose only subnet is in one AZ
    job_id = cloud.create_job(subnets=[cloud.subnets[2]])

    # WHEN it is interrupted once
    execution, trainer = run(cloud, job_id, [interrupt(40), succeed(80)])

    # THEN the same checkpoint volume crosses to the next attempt, no snapshot taken
    assert execution["status"] == "SUCCEEDED"
    first, second = trainer.tickets
    assert first["volumes"][0]["volume_id"] == second["volumes"][0]["volume_id"]
    assert first["instance_id"] != second["instance_id"]
    snapshots = cloud.ec2.describe_snapshots(
        Filters=[{"Name": "tag:spotrun:job-id", "Values": [job_id]}]
    )["Snapshots"]
    assert snapshots == []
    assert_nothing_left(cloud, job_id)


def test_state_machine_checkpoint_step_never_goes_backwards(cloud: Cloud) -> None:
    # GIVEN a trainer whose second report names an older step than the first
    job_id = cloud.create_job()
    execution, trainer = run(cloud, job_id, [interrupt(120), interrupt(100), succeed(130)])

    # THEN the third attempt resumes from 120, the newest committed step
    assert execution["status"] == "SUCCEEDED"
    assert trainer.tickets[2]["resume"]["checkpoint_step"] == 120
    record = cloud.store.get(job_id)
    assert record.interruptions == 2 and len(record.attempts) == 3
    assert_nothing_left(cloud, job_id)


def test_state_machine_instance_lost_relaunches(cloud: Cloud) -> None:
    # GIVEN a first attempt whose instance vanishes without the trainer reporting
    job_id = cloud.create_job()
    execution, _trainer = run(cloud, job_id, [lose(), succeed()])

    # THEN HandleInstanceStateFunction failed the task with Instance.Lost and it relaunched
    assert execution["status"] == "SUCCEEDED"
    record = cloud.store.get(job_id)
    assert record.interruptions == 1
    assert record.attempts[0]["error"].startswith("Instance.Lost")
    assert any(n["kind"] == "state-change" for n in record.notices)
    assert_nothing_left(cloud, job_id)


def test_state_machine_heartbeat_timeout_relaunches(cloud: Cloud) -> None:
    # GIVEN a trainer that never reports on the first attempt (1 s heartbeat timeout)
    job_id = cloud.create_job()
    execution, _ = run(cloud, job_id, [silent(), succeed()], heartbeat_timeout_seconds=1)

    # THEN the timeout (States.Timeout on moto) counts as an interruption
    assert execution["status"] == "SUCCEEDED"
    record = cloud.store.get(job_id)
    assert record.interruptions == 1
    assert record.attempts[0]["outcome"] == "interrupted"
    assert_nothing_left(cloud, job_id)


# -- 3. no capacity ---------------------------------------------------------------


def test_state_machine_refused_pool_moves_to_another(cloud: Cloud) -> None:
    # GIVEN no spot capacity in the first subnet
    cloud.refuse_capacity(subnets=[cloud.subnets[0]], types=None)
    job_id = cloud.create_job()

    # WHEN the job runs
    execution, _trainer = run(cloud, job_id, [succeed()])

    # THEN it landed in the other subnet at once, with no backoff
    assert execution["status"] == "SUCCEEDED"
    record = cloud.store.get(job_id)
    assert record.attempts[0]["subnet_id"] == cloud.subnets[1]
    assert record.capacity_failures == 0
    assert "Wait For Capacity" not in cloud.entered_states(execution["executionArn"])
    assert_nothing_left(cloud, job_id)


def test_state_machine_refused_instance_type_uses_the_next_type(cloud: Cloud) -> None:
    # GIVEN g5.xlarge refused everywhere
    cloud.refuse_capacity(types=["g5.xlarge"])
    job_id = cloud.create_job()
    execution, _ = run(cloud, job_id, [succeed()])
    assert execution["status"] == "SUCCEEDED"
    record = cloud.store.get(job_id)
    assert record.status is JobStatus.SUCCEEDED
    assert record.attempts[0]["instance_type"] == "g6.xlarge"
    assert_nothing_left(cloud, job_id)


def test_state_machine_no_spot_anywhere_falls_back_to_on_demand(cloud: Cloud) -> None:
    # GIVEN no spot capacity in any pool, and a spec that allows on-demand
    cloud.refuse_capacity(types=None)
    job_id = cloud.create_job(on_demand_fallback=True)

    execution, _ = run(cloud, job_id, [succeed()])

    # THEN it backed off, then launched on-demand
    assert execution["status"] == "SUCCEEDED"
    record = cloud.store.get(job_id)
    assert record.attempts[0]["market"] == "on-demand"
    assert record.capacity_failures == 4
    states = cloud.entered_states(execution["executionArn"])
    assert states.count("Wait For Capacity") == 4
    assert_nothing_left(cloud, job_id)


def test_state_machine_no_capacity_without_fallback_fails(cloud: Cloud) -> None:
    cloud.refuse_capacity(types=None)
    job_id = cloud.create_job()

    execution, trainer = run(cloud, job_id, [])

    assert execution["status"] == "FAILED"
    record = cloud.store.get(job_id)
    assert record.status is JobStatus.FAILED
    assert record.reason.startswith("Capacity.Unavailable: no spot capacity")
    assert "on_demand_fallback is off" in record.reason
    assert trainer.tickets == [] and record.attempts == []
    (message,) = cloud.notifications(job_id)
    assert message["status"] == "FAILED"
    assert_nothing_left(cloud, job_id)


# -- 4. trainer errors ----------------------------------------------------------


def test_state_machine_trainer_error_restarts_then_succeeds(cloud: Cloud) -> None:
    job_id = cloud.create_job(max_restarts_on_error=1, max_interruptions=0)
    execution, trainer = run(cloud, job_id, [fail("CUDA error", step=10), succeed()])

    assert execution["status"] == "SUCCEEDED"
    record = cloud.store.get(job_id)
    assert record.restarts_on_error == 1 and record.interruptions == 0
    assert trainer.tickets[1]["resume"] == {"enabled": True, "checkpoint_step": 10}
    assert_nothing_left(cloud, job_id)


def test_state_machine_trainer_errors_beyond_budget_fail(cloud: Cloud) -> None:
    job_id = cloud.create_job(max_restarts_on_error=1)
    execution, _ = run(cloud, job_id, [fail("loss is NaN"), fail("loss is NaN")])

    assert execution["status"] == "FAILED"
    record = cloud.store.get(job_id)
    assert record.status is JobStatus.FAILED
    assert "trainer failed 2 times" in record.reason
    assert "loss is NaN" in record.reason
    assert_nothing_left(cloud, job_id)


# -- 5. budget ----------------------------------------------------------------


def test_state_machine_max_interruptions_fails(cloud: Cloud) -> None:
    job_id = cloud.create_job(max_interruptions=1)
    execution, trainer = run(cloud, job_id, [interrupt(10), interrupt(20)])

    assert execution["status"] == "FAILED"
    record = cloud.store.get(job_id)
    assert record.status is JobStatus.FAILED
    assert record.reason == "Budget.Exhausted: interrupted 2 times; max_interruptions is 1"
    assert record.checkpoint["step"] == 20
    assert len(trainer.tickets) == 2
    assert_nothing_left(cloud, job_id)


def test_state_machine_deadline_fails(cloud: Cloud) -> None:
    # GIVEN a deadline that passes while the first attempt trains
    deadline = datetime.now(UTC) + timedelta(seconds=1)
    job_id = cloud.create_job(deadline=deadline.isoformat())
    late = interrupt(30)
    late.delay = 1.2

    execution, _ = run(cloud, job_id, [late])

    assert execution["status"] == "FAILED"
    record = cloud.store.get(job_id)
    assert record.status is JobStatus.FAILED
    assert record.reason.startswith("Budget.Exhausted: deadline")
    assert_nothing_left(cloud, job_id)


def test_state_machine_cost_cap_fails(cloud: Cloud) -> None:
    # GIVEN a job that has spent its cap already (earlier attempts on the ledger)
    job_id = cloud.create_job(cost_cap_usd=0.5)
    cloud.store.update(job_id, add={"cost_usd": 0.75})

    execution, _ = run(cloud, job_id, [interrupt(5)])

    assert execution["status"] == "FAILED"
    record = cloud.store.get(job_id)
    assert record.status is JobStatus.FAILED
    assert record.reason.startswith("Budget.Exhausted: cost cap $0.50 reached")
    assert_nothing_left(cloud, job_id)


# -- unexpected failures ------------------------------------------------------


def test_state_machine_unexpected_task_error_cleans_up(cloud: Cloud) -> None:
    # GIVEN a dataset snapshot that does not exist: Prepare Volumes fails after the launch
    job_id = cloud.create_job(dataset={"snapshot_id": "snap-0123456789abcdef0"})

    execution, _ = run(cloud, job_id, [])

    assert execution["status"] == "FAILED"
    record = cloud.store.get(job_id)
    assert record.status is JobStatus.FAILED
    assert record.attempts[0]["outcome"] == "failed"
    states = cloud.entered_states(execution["executionArn"])
    assert states[-3:] == ["Release After Failure", "Finalize Failed Job", "Job Failed"]
    assert_nothing_left(cloud, job_id)


# -- 6. cancel ----------------------------------------------------------------


def test_state_machine_cancel_releases_everything(cloud: Cloud) -> None:
    from tests.control.conftest import FUNCTIONS

    if not (FUNCTIONS / "handle_execution_ended" / "app.py").exists():
        pytest.skip("handle_execution_ended is not there yet")
    job_id = cloud.create_job()
    cancelled: dict[str, Any] = {}

    def cancel(ticket: dict[str, Any]) -> None:
        # WHEN the user cancels while the trainer runs (DELETE /jobs/{id})
        response = cloud.invoke("JobsApiFunction", api_delete_event(job_id))
        cancelled["response"] = response

    trainer = FakeTrainer(cloud, job_id, [silent()], on_ticket=cancel)
    trainer.start()
    try:
        # moto stops an execution only when its waiting task returns (AWS stops it at
        # once); a 1 s heartbeat timeout makes that return quickly.
        arn = cloud.start(job_id, heartbeat_timeout_seconds=1)
        execution = cloud.wait(arn, timeout=10)
    finally:
        trainer.stop()
    assert not trainer.errors, trainer.errors
    # moto ends a stopped execution as FAILED when its waiting task returns; AWS
    # reports ABORTED at once. Either way no state ran after Run Trainer.
    assert execution["status"] in ("ABORTED", "FAILED")
    assert cloud.entered_states(arn)[-1] == "Run Trainer"
    assert cancelled["response"]["statusCode"] == 202

    # AND EventBridge delivers the status change as AWS sends it (moto does not route
    # it to Lambda)
    cloud.invoke(
        "HandleExecutionEndedFunction", execution_status_event({**execution, "status": "ABORTED"})
    )

    record = cloud.store.get(job_id)
    assert record.status is JobStatus.CANCELLED
    assert_nothing_left(cloud, job_id)


def api_delete_event(job_id: str) -> dict[str, Any]:
    return {
        "resource": "/jobs/{job_id}",
        "path": f"/jobs/{job_id}",
        "httpMethod": "DELETE",
        "headers": {"Content-Type": "application/json"},
        "multiValueHeaders": {},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"job_id": job_id},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/jobs/{job_id}",
            "httpMethod": "DELETE",
            "path": f"/v1/jobs/{job_id}",
            "stage": "v1",
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "identity": {"userArn": "arn:aws:iam::123456789012:user/test", "sourceIp": "127.0.0.1"},
        },
        "body": None,
        "isBase64Encoded": False,
    }


def execution_status_event(execution: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "0",
        "id": "315c1398-40ff-a850-213b-158f73e60175",
        "detail-type": "Step Functions Execution Status Change",
        "source": "aws.states",
        "account": "123456789012",
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "us-east-1",
        "resources": [execution["executionArn"]],
        "detail": {
            "executionArn": execution["executionArn"],
            "stateMachineArn": execution["stateMachineArn"],
            "name": execution["name"],
            "status": execution["status"],
            "startDate": 1_764_835_200_000,
            "stopDate": 1_764_835_260_000,
            "input": json.dumps({"job_id": execution["name"]}),
            "output": None,
        },
    }
