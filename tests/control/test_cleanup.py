"""Tests for spotrun.cleanup: releasing a job's EC2 resources, settling, sweeping."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import boto3
import pytest
from botocore.stub import Stubber

from spotrun import tags
from spotrun.cleanup import release_job_resources, settle_ended_execution, sweep_orphans
from spotrun.jobs import JobRecord, JobStore
from spotrun.status import JobStatus

JOB = "j-0000000000000000aaaa"
OTHER = "j-0000000000000000bbbb"


class Fleet:
    """Creates tagged EC2 resources for a job the way the execution side does."""

    def __init__(self, ec2, subnet_id: str) -> None:
        self.ec2 = ec2
        self.subnet_id = subnet_id
        self.image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

    def instance(self, job_id: str, attempt: int = 1, *, managed: bool = True) -> str:
        job_tags = tags.resource_tags(job_id, attempt)
        if not managed:
            del job_tags[tags.MANAGED]
        response = self.ec2.run_instances(
            ImageId=self.image_id,
            InstanceType="t3.micro",
            MinCount=1,
            MaxCount=1,
            SubnetId=self.subnet_id,
            InstanceMarketOptions={"MarketType": "spot"},
            TagSpecifications=tags.tag_specifications("instance", job_tags),
        )
        return response["Instances"][0]["InstanceId"]

    def zone(self, instance_id: str) -> str:
        reservation = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
        return reservation["Instances"][0]["Placement"]["AvailabilityZone"]

    def volume(self, job_id: str, zone: str, *, attach_to: str | None = None, role="checkpoint"):
        volume_id = self.ec2.create_volume(
            AvailabilityZone=zone,
            Size=1,
            TagSpecifications=tags.tag_specifications(
                "volume", tags.resource_tags(job_id, 1, **{tags.ROLE: role})
            ),
        )["VolumeId"]
        if attach_to:
            self.ec2.attach_volume(VolumeId=volume_id, InstanceId=attach_to, Device="/dev/sdf")
        return volume_id

    def snapshot(self, job_id: str, volume_id: str) -> str:
        return self.ec2.create_snapshot(
            VolumeId=volume_id,
            TagSpecifications=tags.tag_specifications(
                "snapshot", tags.resource_tags(job_id, 1, **{tags.ROLE: "checkpoint"})
            ),
        )["SnapshotId"]

    def spot_request(self, job_id: str) -> str:
        return self.ec2.request_spot_instances(
            LaunchSpecification={"ImageId": self.image_id, "InstanceType": "t3.micro"},
            TagSpecifications=tags.tag_specifications(
                "spot-instances-request", tags.resource_tags(job_id)
            ),
        )["SpotInstanceRequests"][0]["SpotInstanceRequestId"]


@pytest.fixture
def fleet(ec2, subnets) -> Fleet:
    return Fleet(ec2, subnets[0])


def instance_state(ec2, instance_id: str) -> str:
    reservation = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    return reservation["Instances"][0]["State"]["Name"]


def volume_ids(ec2) -> set[str]:
    return {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}


def job_snapshots(ec2, job_id: str) -> set[str]:
    response = ec2.describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": f"tag:{tags.JOB_ID}", "Values": [job_id]}]
    )
    return {s["SnapshotId"] for s in response["Snapshots"]}


def test_release_job_resources_removes_everything_of_the_job_only(ec2, fleet: Fleet):
    # GIVEN a job with an instance, an attached and a loose volume, a spot request,
    # and another job's instance and volume, and an unmanaged instance with our job tag
    instance = fleet.instance(JOB)
    zone = fleet.zone(instance)
    attached = fleet.volume(JOB, zone, attach_to=instance)
    loose = fleet.volume(JOB, zone, role="data")
    request = fleet.spot_request(JOB)
    other_instance = fleet.instance(OTHER)
    other_volume = fleet.volume(OTHER, zone, attach_to=other_instance)
    unmanaged = fleet.instance(JOB, managed=False)
    # WHEN the job is released
    report = release_job_resources(JOB, ec2_client=ec2, volume_wait_seconds=0)
    # THEN its instance is terminated, its request cancelled, its volumes deleted
    assert report.terminated_instances == [instance]
    assert instance_state(ec2, instance) == "terminated"
    assert set(report.deleted_volumes) == {attached, loose}
    assert report.complete
    assert volume_ids(ec2) & {attached, loose} == set()
    assert request in report.cancelled_spot_requests
    still_open = ec2.describe_spot_instance_requests(
        Filters=[{"Name": "state", "Values": ["open", "active"]}]
    )["SpotInstanceRequests"]
    assert request not in {r["SpotInstanceRequestId"] for r in still_open}
    # AND nothing of the other job, nor anything unmanaged, was touched
    assert instance_state(ec2, other_instance) == "running"
    assert other_volume in volume_ids(ec2)
    assert instance_state(ec2, unmanaged) == "running"


def test_release_job_resources_twice_is_harmless(ec2, fleet: Fleet):
    instance = fleet.instance(JOB)
    fleet.volume(JOB, fleet.zone(instance), attach_to=instance)
    release_job_resources(JOB, ec2_client=ec2, volume_wait_seconds=0)
    again = release_job_resources(JOB, ec2_client=ec2, volume_wait_seconds=0)
    assert again.terminated_instances == []
    assert again.deleted_volumes == []
    assert again.complete


def test_release_job_resources_keeps_newest_snapshots(ec2, fleet: Fleet):
    # GIVEN three checkpoint snapshots of the job, taken one after another
    volume = fleet.volume(JOB, "us-east-1a")
    snapshots = [fleet.snapshot(JOB, volume) for _ in range(3)]
    # moto stamps them within the same second; make their order explicit.
    start = {s: datetime(2026, 12, 4, 10, i, tzinfo=UTC) for i, s in enumerate(snapshots)}

    def stamp(parsed, **_):
        for snapshot in parsed.get("Snapshots", []):
            snapshot["StartTime"] = start.get(snapshot["SnapshotId"], snapshot["StartTime"])

    ec2.meta.events.register("after-call.ec2.DescribeSnapshots", stamp)
    # WHEN released keeping two
    report = release_job_resources(JOB, ec2_client=ec2, keep_snapshots=2, volume_wait_seconds=0)
    # THEN the oldest is deleted and the newest two stay
    assert report.deleted_snapshots == [snapshots[0]]
    assert set(report.kept_snapshots) == set(snapshots[1:])
    assert job_snapshots(ec2, JOB) == set(snapshots[1:])


def test_release_job_resources_detaches_with_instance_id(ec2, fleet: Fleet):
    # GIVEN a volume EC2 still shows attached (on AWS it stays attached until the
    # instance has finished terminating; moto detaches at once, so we show it attached)
    instance = fleet.instance(JOB)
    volume = fleet.volume(JOB, fleet.zone(instance))
    detach_calls = []

    def still_attached(parsed, **_):
        for item in parsed.get("Volumes", []):
            if item["VolumeId"] == volume and not detach_calls:
                item["State"] = "in-use"
                item["Attachments"] = [{"InstanceId": instance, "State": "attached"}]

    def record_detach(params, **_):
        detach_calls.append(dict(params))

    def answer_detach(**_):
        # Answer for moto, whose volume is not attached any more: a 200, empty.
        return SimpleNamespace(status_code=200, headers={}), {}

    ec2.meta.events.register("after-call.ec2.DescribeVolumes", still_attached)
    ec2.meta.events.register("provide-client-params.ec2.DetachVolume", record_detach)
    ec2.meta.events.register("before-call.ec2.DetachVolume", answer_detach)
    # WHEN released
    report = release_job_resources(JOB, ec2_client=ec2, volume_wait_seconds=0)
    # THEN the detach was forced and named the instance (moto crashes without it)
    assert detach_calls[0]["VolumeId"] == volume
    assert detach_calls[0]["InstanceId"] == instance
    assert detach_calls[0]["Force"] is True
    assert volume in report.deleted_volumes


def test_release_job_resources_volume_still_detaching_is_pending(ec2, fleet: Fleet):
    # GIVEN EC2 reports the volume in use when we try to delete it
    instance = fleet.instance(JOB)
    volume = fleet.volume(JOB, fleet.zone(instance))
    stub = Stubber(ec2)
    stub.add_response("describe_instances", {"Reservations": []})
    stub.add_response("describe_spot_instance_requests", {"SpotInstanceRequests": []})
    stub.add_response(
        "describe_volumes",
        {"Volumes": [{"VolumeId": volume, "State": "in-use", "Attachments": []}]},
    )
    stub.add_client_error("delete_volume", "VolumeInUse", http_status_code=400)
    stub.add_response("describe_snapshots", {"Snapshots": []})
    # WHEN released without waiting
    with stub:
        report = release_job_resources(JOB, ec2_client=ec2, volume_wait_seconds=0)
    # THEN the volume is reported pending for the next run
    assert report.pending_volumes == [volume]
    assert not report.complete


@pytest.mark.parametrize(
    ("execution_status", "expected", "reason_part"),
    [
        ("ABORTED", JobStatus.CANCELLED, "cancelled"),
        ("TIMED_OUT", JobStatus.FAILED, "timed out"),
        ("FAILED", JobStatus.FAILED, "Trainer.Failed"),
    ],
)
def test_settle_ended_execution_releases_and_settles(
    ec2, fleet: Fleet, store: JobStore, execution_status, expected, reason_part
):
    # GIVEN a running job with an instance
    instance = fleet.instance(JOB)
    store.create(
        JobRecord(
            job_id=JOB,
            status=JobStatus.RUNNING,
            task_token="token",
            current_instance_id=instance,
        )
    )
    # WHEN its execution ends abnormally
    result = settle_ended_execution(
        job_id=JOB,
        execution_status=execution_status,
        error="Trainer.Failed" if execution_status == "FAILED" else None,
        cause="boom" if execution_status == "FAILED" else None,
        store=store,
        ec2_client=ec2,
    )
    # THEN the instance is gone and the record settled with the reason
    assert instance_state(ec2, instance) == "terminated"
    record = store.get(JOB)
    assert record.status is expected
    assert reason_part in record.reason
    assert record.task_token is None and record.current_instance_id is None
    assert result["status"] == expected.value


def test_settle_ended_execution_announces_the_outcome_once(ec2, store: JobStore):
    # GIVEN a running job and an outcomes topic with a queue subscribed
    sns = boto3.client("sns", region_name="us-east-1")
    sqs = boto3.client("sqs", region_name="us-east-1")
    topic = sns.create_topic(Name="outcomes")["TopicArn"]
    url = sqs.create_queue(QueueName="outbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn["Attributes"]["QueueArn"])
    store.create(JobRecord(job_id=JOB, status=JobStatus.RUNNING))
    # WHEN its execution is aborted, and the event is delivered twice
    for _ in range(2):
        settle_ended_execution(
            job_id=JOB,
            execution_status="ABORTED",
            error=None,
            cause=None,
            store=store,
            ec2_client=ec2,
            sns_client=sns,
            topic_arn=topic,
        )
    # THEN subscribers hear of the cancellation once
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
    assert len(messages) == 1
    outcome = json.loads(json.loads(messages[0]["Body"])["Message"])
    assert (outcome["job_id"], outcome["status"]) == (JOB, "CANCELLED")


def test_settle_ended_execution_keeps_a_terminal_status(ec2, store: JobStore):
    store.create(JobRecord(job_id=JOB, status=JobStatus.SUCCEEDED, reason="done"))
    result = settle_ended_execution(
        job_id=JOB, execution_status="FAILED", error="x", cause=None, store=store, ec2_client=ec2
    )
    assert result["status"] == "SUCCEEDED"
    assert store.get(JOB).reason == "done"


def test_settle_ended_execution_ignores_other_statuses(ec2, store: JobStore):
    store.create(JobRecord(job_id=JOB, status=JobStatus.RUNNING))
    result = settle_ended_execution(
        job_id=JOB,
        execution_status="SUCCEEDED",
        error=None,
        cause=None,
        store=store,
        ec2_client=ec2,
    )
    assert result["ignored"] is True
    assert store.get(JOB).status is JobStatus.RUNNING


def test_sweep_orphans_releases_terminal_and_old_missing_jobs_only(
    ec2, fleet: Fleet, store: JobStore
):
    # GIVEN resources of a failed job, a running job, and a job with no record
    failed, running, missing = "j-000000000000000000f1", "j-000000000000000000f2", OTHER
    store.create(JobRecord(job_id=failed, status=JobStatus.FAILED))
    store.create(JobRecord(job_id=running, status=JobStatus.RUNNING))
    failed_instance = fleet.instance(failed)
    running_instance = fleet.instance(running)
    missing_instance = fleet.instance(missing)
    missing_volume = fleet.volume(missing, fleet.zone(missing_instance))
    # WHEN swept now: the missing job's resources are younger than the grace period
    young = sweep_orphans(store=store, ec2_client=ec2, grace_seconds=900)
    # THEN only the failed job is released
    assert [r["job_id"] for r in young["released"]] == [failed]
    assert instance_state(ec2, failed_instance) == "terminated"
    assert young["within_grace"] == [missing]
    assert young["active_jobs"] == [running]
    # AND WHEN swept after the grace period, the missing job's resources go too
    later = datetime.now(UTC) + timedelta(hours=1)
    old = sweep_orphans(store=store, ec2_client=ec2, grace_seconds=900, now=later)
    assert [r["job_id"] for r in old["released"]] == [missing]
    assert old["released"][0]["record"] == "missing"
    assert instance_state(ec2, missing_instance) == "terminated"
    assert missing_volume not in volume_ids(ec2)
    assert instance_state(ec2, running_instance) == "running"


def test_sweep_orphans_leaves_retained_snapshots_alone(ec2, fleet: Fleet, store: JobStore):
    # GIVEN a finished job whose only leftover is its one retained snapshot
    store.create(JobRecord(job_id=JOB, status=JobStatus.SUCCEEDED))
    volume = fleet.volume(JOB, "us-east-1a")
    snapshot = fleet.snapshot(JOB, volume)
    ec2.delete_volume(VolumeId=volume)
    # WHEN swept
    result = sweep_orphans(store=store, ec2_client=ec2)
    # THEN nothing is released and the snapshot stays
    assert result["released"] == []
    assert job_snapshots(ec2, JOB) == {snapshot}
