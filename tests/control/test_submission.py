"""Tests for spotrun.submission: one routine behind the API and the S3 job files."""

from __future__ import annotations

import dataclasses
import json

import pytest
from botocore.stub import Stubber

from spotrun.errors import SpecError
from spotrun.jobs import JobRecord, JobStore, derived_job_id, new_job_id
from spotrun.spec import MAX_SPEC_BYTES, SpecDefaults
from spotrun.status import JobStatus
from spotrun.submission import (
    SubmissionSettings,
    execution_arn_for,
    submit_job,
    submit_job_object,
)

BUCKET_NAME = "spotrun-jobs-test"  # conftest's jobs_bucket
TRAINER_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/spotrun-trainer:test"


@pytest.fixture
def settings(state_machine: str, subnets: list[str], jobs_bucket: str) -> SubmissionSettings:
    assert jobs_bucket == BUCKET_NAME
    return SubmissionSettings(
        state_machine_arn=state_machine,
        defaults=SpecDefaults(
            image=TRAINER_IMAGE,
            instance_types=("g5.xlarge", "g6.xlarge"),
            subnets=tuple(subnets),
            heartbeat_timeout_seconds=300,
        ),
        jobs_bucket=jobs_bucket,
    )


@pytest.fixture
def submit(settings, store, sfn, ec2):
    def run(spec_source, **kwargs):
        return submit_job(
            spec_source,
            job_id=kwargs.pop("job_id", new_job_id()),
            settings=settings,
            store=store,
            sfn_client=sfn,
            ec2_client=ec2,
            **kwargs,
        )

    return run


def executions(sfn, state_machine: str) -> list[dict]:
    return sfn.list_executions(stateMachineArn=state_machine)["executions"]


def test_submit_job_valid_writes_record_and_starts_named_execution(
    submit, store: JobStore, sfn, state_machine
):
    # GIVEN a valid spec
    # WHEN it is submitted
    result = submit(json.dumps({"name": "tiny-lm", "heartbeat_timeout_seconds": 120}))
    # THEN the record is SUBMITTED with the filled spec and the execution's ARN
    record = store.get(result.job_id)
    assert result.created is True and result.status is JobStatus.SUBMITTED
    assert record.status is JobStatus.SUBMITTED
    assert record.spec["image"] == TRAINER_IMAGE
    assert record.spec["checkpoint"]["s3_uri"] == f"s3://{BUCKET_NAME}/checkpoints/{result.job_id}/"
    assert record.execution_arn == result.execution_arn
    # AND one execution named after the job id runs with the contract's input
    (execution,) = executions(sfn, state_machine)
    assert execution["name"] == result.job_id
    described = sfn.describe_execution(executionArn=result.execution_arn)
    assert json.loads(described["input"]) == {
        "job_id": result.job_id,
        "heartbeat_timeout_seconds": 120,
    }


def test_submit_job_twice_starts_one_execution(submit, store, sfn, state_machine):
    # GIVEN a submitted job
    first = submit('{"name": "tiny-lm"}', job_id="j-00000000000000000abc")
    # WHEN the same job id is submitted again (a redelivery)
    second = submit('{"name": "tiny-lm"}', job_id="j-00000000000000000abc")
    # THEN the answer points at the same execution and nothing new started
    assert second.created is False
    assert second.execution_arn == first.execution_arn
    assert len(executions(sfn, state_machine)) == 1


def test_submit_job_execution_already_exists_counts_as_started(submit, store, sfn, state_machine):
    # GIVEN an execution that already exists under the job id (a crash after starting
    # it, before the ARN was stored)
    job_id = "j-00000000000000000def"
    sfn.start_execution(stateMachineArn=state_machine, name=job_id, input="{}")
    # WHEN the job is submitted
    result = submit('{"name": "tiny-lm"}', job_id=job_id)
    # THEN it is recorded with that execution's ARN and no second one runs
    assert result.execution_arn == execution_arn_for(state_machine, job_id)
    assert store.get(job_id).execution_arn == result.execution_arn
    assert len(executions(sfn, state_machine)) == 1


def test_submit_job_record_without_execution_gets_started_on_repeat(
    submit, store, sfn, state_machine
):
    # GIVEN a record left SUBMITTED without an execution (crash before start_execution)
    job_id = "j-00000000000000000123"
    store.create(
        JobRecord(job_id=job_id, status=JobStatus.SUBMITTED, spec={"heartbeat_timeout_seconds": 60})
    )
    # WHEN the submission is repeated
    result = submit('{"name": "tiny-lm"}', job_id=job_id)
    # THEN the execution is started now and its ARN stored
    (execution,) = executions(sfn, state_machine)
    assert execution["name"] == job_id
    assert store.get(job_id).execution_arn == result.execution_arn == execution["executionArn"]


