"""Tests for functions/handle_execution_ended: settling jobs whose execution ended abnormally."""

from __future__ import annotations

import pytest

from spotrun import tags
from spotrun.jobs import JobRecord, JobStore
from spotrun.status import JobStatus
from tests.control.conftest import load_event, load_handler

pytestmark = pytest.mark.filterwarnings("ignore:No application metrics")

SAMPLE_JOB_ID = "j-0123456789abcdef0123"  # the job the sample events name


@pytest.fixture
def handler(control_env, lambda_context):
    module = load_handler("handle_execution_ended")
    return lambda event: module.lambda_handler(event, lambda_context)


@pytest.fixture
def running_job(store: JobStore, ec2, subnets) -> str:
    """The sample job, RUNNING, with an instance and an attached checkpoint volume."""
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(
        ImageId=image_id,
        InstanceType="t3.micro",
        MinCount=1,
        MaxCount=1,
        SubnetId=subnets[0],
        TagSpecifications=tags.tag_specifications("instance", tags.resource_tags(SAMPLE_JOB_ID, 1)),
    )["Instances"][0]
    volume = ec2.create_volume(
        AvailabilityZone=instance["Placement"]["AvailabilityZone"],
        Size=1,
        TagSpecifications=tags.tag_specifications(
            "volume", tags.resource_tags(SAMPLE_JOB_ID, 1, **{tags.ROLE: "checkpoint"})
        ),
    )["VolumeId"]
    ec2.attach_volume(VolumeId=volume, InstanceId=instance["InstanceId"], Device="/dev/sdf")
    store.create(
        JobRecord(
            job_id=SAMPLE_JOB_ID,
            status=JobStatus.RUNNING,
            spec={"name": "tiny-lm"},
            current_instance_id=instance["InstanceId"],
            task_token="token",
        )
    )
    return instance["InstanceId"]


def job_resources_left(ec2) -> tuple[list, list]:
    filters = [{"Name": f"tag:{tags.JOB_ID}", "Values": [SAMPLE_JOB_ID]}]
    live = [
        i["InstanceId"]
        for r in ec2.describe_instances(Filters=filters)["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    volumes = [v["VolumeId"] for v in ec2.describe_volumes(Filters=filters)["Volumes"]]
    return live, volumes


@pytest.mark.parametrize(
    ("case", "expected", "reason_part"),
    [
        ("execution_aborted", JobStatus.CANCELLED, "cancelled"),
        ("execution_timed_out", JobStatus.FAILED, "timed out"),
        ("execution_failed", JobStatus.FAILED, "CUDA out of memory"),
    ],
)
def test_handle_execution_ended_releases_and_settles(
    handler, running_job, store, ec2, case, expected, reason_part
):
    # GIVEN a running job with an instance and a volume
    # WHEN its execution ends abnormally
    result = handler(load_event("handle_execution_ended", case))
    # THEN nothing of the job is left and the record is settled with the reason
    assert job_resources_left(ec2) == ([], [])
    record = store.get(SAMPLE_JOB_ID)
    assert record.status is expected
    assert reason_part in record.reason
    assert result["status"] == expected.value
    assert result["release"]["terminated_instances"] == [running_job]


def test_handle_execution_ended_already_terminal_keeps_status(handler, store, ec2):
    # GIVEN a job that finished on its own
    store.create(JobRecord(job_id=SAMPLE_JOB_ID, status=JobStatus.SUCCEEDED, reason="done"))
    # WHEN an abort event arrives late
    result = handler(load_event("handle_execution_ended", "execution_aborted"))
    # THEN the record is unchanged
    assert result["status"] == "SUCCEEDED"
    assert store.get(SAMPLE_JOB_ID).reason == "done"


def test_handle_execution_ended_redelivered_event_is_harmless(handler, running_job, store):
    event = load_event("handle_execution_ended", "execution_failed")
    first, second = handler(event), handler(event)
    assert first["status"] == second["status"] == "FAILED"
    assert second["release"]["terminated_instances"] == []


def test_handle_execution_ended_unknown_job_still_releases(handler, store, ec2):
    result = handler(load_event("handle_execution_ended", "execution_timed_out"))
    assert result["status"] is None
    assert result["job_id"] == SAMPLE_JOB_ID


def test_handle_execution_ended_other_state_machine_is_ignored(handler, running_job, store):
    # GIVEN an event from a state machine that is not ours
    event = load_event("handle_execution_ended", "execution_failed")
    event["detail"]["stateMachineArn"] = (
        "arn:aws:states:us-east-1:123456789012:stateMachine:someone-else"
    )
    # WHEN handled
    result = handler(event)
    # THEN nothing changes
    assert result["ignored"] is True
    assert store.get(SAMPLE_JOB_ID).status is JobStatus.RUNNING


def test_handle_execution_ended_job_id_falls_back_to_execution_name(handler, store):
    event = load_event("handle_execution_ended", "execution_aborted")
    event["detail"]["input"] = None
    store.create(JobRecord(job_id=SAMPLE_JOB_ID, status=JobStatus.RUNNING))
    assert handler(event)["status"] == "CANCELLED"
