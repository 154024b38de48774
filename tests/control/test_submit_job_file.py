"""Tests for functions/submit_job_file: S3 "Object Created" events under jobs/."""

from __future__ import annotations

import json

import pytest

from spotrun.jobs import derived_job_id
from spotrun.status import JobStatus
from tests.control.conftest import load_event, load_handler

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics")

VALID_JOB = {"name": "tiny-lm", "checkpoint": {"interval": {"seconds": 600}}}
INVALID_JOB = {"name": "tiny-lm", "max_interruptions": -1, "dataset": {}}


@pytest.fixture
def handler(control_env, lambda_context):
    module = load_handler("submit_job_file")
    return lambda event: module.lambda_handler(event, lambda_context)


def put_job_file(s3, bucket: str, event: dict, body: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=event["detail"]["object"]["key"], Body=body)


def executions(sfn, state_machine):
    return sfn.list_executions(stateMachineArn=state_machine)["executions"]


def job_id_for(event: dict) -> str:
    detail = event["detail"]
    return derived_job_id(
        "s3", detail["bucket"]["name"], detail["object"]["key"], detail["object"]["etag"]
    )


def test_submit_job_file_valid_submits_and_starts_execution(
    handler, s3, jobs_bucket, store, sfn, state_machine
):
    # GIVEN a valid job file and its event
    event = load_event("submit_job_file", "object_created_valid")
    put_job_file(s3, jobs_bucket, event, json.dumps(VALID_JOB).encode())
    # WHEN the event is handled
    result = handler(event)
    # THEN a SUBMITTED record under the id derived from bucket/key/etag, one execution
    assert result["job_id"] == job_id_for(event)
    assert result["created"] is True
    record = store.get(result["job_id"])
    assert record.status is JobStatus.SUBMITTED
    assert record.spec["checkpoint"]["interval"] == {"seconds": 600}
    assert record.source == {
        "kind": "s3",
        "bucket": jobs_bucket,
        "key": "jobs/tiny-lm.json",
        "etag": event["detail"]["object"]["etag"],
        "version_id": None,
    }
    assert [e["name"] for e in executions(sfn, state_machine)] == [result["job_id"]]


def test_submit_job_file_duplicate_event_starts_nothing_new(
    handler, s3, jobs_bucket, store, sfn, state_machine
):
    # GIVEN a job file whose event was handled
    event = load_event("submit_job_file", "object_created_valid")
    put_job_file(s3, jobs_bucket, event, json.dumps(VALID_JOB).encode())
    first = handler(event)
    # WHEN a duplicate event for the same object arrives (another event id, same etag)
    second = handler(load_event("submit_job_file", "object_created_duplicate"))
    # THEN it maps to the same job and execution, and nothing new is created
    assert second["job_id"] == first["job_id"]
    assert second["created"] is False
    assert second["execution_arn"] == first["execution_arn"]
    assert len(store.list_jobs()[0]) == 1
    assert len(executions(sfn, state_machine)) == 1


def test_submit_job_file_invalid_is_rejected_with_reason_and_no_execution(
    handler, s3, jobs_bucket, store, sfn, state_machine
):
    # GIVEN an invalid job file
    event = load_event("submit_job_file", "object_created_invalid")
    put_job_file(s3, jobs_bucket, event, json.dumps(INVALID_JOB).encode())
    # WHEN its event is handled
    result = handler(event)
    # THEN a REJECTED record names the bad fields, and nothing started
    record = store.get(result["job_id"])
    assert record.status is JobStatus.REJECTED
    assert "max_interruptions" in record.reason and "dataset" in record.reason
    assert {e["field"] for e in result["errors"]} == {"max_interruptions", "dataset"}
    assert executions(sfn, state_machine) == []


def test_submit_job_file_invalid_redelivered_keeps_one_rejected_record(
    handler, s3, jobs_bucket, store
):
    event = load_event("submit_job_file", "object_created_invalid")
    put_job_file(s3, jobs_bucket, event, b"{ not json")
    first, second = handler(event), handler(event)
    assert first["status"] == second["status"] == "REJECTED"
    assert second["created"] is False
    assert "not valid JSON" in store.get(first["job_id"]).reason
    assert len(store.list_jobs()[0]) == 1


def test_submit_job_file_not_a_job_file_is_ignored(handler, store, sfn, state_machine):
    # GIVEN an event for an object under jobs/ that is not JSON
    result = handler(load_event("submit_job_file", "object_created_not_a_job"))
    # THEN nothing is recorded or started
    assert result == {"job_id": None, "ignored": True}
    assert store.list_jobs()[0] == []
    assert executions(sfn, state_machine) == []


def test_submit_job_file_real_s3_event_from_moto_is_handled(
    handler, s3, jobs_bucket, store, sfn, state_machine
):
    # GIVEN S3 publishing to EventBridge, and a rule that copies events to a queue
    # (moto cannot target a Lambda; FINDINGS.md), so we get the event S3 really emits
    from tests.control.conftest import _test_session

    events = _test_session().client("events", region_name="us-east-1")
    sqs = _test_session().client("sqs", region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName="job-files")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=jobs_bucket,
        NotificationConfiguration={"EventBridgeConfiguration": {}},
    )
    events.put_rule(
        Name="job-files",
        EventPattern=json.dumps(
            {
                "source": ["aws.s3"],
                "detail-type": ["Object Created"],
                "detail": {"object": {"key": [{"prefix": "jobs/"}]}},
            }
        ),
    )
    events.put_targets(Rule="job-files", Targets=[{"Id": "q", "Arn": queue_arn}])
    # WHEN a job file is uploaded
    s3.put_object(Bucket=jobs_bucket, Key="jobs/real.json", Body=json.dumps(VALID_JOB).encode())
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    event = json.loads(messages[0]["Body"])
    # THEN the handler submits it from that event
    result = handler(event)
    assert result["created"] is True
    assert store.get(result["job_id"]).source["key"] == "jobs/real.json"
    assert len(executions(sfn, state_machine)) == 1