def test_submit_job_invalid_raises_and_writes_nothing(submit, store, sfn, state_machine):
    # GIVEN an invalid spec
    # WHEN it is submitted through the API path
    with pytest.raises(SpecError) as caught:
        submit({"name": "x", "checkpoint": {"keep": 0}}, job_id="j-00000000000000000456")
    # THEN the error names the field, no record exists, nothing started
    assert [e["field"] for e in caught.value.errors] == ["checkpoint.keep"]
    assert store.list_jobs()[0] == []
    assert executions(sfn, state_machine) == []


def test_submit_job_unknown_instance_type_and_subnet_are_field_errors(
    submit, subnets, store, sfn, state_machine
):
    # GIVEN a spec naming an instance type EC2 does not have and a subnet that is not there
    spec = {
        "name": "x",
        "instance_types": ["g5.xlarge", "zz9.mega"],
        "subnets": [subnets[0], "subnet-0000000000000dead"],
    }
    # WHEN submitted
    with pytest.raises(SpecError) as caught:
        submit(spec)
    # THEN both are named by their path, and nothing was written or started
    errors = {e["field"]: e["reason"] for e in caught.value.errors}
    assert set(errors) == {"instance_types[1]", "subnets[1]"}
    assert "zz9.mega" in errors["instance_types[1]"]
    assert store.list_jobs()[0] == []
    assert executions(sfn, state_machine) == []


def test_submit_job_instance_type_not_offered_in_subnet_zones(settings, store, sfn, ec2):
    # GIVEN EC2 says the type exists in the region but not in the subnets' zones
    spec = {"name": "x", "instance_types": ["g5.xlarge"]}
    stub = Stubber(ec2)
    zones = ["us-east-1a", "us-east-1b"]
    subnets = [
        {"SubnetId": s, "AvailabilityZone": z}
        for s, z in zip(settings.defaults.subnets, zones, strict=True)
    ]
    stub.add_response("describe_subnets", {"Subnets": subnets})
    stub.add_response(
        "describe_instance_type_offerings",
        {"InstanceTypeOfferings": [{"InstanceType": "g5.xlarge", "Location": "us-east-1"}]},
    )
    stub.add_response("describe_instance_type_offerings", {"InstanceTypeOfferings": []})
    # WHEN submitted
    with stub, pytest.raises(SpecError) as caught:
        submit_job(
            spec,
            job_id=new_job_id(),
            settings=settings,
            store=store,
            sfn_client=sfn,
            ec2_client=ec2,
        )
    # THEN the reason names the zones
    (error,) = caught.value.errors
    assert error["field"] == "instance_types[0]"
    assert "us-east-1a" in error["reason"]


def test_submit_job_reject_invalid_records_rejected_without_execution(
    submit, store, sfn, state_machine
):
    # GIVEN an invalid spec from a job file
    raw = b'{"name": "x", "colour": "blue"}'
    # WHEN submitted with reject_invalid
    result = submit(raw, job_id="j-00000000000000000789", reject_invalid=True)
    # THEN a REJECTED record holds the reason and what was submitted; nothing started
    record = store.get("j-00000000000000000789")
    assert result.status is JobStatus.REJECTED and result.created is True
    assert record.status is JobStatus.REJECTED
    assert "colour: unknown field" in record.reason
    assert record.spec == {"submitted": raw.decode()}
    assert record.execution_arn is None
    assert executions(sfn, state_machine) == []


def test_submit_job_reject_does_not_touch_an_existing_record(submit, store):
    # GIVEN a running job
    job_id = "j-00000000000000000aaa"
    store.create(JobRecord(job_id=job_id, status=JobStatus.RUNNING, spec={"name": "ok"}))
    # WHEN invalid input arrives under the same id
    result = submit(b"{not json", job_id=job_id, reject_invalid=True)
    # THEN the record is unchanged
    assert result.created is False
    assert store.get(job_id).status is JobStatus.RUNNING
    assert store.get(job_id).spec == {"name": "ok"}


