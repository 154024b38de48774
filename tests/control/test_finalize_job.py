"""FinalizeJobFunction and spotrun.finalize: final status, nothing left, one notification."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

from spotrun.jobs import JobStore
from spotrun.status import JobStatus
from tests.control.conftest import REGION, load_handler
from tests.control.function_helpers import (
    JOB_ID,
    create_job,
    job_volume,
    launch,
    sample,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:No application metrics"),
    pytest.mark.usefixtures("shared_service_models"),
]


@pytest.fixture
def outbox(execution_env: dict) -> Any:
    """An SQS queue subscribed to the outcomes topic."""
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="outbox")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    boto3.client("sns", region_name=REGION).subscribe(
        TopicArn=execution_env["TOPIC_ARN"], Protocol="sqs", Endpoint=arn
    )

    def read() -> list[dict[str, Any]]:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        return [json.loads(json.loads(m["Body"])["Message"]) for m in messages]

    return read


def test_finalize_job_succeeded(
    execution_env: dict, store: JobStore, lambda_context: Any, outbox: Any
) -> None:
    create_job(store, status=JobStatus.RUNNING)
    event = sample("finalize_job", "succeeded")
    result = load_handler("finalize_job").lambda_handler(event, lambda_context)

    assert result == {"status": "SUCCEEDED", "reason": None}
    record = store.get(JOB_ID)
    assert record.model_uri == event["result"]["model_uri"]
    assert record.metrics == {"loss": 2.31} and record.checkpoint["step"] == 200
    (message,) = outbox()
    assert message["status"] == "SUCCEEDED" and message["model_uri"] == record.model_uri


def test_finalize_job_failed_leaves_nothing_running(
    execution_env: dict,
    store: JobStore,
    ec2: Any,
    subnets: list[str],
    lambda_context: Any,
    outbox: Any,
) -> None:
    # GIVEN a job with a stray instance and volume (a release that never happened)
    create_job(store, status=JobStatus.RECOVERING)
    instance_id = launch(ec2, subnets[0])
    job_volume(ec2, "us-east-1a", "data")

    result = load_handler("finalize_job").lambda_handler(
        sample("finalize_job", "failed"), lambda_context
    )

    assert result == {
        "status": "FAILED",
        "reason": "Budget.Exhausted: interrupted 11 times; max_interruptions is 10",
    }
    reservation = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    assert reservation["Instances"][0]["State"]["Name"] == "terminated"
    volumes = ec2.describe_volumes(Filters=[{"Name": "tag:spotrun:job-id", "Values": [JOB_ID]}])
    assert volumes["Volumes"] == []
    (message,) = outbox()
    assert message["status"] == "FAILED" and message["reason"] == result["reason"]


def test_finalize_job_keeps_a_cancelled_status(
    execution_env: dict, store: JobStore, lambda_context: Any
) -> None:
    create_job(store, status=JobStatus.CANCELLED)
    result = load_handler("finalize_job").lambda_handler(
        sample("finalize_job", "failed"), lambda_context
    )
    assert result["status"] == "CANCELLED"
