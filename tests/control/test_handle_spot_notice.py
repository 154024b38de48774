"""HandleSpotNoticeFunction and spotrun.notices: record notices; the trainer does the reporting."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.stub import Stubber

from spotrun import aws
from spotrun.jobs import JobStore
from spotrun.status import JobStatus
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


def spot_event(case: str, instance_id: str) -> dict[str, Any]:
    event = sample("handle_spot_notice", case)
    event["detail"]["instance-id"] = instance_id
    event["resources"] = [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"]
    return event


@pytest.fixture
def running(store: JobStore, ec2: Any, subnets: list[str]) -> str:
    create_job(store)
    instance_id = launch(ec2, subnets[0])
    open_attempt(store, instance_id, subnet_id=subnets[0], zone="us-east-1a")
    store.update(JOB_ID, set={"task_token": "token-1"})
    return instance_id


def test_handle_spot_notice_records_the_warning(
    execution_env: dict, store: JobStore, lambda_context: Any, running: str
) -> None:
    handler = load_handler("handle_spot_notice")
    with Stubber(aws.client("stepfunctions")) as stub:  # no call expected: the trainer reports
        result = handler.lambda_handler(spot_event("interruption_warning", running), lambda_context)
        stub.assert_no_pending_responses()
    assert result == {"action": "recorded", "job_id": JOB_ID, "notice": "instance-action"}
    record = store.get(JOB_ID)
    assert record.status is JobStatus.INTERRUPTED
    (notice,) = record.notices
    assert notice["kind"] == "instance-action" and notice["attempt"] == 1
    assert notice["detail"] == {"instance-action": "terminate"}


def test_handle_spot_notice_records_a_rebalance_recommendation(
    execution_env: dict, store: JobStore, lambda_context: Any, running: str
) -> None:
    result = load_handler("handle_spot_notice").lambda_handler(
        spot_event("rebalance_recommendation", running), lambda_context
    )
    assert result["notice"] == "rebalance"
    assert store.get(JOB_ID).status is JobStatus.RUNNING


def test_handle_spot_notice_fails_the_task_when_the_instance_is_already_gone(
    execution_env: dict, store: JobStore, ec2: Any, lambda_context: Any, running: str
) -> None:
    ec2.terminate_instances(InstanceIds=[running])
    handler = load_handler("handle_spot_notice")
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
        result = handler.lambda_handler(spot_event("interruption_warning", running), lambda_context)
    assert result["action"] == "failed-task"
    assert store.get(JOB_ID).task_token is None


def test_handle_spot_notice_ignores_other_instances(
    execution_env: dict, ec2: Any, subnets: list[str], lambda_context: Any
) -> None:
    theirs = ec2.run_instances(ImageId="ami-03cf127a", MinCount=1, MaxCount=1, SubnetId=subnets[0])
    instance_id = theirs["Instances"][0]["InstanceId"]
    result = load_handler("handle_spot_notice").lambda_handler(
        spot_event("interruption_warning", instance_id), lambda_context
    )
    assert result["action"] == "ignored"