def test_submit_job_start_failure_leaves_a_record_a_repeat_can_start(
    settings, store, sfn, ec2, state_machine
):
    # GIVEN Step Functions throttles the first start
    job_id = "j-00000000000000000bbb"
    stub = Stubber(sfn)
    stub.add_client_error("start_execution", "ThrottlingException", http_status_code=400)
    with stub, pytest.raises(Exception, match="ThrottlingException"):
        submit_job(
            '{"name": "x"}',
            job_id=job_id,
            settings=settings,
            store=store,
            sfn_client=sfn,
            ec2_client=ec2,
        )
    # THEN the record is SUBMITTED without an execution
    assert store.get(job_id).execution_arn is None
    # AND WHEN the event is retried, the execution starts
    result = submit_job(
        '{"name": "x"}',
        job_id=job_id,
        settings=settings,
        store=store,
        sfn_client=sfn,
        ec2_client=ec2,
    )
    assert result.execution_arn is not None
    assert len(executions(sfn, state_machine)) == 1


def test_submit_job_object_valid_and_duplicate(settings, store, s3, sfn, ec2, state_machine):
    # GIVEN a job file in the bucket
    etag = s3.put_object(Bucket=BUCKET_NAME, Key="jobs/a.json", Body=b'{"name": "a"}')["ETag"]
    kwargs = dict(
        bucket=BUCKET_NAME,
        key="jobs/a.json",
        etag=etag,
        version_id=None,
        settings=settings,
        store=store,
        s3_client=s3,
        sfn_client=sfn,
        ec2_client=ec2,
    )
    # WHEN its event is delivered twice
    first = submit_job_object(**kwargs)
    second = submit_job_object(**kwargs)
    # THEN one job, derived from bucket/key/etag, with one execution
    assert first.job_id == derived_job_id("s3", BUCKET_NAME, "jobs/a.json", etag.strip('"'))
    assert (first.created, second.created) == (True, False)
    assert second.job_id == first.job_id
    assert store.get(first.job_id).source["key"] == "jobs/a.json"
    assert len(executions(sfn, state_machine)) == 1


def test_submit_job_object_too_large_is_rejected(settings, store, s3, sfn, ec2, state_machine):
    # GIVEN a job file over the limit
    body = json.dumps({"name": "big", "environment": {"X": "y" * (MAX_SPEC_BYTES + 10)}})
    etag = s3.put_object(Bucket=BUCKET_NAME, Key="jobs/big.json", Body=body.encode())["ETag"]
    # WHEN submitted
    result = submit_job_object(
        bucket=BUCKET_NAME,
        key="jobs/big.json",
        etag=etag,
        version_id=None,
        settings=settings,
        store=store,
        s3_client=s3,
        sfn_client=sfn,
        ec2_client=ec2,
    )
    # THEN it is REJECTED naming the size, and nothing runs
    assert result.status is JobStatus.REJECTED
    assert str(len(body)) in store.get(result.job_id).reason
    assert executions(sfn, state_machine) == []


@pytest.mark.parametrize(("key", "body"), [("jobs/gone.json", None), ("jobs/empty.json", b"")])
def test_submit_job_object_missing_or_empty_file_is_rejected(
    settings, store, s3, sfn, ec2, key, body
):
    # GIVEN a job file that is empty, or was deleted before we read it
    if body is not None:
        s3.put_object(Bucket=BUCKET_NAME, Key=key, Body=body)
    # WHEN its event is handled
    result = submit_job_object(
        bucket=BUCKET_NAME,
        key=key,
        etag="abc",
        version_id=None,
        settings=settings,
        store=store,
        s3_client=s3,
        sfn_client=sfn,
        ec2_client=ec2,
    )
    # THEN it is REJECTED with a reason
    assert result.status is JobStatus.REJECTED
    assert store.get(result.job_id).reason


def test_submit_job_object_ignores_keys_that_are_not_job_files(settings, store, s3, sfn, ec2):
    result = submit_job_object(
        bucket=BUCKET_NAME,
        key="models/j-1/model.pt",
        etag="abc",
        version_id=None,
        settings=settings,
        store=store,
        s3_client=s3,
        sfn_client=sfn,
        ec2_client=ec2,
    )
    assert result is None
    assert store.list_jobs()[0] == []


def test_submission_settings_from_env(control_env):
    settings = SubmissionSettings.from_env()
    assert settings.state_machine_arn == control_env["STATE_MACHINE_ARN"]
    assert settings.jobs_bucket == control_env["JOBS_BUCKET"]
    assert settings.defaults.instance_types == ("g5.xlarge", "g6.xlarge")


