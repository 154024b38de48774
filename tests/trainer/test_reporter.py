"""ControlReporter against moto Step Functions with real task tokens."""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from spotrun_trainer.errors import ReportError
from spotrun_trainer.reporter import ControlReporter


def _reporter(endpoint: str, token: str, **kwargs: Any) -> ControlReporter:
    client = boto3.client("stepfunctions", region_name="us-east-1", endpoint_url=endpoint)
    return ControlReporter(token, client=client, **kwargs)


def test_reporter_success_closes_the_task_with_the_contract_output(moto_server, sfn_tasks):
    # GIVEN a task waiting for its token
    task = sfn_tasks.start()
    reporter = _reporter(moto_server, task.token)
    # WHEN the trainer reports success
    delivered = reporter.succeed(200, "s3://b/models/j/model.pt", {"loss": 1.5}, 200)
    # THEN the execution succeeds with the contract's output
    result = task.result()
    assert delivered
    assert result["status"] == "SUCCEEDED"
    assert json.loads(result["output"]) == {
        "final_step": 200,
        "model_uri": "s3://b/models/j/model.pt",
        "metrics": {"loss": 1.5},
        "checkpoint_step": 200,
    }


def test_reporter_interrupted_sends_spot_interrupted_with_the_step(moto_server, sfn_tasks):
    task = sfn_tasks.start()
    reporter = _reporter(moto_server, task.token)
    reporter.interrupted(57, "volume", "instance-action", 0.4)
    result = task.result()
    assert result["status"] == "FAILED"
    assert result["error"] == "Spot.Interrupted"
    assert json.loads(result["cause"]) == {
        "checkpoint_step": 57,
        "checkpoint_location": "volume",
        "notice": "instance-action",
        "time_to_safe_seconds": 0.4,
    }


def test_reporter_failed_sends_trainer_failed_with_the_error(moto_server, sfn_tasks):
    task = sfn_tasks.start()
    reporter = _reporter(moto_server, task.token)
    reporter.failed("ValueError: boom", None)
    result = task.result()
    assert result["error"] == "Trainer.Failed"
    assert json.loads(result["cause"]) == {"error": "ValueError: boom", "checkpoint_step": None}


def test_reporter_repeated_report_is_harmless(moto_server, sfn_tasks):
    # GIVEN a task already closed by a report
    task = sfn_tasks.start()
    first = _reporter(moto_server, task.token)
    first.interrupted(10, "volume", "sigterm", 0.1)
    # WHEN the same reporter reports again, and another process reports once more
    again = first.interrupted(10, "volume", "sigterm", 0.1)
    other = _reporter(moto_server, task.token)
    other.failed("late failure", 10)  # moto accepts it; AWS answers TaskTimedOut
    # THEN nothing is raised, nothing is sent twice, and the first outcome stands
    assert again is False
    assert first.heartbeat() is False
    result = task.result()
    assert result["error"] == "Spot.Interrupted"
    assert json.loads(result["cause"])["checkpoint_step"] == 10


@pytest.mark.parametrize("code", ["TaskTimedOut", "InvalidToken", "TaskDoesNotExist"])
def test_reporter_closed_task_is_logged_not_raised(code):
    # GIVEN Step Functions says the task is closed (what AWS answers a repeat report)
    client = _FlakyClient([_client_error(code)])
    reporter = ControlReporter("token", client=client, sleep=lambda s: None)
    # WHEN the trainer reports
    delivered = reporter.failed("boom", 3)
    # THEN it is not retried, not raised, and heartbeats stop
    assert delivered is False
    assert reporter.task_closed
    assert len(client.calls) == 1
    assert reporter.heartbeat() is False


def test_reporter_heartbeat_keeps_the_task_alive(moto_server, sfn_tasks):
    # GIVEN a task whose heartbeat timeout is 3 s, and heartbeats ten times as often
    task = sfn_tasks.start(heartbeat_seconds=3)
    reporter = _reporter(moto_server, task.token, heartbeat_seconds=0.3)
    reporter.start_heartbeat()
    # WHEN more than the heartbeat timeout passes
    time.sleep(4.5)
    status = task.sfn.describe_execution(executionArn=task.execution_arn)["status"]
    reporter.succeed(1, "s3://b/m.pt", {}, 1)
    reporter.stop_heartbeat()
    # THEN the task was still waiting, and then succeeded
    assert status == "RUNNING"
    assert reporter.heartbeats_sent >= 5
    assert task.result()["status"] == "SUCCEEDED"


class _FlakyClient:
    """Fails the first calls the way throttling and a dropped network do."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls: list[dict[str, Any]] = []

    def send_task_failure(self, **params: Any) -> dict[str, Any]:
        self.calls.append(params)
        if self.failures:
            raise self.failures.pop(0)
        return {}


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "SendTaskFailure")


def test_reporter_retries_throttling_and_network_errors():
    client = _FlakyClient(
        [_client_error("ThrottlingException"), EndpointConnectionError(endpoint_url="x")]
    )
    reporter = ControlReporter("token", client=client, sleep=lambda s: None)
    assert reporter.failed("boom", 3)
    assert len(client.calls) == 3


def test_reporter_gives_up_on_a_permanent_error():
    client = _FlakyClient([_client_error("AccessDeniedException")])
    reporter = ControlReporter("token", client=client, sleep=lambda s: None)
    with pytest.raises(ReportError, match="AccessDenied"):
        reporter.failed("boom", 3)
    assert len(client.calls) == 1


def test_reporter_without_a_token_sends_nothing():
    reporter = ControlReporter(None)
    assert reporter.failed("boom", None) is False
    assert reporter.heartbeat() is False
