"""HandleInstanceStateFunction: an instance of a running attempt that goes away fails its task."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.stub import Stubber

from spotrun import aws
from spotrun.jobs import JobStore
from tests.control.conftest import load_handler
from tests.control.function_helpers import (
    JOB_ID,
    create_job,
    launch,
    open_attempt,
    sample,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:No application metrics"),
    pytest.mark.usefixtures("shared_service_models"),
]


def state_event(instance_id: str, state: str = "terminated") -> dict[str, Any]:
    event = sample("handle_instance_state", "terminated")
    event["detail"] = {"instance-id": instance_id, "state": state}
    return event


@pytest.fixture
def running(store: JobStore, ec2: Any, subnets: list[str]) -> str:
    create_job(store)
    instance_id = launch(ec2, subnets[0])
    open_attempt(store, instance_id, subnet_id=subnets[0], zone="us-east-1a")
    store.update(JOB_ID, set={"task_token": "token-1"})
    return instance_id


def test_handle_instance_state_terminated_fails_the_open_task(
    execution_env: dict, store: JobStore, lambda_context: Any, running: str
) -> None:
    handler = load_handler("handle_instance_state")
    with Stubber(aws.client("stepfunctions")) as stub:
        stub.add_response(
            "send_task_failure",
            {},
            {
                "taskToken": "token-1",
                "error": "Instance.Lost",
                "cause": f'{{"instance_id": "{running}", "reason": "instance is terminated"}}',
            },
        )
        result = handler.lambda_handler(state_event(running), lambda_context)
        stub.assert_no_pending_responses()
    assert result == {"action": "failed-task", "job_id": JOB_ID, "notice": "state-change"}
    record = store.get(JOB_ID)
    assert record.task_token is None
    assert record.notices[0]["detail"] == {"state": "terminated"}


def test_handle_instance_state_after_the_trainer_reported_is_harmless(
    execution_env: dict, store: JobStore, lambda_context: Any, running: str
) -> None:
    # GIVEN the task already closed (the trainer reported first)
    handler = load_handler("handle_instance_state")
    with Stubber(aws.client("stepfunctions")) as stub:
        stub.add_client_error("send_task_failure", service_error_code="TaskTimedOut")
        result = handler.lambda_handler(state_event(running), lambda_context)
    assert result["action"] == "recorded"


def test_handle_instance_state_of_a_previous_attempt_is_only_recorded(
    execution_env: dict,
    store: JobStore,
    ec2: Any,
    subnets: list[str],
    lambda_context: Any,
    running: str,
) -> None:
    old = launch(ec2, subnets[1])
    with Stubber(aws.client("stepfunctions")):
        result = load_handler("handle_instance_state").lambda_handler(
            state_event(old), lambda_context
        )
    assert result["action"] == "recorded"