def test_submit_job_dataset_snapshot_must_exist_and_fit(submit, ec2, store):
    # GIVEN a 20 GiB snapshot
    volume_id = ec2.create_volume(AvailabilityZone="us-east-1a", Size=20)["VolumeId"]
    snapshot_id = ec2.create_snapshot(VolumeId=volume_id)["SnapshotId"]
    # WHEN specs name a missing snapshot, or a volume smaller than the snapshot
    with pytest.raises(SpecError) as missing:
        submit({"name": "x", "dataset": {"snapshot_id": "snap-0000000000000dead"}})
    with pytest.raises(SpecError) as small:
        submit({"name": "x", "dataset": {"snapshot_id": snapshot_id, "volume_size_gib": 10}})
    # THEN each names its field
    assert [e["field"] for e in missing.value.errors] == ["dataset.snapshot_id"]
    assert [e["field"] for e in small.value.errors] == ["dataset.volume_size_gib"]
    # AND a spec that fits is accepted
    ok = submit({"name": "x", "dataset": {"snapshot_id": snapshot_id, "volume_size_gib": 20}})
    assert store.get(ok.job_id).spec["dataset"]["snapshot_id"] == snapshot_id


def test_submit_job_default_instance_types_not_offered_are_dropped(
    settings, store, sfn, ec2, state_machine
):
    # GIVEN deployment defaults naming a type this region does not offer
    defaults = dataclasses.replace(settings.defaults, instance_types=("zz9.mega", "g5.xlarge"))
    lenient = dataclasses.replace(settings, defaults=defaults)
    # WHEN a spec relying on the defaults is submitted
    result = submit_job(
        '{"name": "x"}',
        job_id=new_job_id(),
        settings=lenient,
        store=store,
        sfn_client=sfn,
        ec2_client=ec2,
    )
    # THEN the job runs with the offered default only
    assert store.get(result.job_id).spec["instance_types"] == ["g5.xlarge"]
    # AND WHEN no default is offered, the spec is refused on instance_types
    hopeless = dataclasses.replace(
        settings, defaults=dataclasses.replace(defaults, instance_types=("zz9.mega",))
    )
    with pytest.raises(SpecError) as caught:
        submit_job(
            '{"name": "x"}',
            job_id=new_job_id(),
            settings=hopeless,
            store=store,
            sfn_client=sfn,
            ec2_client=ec2,
        )
    assert [e["field"] for e in caught.value.errors] == ["instance_types"]


@pytest.mark.parametrize(
    ("dataset_bucket", "dataset_uri", "mirror_uri", "bad_fields"),
    [
        (None, f"s3://{BUCKET_NAME}/datasets/corpus/", None, []),
        (None, "s3://someone-elses/corpus/", None, ["dataset.s3_uri"]),
        (None, f"s3://{BUCKET_NAME}/tickets/x/", None, ["dataset.s3_uri"]),
        ("team-data", "s3://team-data/corpus/", None, []),
        (None, None, f"s3://{BUCKET_NAME}/checkpoints/mine/", []),
        (None, None, f"s3://{BUCKET_NAME}/models/mine/", ["checkpoint.s3_uri"]),
        (None, "s3://elsewhere/d/", "s3://elsewhere/c/", ["dataset.s3_uri", "checkpoint.s3_uri"]),
    ],
)
def test_submit_job_s3_locations_the_trainer_cannot_reach_are_field_errors(
    settings, store, sfn, ec2, state_machine, dataset_bucket, dataset_uri, mirror_uri, bad_fields
):
    # GIVEN a deployment (maybe with a dataset bucket) and a spec naming S3 locations
    deployment = dataclasses.replace(settings, dataset_bucket=dataset_bucket)
    spec: dict = {"name": "s3-places"}
    if dataset_uri:
        spec["dataset"] = {"s3_uri": dataset_uri}
    if mirror_uri:
        spec["checkpoint"] = {"s3_uri": mirror_uri}

    def submit() -> object:
        return submit_job(
            spec,
            job_id=new_job_id(),
            settings=deployment,
            store=store,
            sfn_client=sfn,
            ec2_client=ec2,
        )

    # WHEN it is submitted
    if not bad_fields:
        assert submit().status is JobStatus.SUBMITTED
        return
    with pytest.raises(SpecError) as refused:
        submit()
    # THEN each location the trainer's role cannot reach is named, and nothing starts
    assert [error["field"] for error in refused.value.errors] == bad_fields
    assert executions(sfn, state_machine) == []
