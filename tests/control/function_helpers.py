"""Fixtures and builders shared by the per-function tests of the execution side."""

from __future__ import annotations

import json
from typing import Any

from spotrun import aws, tags
from spotrun.jobs import JobRecord, JobStore
from spotrun.spec import SpecDefaults, parse_spec
from spotrun.status import JobStatus
from tests.control.conftest import load_event

JOB_ID = "j-0123456789abcdef0123"  # the job id of every sample in events/
IMAGE_ID = "ami-03cf127a"  # one of moto's preloaded AMIs


def sample(function: str, case: str, **overrides: Any) -> dict[str, Any]:
    """An events/ sample with the ids of this test's moto resources put in."""
    event = load_event(function, case)
    event.update(overrides)
    return event


def create_job(
    store: JobStore, job_id: str = JOB_ID, *, status: JobStatus = JobStatus.SUBMITTED, **spec: Any
) -> JobRecord:
    parsed = parse_spec({"name": "tiny-lm", **spec}, defaults=SpecDefaults.from_env())
    record = JobRecord(job_id=job_id, status=status, spec=parsed.to_record())
    assert store.create(record)
    return record


def launch(ec2: Any, subnet_id: str, job_id: str = JOB_ID, attempt: int = 1) -> str:
    """A running instance tagged as an attempt of ``job_id``."""
    reservation = ec2.run_instances(
        ImageId=IMAGE_ID,
        MinCount=1,
        MaxCount=1,
        InstanceType="g5.xlarge",
        SubnetId=subnet_id,
        TagSpecifications=tags.tag_specifications("instance", tags.resource_tags(job_id, attempt)),
    )
    return reservation["Instances"][0]["InstanceId"]


def open_attempt(
    store: JobStore, instance_id: str, *, subnet_id: str, zone: str, attempt: int = 1
) -> None:
    store.update(
        JOB_ID,
        set={"status": JobStatus.RUNNING, "current_instance_id": instance_id},
        append={
            "attempts": [
                {
                    "attempt": attempt,
                    "instance_id": instance_id,
                    "instance_type": "g5.xlarge",
                    "availability_zone": zone,
                    "subnet_id": subnet_id,
                    "market": "spot",
                    "price_per_hour": 0.5,
                    "started_at": "2026-12-04T09:00:00.000000Z",
                    "ended_at": None,
                    "outcome": None,
                    "cost_usd": None,
                }
            ]
        },
    )


def start_attempt(store: JobStore, ec2: Any, subnet_id: str, zone: str = "us-east-1a") -> str:
    """A running first attempt of the job: its instance, recorded on the record."""
    instance_id = launch(ec2, subnet_id)
    open_attempt(store, instance_id, subnet_id=subnet_id, zone=zone)
    return instance_id


def job_volume(ec2: Any, zone: str, role: str, job_id: str = JOB_ID) -> str:
    return ec2.create_volume(
        AvailabilityZone=zone,
        Size=10,
        TagSpecifications=tags.tag_specifications(
            "volume", tags.resource_tags(job_id, 1, **{tags.ROLE: role})
        ),
    )["VolumeId"]


def refuse_every_fleet() -> None:
    """Make the functions' EC2 client see instant fleets with no capacity anywhere."""
    from botocore.awsrequest import AWSResponse

    def no_capacity(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        return AWSResponse("https://ec2.local", 200, {}, None), {
            "FleetId": "fleet-00000000-0000-0000-0000-000000000000",
            "Instances": [],
            "Errors": [
                {
                    "ErrorCode": "InsufficientInstanceCapacity",
                    "ErrorMessage": "no capacity",
                    "Lifecycle": "spot",
                }
            ],
            "ResponseMetadata": {"RequestId": "injected", "HTTPStatusCode": 200},
        }

    aws.client("ec2").meta.events.register("before-call.ec2.CreateFleet", no_capacity)


def ticket(s3: Any, bucket: str, instance_id: str) -> dict[str, Any]:
    body = s3.get_object(Bucket=bucket, Key=f"tickets/{instance_id}.json")["Body"].read()
    return json.loads(body)
