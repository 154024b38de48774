"""PrepareVolumesFunction and spotrun.volumes: create, restore or reuse, then attach."""

from __future__ import annotations

from typing import Any

import pytest

from spotrun.jobs import JobStore
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


def volume(ec2: Any, volume_id: str) -> dict[str, Any]:
    return ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]


def test_prepare_volumes_first_attempt_blank_checkpoint_and_dataset(
    execution_env: dict, store: JobStore, ec2: Any, subnets: list[str], lambda_context: Any
) -> None:
    # GIVEN a job with a dataset snapshot and its first instance
    source = ec2.create_volume(AvailabilityZone="us-east-1b", Size=20)["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=source)["SnapshotId"]
    create_job(store, dataset={"snapshot_id": snapshot})
    instance_id = launch(ec2, subnets[0])
    open_attempt(store, instance_id, subnet_id=subnets[0], zone="us-east-1a")

    # WHEN the volumes are prepared
    result = load_handler("prepare_volumes").lambda_handler(
        sample("prepare_volumes", "first_attempt", instance_id=instance_id), lambda_context
    )

    # THEN a blank checkpoint volume and a data volume from the snapshot, attached
    checkpoint, data = result["volumes"]
    assert checkpoint["role"] == "checkpoint" and checkpoint["device"] == "/dev/sdf"
    assert data == {**data, "role": "data", "device": "/dev/sdg", "read_only": True}
    for entry, size in ((checkpoint, 50), (data, 20)):
        described = volume(ec2, entry["volume_id"])
        assert described["Encrypted"] and described["VolumeType"] == "gp3"
        assert described["Size"] == size and described["AvailabilityZone"] == "us-east-1a"
        assert described["Attachments"][0]["InstanceId"] == instance_id
        found = {t["Key"]: t["Value"] for t in described["Tags"]}
        assert found["spotrun:job-id"] == JOB_ID and found["spotrun:role"] == entry["role"]
    assert volume(ec2, data["volume_id"])["SnapshotId"] == snapshot
    record = store.get(JOB_ID)
    assert record.checkpoint == {
        **record.checkpoint,
        "volume_id": checkpoint["volume_id"],
        "availability_zone": "us-east-1a",
    }
    assert record.attempts[0]["volumes"][0]["volume_id"] == checkpoint["volume_id"]


def test_prepare_volumes_reuses_the_checkpoint_volume_in_the_same_zone(
    execution_env: dict, store: JobStore, ec2: Any, subnets: list[str], lambda_context: Any
) -> None:
    create_job(store)
    kept = ec2.create_volume(AvailabilityZone="us-east-1a", Size=50)["VolumeId"]
    store.commit_checkpoint(
        JOB_ID, {"step": 120, "volume_id": kept, "availability_zone": "us-east-1a"}
    )
    instance_id = launch(ec2, subnets[0], attempt=2)

    result = load_handler("prepare_volumes").lambda_handler(
        sample("prepare_volumes", "first_attempt", attempt=2, instance_id=instance_id),
        lambda_context,
    )

    assert [v["volume_id"] for v in result["volumes"]] == [kept]
    assert store.get(JOB_ID).checkpoint["step"] == 120


def test_prepare_volumes_restores_the_checkpoint_snapshot_in_another_zone(
    execution_env: dict, store: JobStore, ec2: Any, subnets: list[str], lambda_context: Any
) -> None:
    create_job(store)
    old = ec2.create_volume(AvailabilityZone="us-east-1a", Size=50)["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=old)["SnapshotId"]
    store.commit_checkpoint(
        JOB_ID,
        {"step": 40, "volume_id": old, "snapshot_id": snapshot, "availability_zone": "us-east-1a"},
    )
    instance_id = launch(ec2, subnets[1], attempt=2)

    result = load_handler("prepare_volumes").lambda_handler(
        sample(
            "prepare_volumes",
            "first_attempt",
            attempt=2,
            instance_id=instance_id,
            availability_zone="us-east-1b",
        ),
        lambda_context,
    )

    (checkpoint,) = result["volumes"]
    restored = volume(ec2, checkpoint["volume_id"])
    assert checkpoint["volume_id"] != old
    assert restored["SnapshotId"] == snapshot and restored["AvailabilityZone"] == "us-east-1b"
    assert store.get(JOB_ID).checkpoint["volume_id"] == checkpoint["volume_id"]
