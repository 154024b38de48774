"""EBS volumes of an attempt: the checkpoint volume and the data volume, created and attached.

The checkpoint volume is, in order of preference: the previous attempt's volume
when it is in the AZ the new instance landed in (no copy at all), a volume
restored from the checkpoint snapshot, or a new empty one on the first attempt.
The data volume is restored from the dataset snapshot. Volumes are encrypted
gp3 and tagged like everything spotrun creates, so IAM and the sweeper know them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from spotrun import tags
from spotrun.attempts import save_checkpoint
from spotrun.errors import JobConflictError, JobInvalid
from spotrun.jobs import JobStore
from spotrun.spec import JobSpec
from spotrun.status import JobStatus

CHECKPOINT = "checkpoint"
DATA = "data"
CHECKPOINT_DEVICE = "/dev/sdf"
DATA_DEVICE = "/dev/sdg"
CHECKPOINT_MOUNT_POINT = "/mnt/spotrun/checkpoint"
DEFAULT_DATA_SIZE_GIB = 100
# Waiters: a fresh volume takes seconds; a snapshot of a big checkpoint volume
# may take minutes, and the Lambda timeout (900 s) bounds everything.
_VOLUME_WAIT = {"Delay": 3, "MaxAttempts": 60}
_SNAPSHOT_WAIT = {"Delay": 10, "MaxAttempts": 80}
_INSTANCE_WAIT = {"Delay": 5, "MaxAttempts": 36}


def prepare_volumes(
    job_id: str,
    attempt: int,
    instance_id: str,
    availability_zone: str,
    *,
    store: JobStore,
    ec2_client: Any,
) -> list[dict[str, Any]]:
    """Create (or reuse) and attach the attempt's volumes; return the ticket's ``volumes``."""
    record = store.get(job_id)
    if record.status.is_terminal():
        raise JobInvalid(f"job {job_id} is {record.status.value}")
    spec = JobSpec.model_validate(record.spec)
    volume_tags = {"user": spec.tags, "attempt": attempt}
    # attach_volume refuses an instance that is still "pending".
    ec2_client.get_waiter("instance_running").wait(
        InstanceIds=[instance_id], WaiterConfig=_INSTANCE_WAIT
    )

    checkpoint = dict(record.checkpoint or {})
    checkpoint_volume_id = _reusable_volume(checkpoint, availability_zone, ec2_client=ec2_client)
    if checkpoint_volume_id:
        ec2_client.create_tags(
            Resources=[checkpoint_volume_id],
            Tags=tags.as_tag_list({tags.ATTEMPT: str(attempt)}),
        )
    else:
        checkpoint_volume_id = _create_volume(
            job_id,
            role=CHECKPOINT,
            availability_zone=availability_zone,
            size_gib=spec.checkpoint.volume_size_gib,
            snapshot_id=checkpoint.get("snapshot_id"),
            client_token=f"{job_id}-{attempt}-{CHECKPOINT}",
            ec2_client=ec2_client,
            **volume_tags,
        )
    volumes = [
        {
            "role": CHECKPOINT,
            "volume_id": checkpoint_volume_id,
            "device": CHECKPOINT_DEVICE,
            "mount_point": CHECKPOINT_MOUNT_POINT,
            # A restored or reused volume has a file system; only a blank one is formatted.
            "format_if_empty": True,
            "read_only": False,
        }
    ]
    if spec.dataset is not None and spec.dataset.snapshot_id:
        data_volume_id = _create_volume(
            job_id,
            role=DATA,
            availability_zone=availability_zone,
            size_gib=spec.dataset.volume_size_gib,
            snapshot_id=spec.dataset.snapshot_id,
            client_token=f"{job_id}-{attempt}-{DATA}",
            ec2_client=ec2_client,
            **volume_tags,
        )
        volumes.append(
            {
                "role": DATA,
                "volume_id": data_volume_id,
                "device": DATA_DEVICE,
                "mount_point": spec.dataset.mount_point,
                "format_if_empty": False,
                "read_only": True,
            }
        )

    ids = [volume["volume_id"] for volume in volumes]
    ec2_client.get_waiter("volume_available").wait(VolumeIds=ids, WaiterConfig=_VOLUME_WAIT)
    for volume in volumes:
        _attach(volume["volume_id"], instance_id, volume["device"], ec2_client=ec2_client)

    checkpoint.update(volume_id=checkpoint_volume_id, availability_zone=availability_zone)
    _record_volumes(store, record, attempt, checkpoint, volumes)
    return volumes


def _reusable_volume(
    checkpoint: Mapping[str, Any], availability_zone: str, *, ec2_client: Any
) -> str | None:
    volume_id = checkpoint.get("volume_id")
    if not volume_id or checkpoint.get("availability_zone") != availability_zone:
        return None
    try:
        found = ec2_client.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "InvalidVolume.NotFound":
            return None
        raise
    if found and found[0]["State"] == "available":
        return volume_id
    return None


def _create_volume(
    job_id: str,
    *,
    role: str,
    availability_zone: str,
    size_gib: int | None,
    snapshot_id: str | None,
    client_token: str,
    ec2_client: Any,
    user: Mapping[str, str],
    attempt: int,
) -> str:
    request: dict[str, Any] = {
        "AvailabilityZone": availability_zone,
        "VolumeType": "gp3",
        "Encrypted": True,
        # Same token on a Lambda retry -> the same volume, not a second one.
        "ClientToken": client_token[:64],
        "TagSpecifications": tags.tag_specifications(
            "volume", tags.resource_tags(job_id, attempt, user, **{tags.ROLE: role})
        ),
    }
    if snapshot_id:
        # A volume restored from a snapshot before that snapshot completes would be
        # refused; checkpoint snapshots are started by preserve_checkpoint without waiting.
        ec2_client.get_waiter("snapshot_completed").wait(
            SnapshotIds=[snapshot_id], WaiterConfig=_SNAPSHOT_WAIT
        )
        request["SnapshotId"] = snapshot_id
        if size_gib:
            snapshot = ec2_client.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
            request["Size"] = max(int(size_gib), int(snapshot["VolumeSize"]))
    else:
        request["Size"] = int(size_gib or DEFAULT_DATA_SIZE_GIB)
    return ec2_client.create_volume(**request)["VolumeId"]


def _attach(volume_id: str, instance_id: str, device: str, *, ec2_client: Any) -> None:
    volume = ec2_client.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    if any(a.get("InstanceId") == instance_id for a in volume.get("Attachments", [])):
        return  # a retried invocation already attached it
    ec2_client.attach_volume(VolumeId=volume_id, InstanceId=instance_id, Device=device)


def _record_volumes(
    store: JobStore,
    record: Any,
    attempt: int,
    checkpoint: dict[str, Any],
    volumes: list[dict[str, Any]],
) -> None:
    attempts = [dict(entry) for entry in record.attempts]
    for entry in attempts:
        if entry.get("attempt") == attempt:
            entry["volumes"] = [
                {"role": volume["role"], "volume_id": volume["volume_id"]} for volume in volumes
            ]
    # Same step, new location: commit_checkpoint accepts an equal step.
    save_checkpoint(store, record.job_id, checkpoint)
    try:
        store.update(
            record.job_id,
            set={"attempts": attempts},
            expect_status=[s for s in JobStatus if not s.is_terminal()],
        )
    except JobConflictError:
        raise JobInvalid(f"job {record.job_id} ended while its volumes were prepared") from None
