"""Tests for functions/jobs_api: the REST API on moto, driven by the sample events."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from spotrun.jobs import JobRecord, JobStore
from spotrun.status import JobStatus
from tests.control.conftest import load_event, load_handler

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics")

SAMPLE_JOB_ID = "j-0123456789abcdef0123"  # the job the get/cancel sample events name


@pytest.fixture
def api(control_env, lambda_context):
    handler = load_handler("jobs_api")

    def call(event):
        response = handler.lambda_handler(event, lambda_context)
        return response["statusCode"], json.loads(response["body"] or "null")

    return call


def executions(sfn, state_machine):
    return sfn.list_executions(stateMachineArn=state_machine)["executions"]


def test_jobs_api_post_valid_returns_201_and_starts_execution(
    api, store: JobStore, sfn, state_machine
):
    # GIVEN the sample valid submission
    event = load_event("jobs_api", "post_job_valid")
    # WHEN posted
    status, body = api(event)
    # THEN 201 with the job id and execution ARN, a SUBMITTED record, one execution
    assert status == 201
    assert body["job_id"].startswith("j-")
    assert body["execution_arn"].endswith(f":{body['job_id']}")
    record = store.get(body["job_id"])
    assert record.status is JobStatus.SUBMITTED
    assert record.spec["name"] == "tiny-lm"
    assert record.spec["checkpoint"]["interval"] == {"steps": 20}
    assert record.execution_arn == body["execution_arn"]
    assert [e["name"] for e in executions(sfn, state_machine)] == [body["job_id"]]


def test_jobs_api_post_retry_with_idempotency_key_returns_first_response(
    api, store, sfn, state_machine
):
    # GIVEN a keyed submission that succeeded
    event = load_event("jobs_api", "post_job_valid")
    first = api(event)
    # WHEN the client retries it
    second = api(copy.deepcopy(event))
    # THEN the answer is the first one, and nothing new was created or started
    assert second == first
    assert len(store.list_jobs()[0]) == 1
    assert len(executions(sfn, state_machine)) == 1


def test_jobs_api_post_same_key_different_body_is_422(api, store):
    # GIVEN a keyed submission
    event = load_event("jobs_api", "post_job_valid")
    api(event)
    # WHEN the same key comes with another body
    other = copy.deepcopy(event)
    other["body"] = json.dumps({"name": "something-else"})
    status, body = api(other)
    # THEN 422 and still one job
    assert status == 422
    assert "Idempotency-Key" in body["message"]
    assert len(store.list_jobs()[0]) == 1


def test_jobs_api_post_same_key_other_caller_is_another_job(api, store):
    # GIVEN two callers that happen to use the same key
    event = load_event("jobs_api", "post_job_valid")
    other = copy.deepcopy(event)
    other["requestContext"]["identity"]["userArn"] = "arn:aws:iam::123456789012:user/bob"
    # WHEN both post
    first, second = api(event), api(other)
    # THEN each gets its own job
    assert first[0] == second[0] == 201
    assert first[1]["job_id"] != second[1]["job_id"]


def test_jobs_api_post_without_key_creates_a_job_each_time(api, store):
    event = load_event("jobs_api", "post_job_valid")
    del event["headers"]["Idempotency-Key"]
    del event["multiValueHeaders"]["Idempotency-Key"]
    assert api(event)[0] == 201
    assert api(copy.deepcopy(event))[0] == 201
    assert len(store.list_jobs()[0]) == 2


def test_jobs_api_post_base64_body_is_decoded(api, store):
    event = load_event("jobs_api", "post_job_valid")
    event["body"] = base64.b64encode(event["body"].encode()).decode()
    event["isBase64Encoded"] = True
    status, body = api(event)
    assert status == 201
    assert store.get(body["job_id"]).spec["name"] == "tiny-lm"


def test_jobs_api_post_invalid_spec_is_400_naming_each_field(api, store, sfn, state_machine):
    # GIVEN the sample invalid spec
    status, body = api(load_event("jobs_api", "post_job_invalid_spec"))
    # THEN 400 lists every bad field with a reason, and nothing was written or started
    assert status == 400
    fields = {e["field"]: e["reason"] for e in body["errors"]}
    assert {
        "name",
        "instance_types[1]",
        "checkpoint.keep",
        "checkpoint.interval",
        "deadline",
        "tags.spotrun:job-id (key)",
        "colour",
    } <= set(fields)
    assert all(fields.values())
    assert store.list_jobs()[0] == []
    assert executions(sfn, state_machine) == []


def test_jobs_api_post_malformed_json_is_400_on_the_body(api, store):
    status, body = api(load_event("jobs_api", "post_job_malformed_json"))
    assert status == 400
    assert body["errors"][0]["field"] == "$"
    assert "not valid JSON" in body["errors"][0]["reason"]
    assert store.list_jobs()[0] == []


def test_jobs_api_post_bad_idempotency_key_is_400(api, store):
    event = load_event("jobs_api", "post_job_valid")
    event["headers"]["Idempotency-Key"] = "has spaces in it"
    status, body = api(event)
    assert status == 400
    assert body["errors"][0]["field"] == "Idempotency-Key"
    assert store.list_jobs()[0] == []


def test_jobs_api_get_job_returns_the_record_without_task_token(api, store):
    # GIVEN the sample job, running, with a task token
    store.create(
        JobRecord(
            job_id=SAMPLE_JOB_ID,
            status=JobStatus.RUNNING,
            spec={"name": "tiny-lm"},
            task_token="secret-token",
            checkpoint={"step": 40, "volume_id": "vol-1"},
        )
    )
    # WHEN fetched
    status, body = api(load_event("jobs_api", "get_job"))
    # THEN 200 with the record, but not the task token
    assert status == 200
    assert body["job_id"] == SAMPLE_JOB_ID
    assert body["status"] == "RUNNING"
    assert body["checkpoint"]["step"] == 40
    assert "task_token" not in body


def test_jobs_api_get_unknown_job_is_404(api):
    status, body = api(load_event("jobs_api", "get_job_unknown"))
    assert status == 404
    assert body["job_id"] == "j-ffffffffffffffffffff"


def test_jobs_api_get_malformed_job_id_is_404(api):
    event = load_event("jobs_api", "get_job_unknown")
    event["path"] = "/jobs/..%2Fetc"
    event["pathParameters"] = {"job_id": "..%2Fetc"}
    assert api(event)[0] == 404


def test_jobs_api_list_jobs_filters_by_status_and_pages(api, store):
    # GIVEN jobs in several states
    for index, status in enumerate(
        [JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.SUBMITTED, JobStatus.FAILED]
    ):
        store.create(
            JobRecord(job_id=f"j-{index:020x}", status=status, spec={"name": f"job-{index}"})
        )
    # WHEN listed with the sample's filter (RUNNING,SUBMITTED; limit 10)
    status, body = api(load_event("jobs_api", "list_jobs"))
    # THEN only those come back, summarised
    assert status == 200
    assert sorted(j["status"] for j in body["jobs"]) == ["RUNNING", "RUNNING", "SUBMITTED"]
    assert {j["name"] for j in body["jobs"]} == {"job-0", "job-1", "job-2"}
    assert body["next_cursor"] is None
    # AND WHEN paged one at a time, every match comes exactly once
    event = load_event("jobs_api", "list_jobs")
    event["queryStringParameters"]["limit"] = "1"
    seen = []
    while True:
        page = api(copy.deepcopy(event))[1]
        seen.extend(j["job_id"] for j in page["jobs"])
        if not page["next_cursor"]:
            break
        event["queryStringParameters"]["cursor"] = page["next_cursor"]
    assert sorted(seen) == [f"j-{i:020x}" for i in range(3)]


@pytest.mark.parametrize(
    ("query", "field"),
    [({"status": "SLEEPING"}, "status"), ({"limit": "1000"}, "limit"), ({"cursor": "x"}, "cursor")],
)
def test_jobs_api_list_jobs_bad_query_is_400(api, query, field):
    event = load_event("jobs_api", "list_jobs")
    event["queryStringParameters"] = query
    event["multiValueQueryStringParameters"] = {k: [v] for k, v in query.items()}
    status, body = api(event)
    assert status == 400
    assert body["errors"][0]["field"] == field


def test_jobs_api_cancel_stops_execution_and_leaves_status_to_the_ended_handler(
    api, store, sfn, state_machine
):
    # GIVEN the sample job, running in an execution
    execution_arn = sfn.start_execution(
        stateMachineArn=state_machine, name=SAMPLE_JOB_ID, input="{}"
    )["executionArn"]
    store.create(
        JobRecord(
            job_id=SAMPLE_JOB_ID,
            status=JobStatus.RUNNING,
            spec={"name": "tiny-lm"},
            execution_arn=execution_arn,
        )
    )
    # WHEN it is cancelled
    status, body = api(load_event("jobs_api", "cancel_job"))
    # THEN 202, the execution is aborted, and the record keeps its status for now
    assert status == 202
    assert body["status"] == "RUNNING"
    assert sfn.describe_execution(executionArn=execution_arn)["status"] == "ABORTED"
    record = store.get(SAMPLE_JOB_ID)
    assert record.status is JobStatus.RUNNING
    assert record.notices[-1]["kind"] == "cancel-requested"


def test_jobs_api_cancel_terminal_job_is_409(api, store):
    store.create(
        JobRecord(job_id=SAMPLE_JOB_ID, status=JobStatus.SUCCEEDED, spec={"name": "tiny-lm"})
    )
    status, body = api(load_event("jobs_api", "cancel_job"))
    assert status == 409
    assert body["status"] == "SUCCEEDED"
    assert store.get(SAMPLE_JOB_ID).notices == []


def test_jobs_api_cancel_job_that_never_started_is_cancelled_at_once(api, store):
    # GIVEN a SUBMITTED record whose execution never started
    store.create(
        JobRecord(job_id=SAMPLE_JOB_ID, status=JobStatus.SUBMITTED, spec={"name": "tiny-lm"})
    )
    # WHEN cancelled
    status, body = api(load_event("jobs_api", "cancel_job"))
    # THEN nothing will settle it later, so it is CANCELLED now
    assert status == 202
    assert body["status"] == "CANCELLED"
    assert store.get(SAMPLE_JOB_ID).status is JobStatus.CANCELLED


def test_jobs_api_cancel_unknown_job_is_404(api):
    assert api(load_event("jobs_api", "cancel_job_unknown"))[0] == 404


def test_jobs_api_unknown_route_is_404(api):
    event = load_event("jobs_api", "list_jobs")
    event["path"] = "/nothing"
    event["resource"] = "/nothing"
    assert api(event)[0] == 404


def test_jobs_api_post_records_the_caller(api, store):
    status, body = api(load_event("jobs_api", "post_job_valid"))
    assert status == 201
    assert store.get(body["job_id"]).source == {
        "kind": "api",
        "caller": "arn:aws:iam::123456789012:user/alice",
    }


def test_jobs_api_post_binary_body_is_400(api, store):
    event = load_event("jobs_api", "post_job_malformed_json")
    event["body"] = base64.b64encode(b"\xff\xfe\x00binary").decode()
    event["isBase64Encoded"] = True
    status, body = api(event)
    assert status == 400
    assert body["errors"] == [{"field": "$", "reason": "not UTF-8 text"}]
    assert store.list_jobs()[0] == []
