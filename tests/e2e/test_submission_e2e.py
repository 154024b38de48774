"""Submitting jobs on the local cloud, end to end: REST API and S3 job files, good and bad."""

from __future__ import annotations

import pytest
from e2e_support import job_spec, wait_until

pytestmark = pytest.mark.e2e


def _executions(cloud) -> set[str]:
    listed = cloud.sfn.list_executions(stateMachineArn=cloud.state_machine_arn)
    return {execution["name"] for execution in listed["executions"]}


def _instances(cloud) -> set[str]:
    reservations = cloud.ec2.describe_instances()["Reservations"]
    return {i["InstanceId"] for r in reservations for i in r["Instances"]}


def _jobs_named(cloud, name: str) -> list[dict]:
    listed = cloud.client.request("GET", "/jobs")
    assert listed.status == 200, listed.body
    return [job for job in listed.body["jobs"] if job.get("name") == name]


def _rejected_from(cloud, key: str) -> dict | None:
    """The REJECTED record made from job file ``key`` (a rejected spec may have no name)."""
    listed = cloud.client.request("GET", "/jobs?status=REJECTED")
    assert listed.status == 200, listed.body
    for summary in listed.body["jobs"]:
        record = cloud.job(summary["job_id"])
        if (record.get("source") or {}).get("key") == key:
            return record
    return None


def _cancel_and_wait(cloud, job_id: str) -> dict:
    cancelled = cloud.client.cancel(job_id)
    assert cancelled.status in (200, 202), cancelled.body
    return cloud.wait_for_job(job_id, timeout=90)


def test_rest_api_submission_starts_the_job(cloud, jobs):
    # WHEN a job is posted to the API
    response = cloud.submit(job_spec("api-submitted"))
    # THEN it is accepted, and its execution (named after the job) runs it on an instance
    assert response.status in (200, 201), response.body
    job_id = response.body["job_id"]
    jobs.append(job_id)
    assert job_id in _executions(cloud)
    wait_until(lambda: cloud.runner.of_job(job_id), timeout=60)
    assert _cancel_and_wait(cloud, job_id)["status"] == "CANCELLED"


def test_rest_api_rejects_a_bad_spec_with_reasons_and_starts_nothing(cloud, jobs):
    executions, instances = _executions(cloud), _instances(cloud)
    # WHEN a spec with an unknown field and a bad count is posted
    bad = {**job_spec("api-bad"), "max_interruptions": -1, "gpus_please": True}
    response = cloud.submit(bad)
    # THEN a 4xx names both problems
    assert 400 <= response.status < 500, response.body
    text = str(response.body)
    assert "max_interruptions" in text and "gpus_please" in text
    # and nothing started
    assert _executions(cloud) == executions
    assert _instances(cloud) == instances


def test_rest_api_gateway_model_refuses_a_body_before_the_function(cloud, jobs):
    executions, calls = _executions(cloud), len(cloud.pool.invocations)
    # WHEN a spec without a name (the API's model requires one) is posted
    response = cloud.submit({"spec_version": 2})
    # THEN the gateway answers 400 with the reasons, in the API's error shape
    assert response.status == 400, response.body
    (error,) = response.body["errors"]
    assert error["field"] == "body"
    assert "name" in error["reason"] and "spec_version" in error["reason"]
    # and neither the function nor an execution ran
    assert len(cloud.pool.invocations) == calls
    assert _executions(cloud) == executions


def test_s3_job_file_submission_starts_the_job(cloud, jobs):
    # WHEN a job file is created under jobs/ in the bucket
    cloud.submit_file(job_spec("s3-submitted"), key="jobs/s3-submitted.json")
    # THEN the S3 event reaches the submission function, which starts the job
    (job,) = wait_until(lambda: _jobs_named(cloud, "s3-submitted"), timeout=30)
    jobs.append(job["job_id"])
    wait_until(lambda: job["job_id"] in _executions(cloud), timeout=30)
    wait_until(lambda: cloud.runner.of_job(job["job_id"]), timeout=60)
    assert _cancel_and_wait(cloud, job["job_id"])["status"] == "CANCELLED"


def test_s3_job_file_with_a_bad_spec_is_rejected_with_a_reason(cloud, jobs):
    executions, instances = _executions(cloud), _instances(cloud)
    # WHEN a job file with a bad field is dropped in the bucket
    cloud.submit_file(
        {**job_spec("s3-bad"), "checkpoint": {"interval": "often"}}, key="jobs/s3-bad.json"
    )
    # THEN a REJECTED record says why
    record = wait_until(lambda: _rejected_from(cloud, "jobs/s3-bad.json"), timeout=30)
    assert "checkpoint.interval" in str(record.get("reason")), record
    # and nothing started
    assert _executions(cloud) == executions
    assert _instances(cloud) == instances
