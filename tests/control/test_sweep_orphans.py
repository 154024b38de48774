"""Tests for functions/sweep_orphans: the scheduled release of what ended jobs left."""

from __future__ import annotations

import pytest

from spotrun import tags
from spotrun.jobs import JobRecord
from spotrun.status import JobStatus
from tests.control.conftest import load_event, load_handler


@pytest.fixture
def handler(control_env, lambda_context):
    module = load_handler("sweep_orphans")
    return lambda event: module.lambda_handler(event, lambda_context)


def launch(ec2, subnet_id: str, job_id: str) -> str:
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return ec2.run_instances(
        ImageId=image_id,
        InstanceType="t3.micro",
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet_id,
        TagSpecifications=tags.tag_specifications("instance", tags.resource_tags(job_id, 1)),
    )["Instances"][0]["InstanceId"]


def state(ec2, instance_id: str) -> str:
    reservation = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    return reservation["Instances"][0]["State"]["Name"]


def test_sweep_orphans_scheduled_event_releases_ended_jobs(handler, store, ec2, subnets):
    # GIVEN an instance of a cancelled job and one of a running job
    store.create(JobRecord(job_id="j-000000000000000000c1", status=JobStatus.CANCELLED))
    store.create(JobRecord(job_id="j-000000000000000000c2", status=JobStatus.RUNNING))
    cancelled = launch(ec2, subnets[0], "j-000000000000000000c1")
    running = launch(ec2, subnets[1], "j-000000000000000000c2")
    # WHEN the schedule fires
    result = handler(load_event("sweep_orphans", "scheduled"))
    # THEN the cancelled job's instance is terminated and the running one is left
    assert [r["job_id"] for r in result["released"]] == ["j-000000000000000000c1"]
    assert state(ec2, cancelled) == "terminated"
    assert state(ec2, running) == "running"
    assert result["active_jobs"] == ["j-000000000000000000c2"]


@pytest.mark.filterwarnings("ignore:No application metrics")
def test_sweep_orphans_nothing_to_do(handler, store):
    result = handler(load_event("sweep_orphans", "scheduled"))
    assert result == {
        "released": [],
        "active_jobs": [],
        "within_grace": [],
        "untagged_resources": 0,
    }
