"""The attempt's ticket (``tickets/<instance_id>.json``): everything the instance needs to train.

The bootstrap and the trainer read only the ticket, never the job table, so this
module is the whole interface between the control plane and the instance. Shape:
docs/contracts.md, "Ticket".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from spotrun.errors import JobConflictError, JobInvalid
from spotrun.jobs import JobRecord, JobStore
from spotrun.spec import JobSpec
from spotrun.status import JobStatus

TICKET_VERSION = 1
NOTICE_POLL_SECONDS = 2


def ticket_key(instance_id: str) -> str:
    """The ticket's key in the jobs bucket."""
    return f"tickets/{instance_id}.json"


def checkpoint_s3_uri(spec: JobSpec, job_id: str, bucket: str) -> str | None:
    """Where the checkpoint store is mirrored, or None without a mirror."""
    if not spec.checkpoint.s3_mirror:
        return None
    if spec.checkpoint.s3_uri:
        return spec.checkpoint.s3_uri.rstrip("/") + "/"
    return f"s3://{bucket}/checkpoints/{job_id}/"


def model_uri(job_id: str, bucket: str) -> str:
    """Where the trainer uploads the final model."""
    return f"s3://{bucket}/models/{job_id}/model.pt"


def heartbeat_interval(heartbeat_timeout_seconds: int) -> int:
    """About a third of the timeout, so two heartbeats may be lost before it fires."""
    return max(1, int(heartbeat_timeout_seconds) // 3)


def build_ticket(
    record: JobRecord,
    *,
    attempt: int,
    instance_id: str,
    volumes: Sequence[Mapping[str, Any]],
    task_token: str,
    heartbeat_timeout_seconds: int,
    bucket: str,
    region: str,
) -> dict[str, Any]:
    """The ticket of one attempt, from the record and what the state machine passes."""
    spec = JobSpec.model_validate(record.spec)
    checkpoint_step = (record.checkpoint or {}).get("step")
    checkpoint_volume = next((v for v in volumes if v.get("role") == "checkpoint"), None)
    if spec.dataset is None:
        dataset = None
    elif spec.dataset.snapshot_id:
        dataset = {"mount_point": spec.dataset.mount_point}
    else:
        dataset = {"s3_uri": spec.dataset.s3_uri}
    return {
        "ticket_version": TICKET_VERSION,
        "job_id": record.job_id,
        "attempt": int(attempt),
        "instance_id": instance_id,
        "region": region,
        "task_token": task_token,
        "image": spec.image,
        "command": list(spec.command),
        "environment": dict(spec.environment),
        "volumes": [
            {
                "role": volume["role"],
                "volume_id": volume["volume_id"],
                "device": volume["device"],
                "mount_point": volume["mount_point"],
                "format_if_empty": bool(volume["format_if_empty"]),
                "read_only": bool(volume["read_only"]),
            }
            for volume in volumes
        ],
        "dataset": dataset,
        "resume": {
            # Any attempt after the first resumes: the store on the volume (or in S3)
            # may hold a newer checkpoint than the control plane heard of.
            "enabled": int(attempt) > 1 or checkpoint_step is not None,
            "checkpoint_step": checkpoint_step,
        },
        "checkpoint": {
            "dir": checkpoint_volume["mount_point"] if checkpoint_volume else None,
            "s3_uri": checkpoint_s3_uri(spec, record.job_id, bucket),
            "interval": spec.checkpoint.interval,
            "keep": spec.checkpoint.keep,
            "expected_interruption_seconds": spec.checkpoint.expected_interruption_seconds,
            # spot interruptions so far, for the "auto" interval's estimate of the time
            # between them (restarts after Trainer.Failed are not interruptions)
            "interruptions_seen": record.interruptions,
        },
        "output": {"model_uri": model_uri(record.job_id, bucket)},
        "heartbeat_seconds": heartbeat_interval(heartbeat_timeout_seconds),
        "notice_poll_seconds": NOTICE_POLL_SECONDS,
    }


def start_trainer(
    job_id: str,
    *,
    attempt: int,
    instance_id: str,
    volumes: Sequence[Mapping[str, Any]],
    task_token: str,
    heartbeat_timeout_seconds: int,
    store: JobStore,
    s3_client: Any,
    bucket: str,
    region: str,
) -> dict[str, Any]:
    """Store the task token on the record, then write the ticket (the "Run Trainer" state).

    The token goes on the record first: once the ticket exists the trainer may
    start and the instance may be lost, and the event functions need the token
    to fail the task with ``Instance.Lost``.
    """
    record = store.get(job_id)
    try:
        record = store.update(
            job_id,
            set={
                "task_token": task_token,
                "current_instance_id": instance_id,
                "status": JobStatus.RUNNING,
            },
            expect_status=[s for s in JobStatus if not s.is_terminal()],
        )
    except JobConflictError:
        raise JobInvalid(f"job {job_id} ended before its trainer started") from None
    ticket = build_ticket(
        record,
        attempt=attempt,
        instance_id=instance_id,
        volumes=volumes,
        task_token=task_token,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        bucket=bucket,
        region=region,
    )
    key = ticket_key(instance_id)
    s3_client.put_object(
        Bucket=bucket,
        Key=key,
        Body=json.dumps(ticket, indent=2).encode("utf-8"),
        ContentType="application/json",
        ServerSideEncryption="AES256",
    )
    return {"ticket_uri": f"s3://{bucket}/{key}", "attempt": int(attempt)}
