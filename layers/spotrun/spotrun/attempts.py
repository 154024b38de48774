"""The end of an attempt: preserve its checkpoint, then release what it held.

Order of operations after the trainer stops (interrupted, lost, failed, done):

1. :func:`preserve_checkpoint` learns the committed step (the trainer's report,
   else the S3 mirror's ``LATEST``), commits it on the record (never backwards),
   and chooses how the checkpoint crosses to the next attempt: the same volume
   when every candidate subnet is in this AZ, else a snapshot (started, not
   awaited; ``prepare_volumes`` waits for it only if it needs it).
2. :func:`release_attempt` terminates the instance, detaches and deletes every
   volume of the job except those kept, closes the attempt on the record (end
   time, outcome, cost) and answers "Can We Relaunch?" (``spotrun.budget``).

Both are idempotent: Step Functions retries them, and a second run finds the
instance terminated, the volumes gone and the attempt already closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from spotrun import budget, pricing, tags
from spotrun.errors import JobConflictError, JobInvalid
from spotrun.jobs import JobRecord, JobStore, utc_now
from spotrun.spec import JobSpec
from spotrun.status import JobStatus
from spotrun.tickets import checkpoint_s3_uri

_NOT_TERMINAL = [s for s in JobStatus if not s.is_terminal()]
_ALIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
_VOLUME_WAIT = {"Delay": 5, "MaxAttempts": 36}

# Caught error -> attempt outcome. A Run Trainer timeout is the deadline/cost limit
# on AWS, but also moto's name for a heartbeat timeout: budget.verdict tells them
# apart by checking the limits.
_OUTCOME_OF_ERROR = {
    "Spot.Interrupted": budget.INTERRUPTED,
    "Instance.Lost": budget.INTERRUPTED,
    "States.HeartbeatTimeout": budget.INTERRUPTED,
    "States.Timeout": budget.TIMED_OUT,
    "Trainer.Failed": budget.RESTART,
}


def parse_cause(cause: Any) -> dict[str, Any]:
    """A caught error's ``Cause`` as a dict: JSON from the trainer, Lambda's error JSON, or text."""
    if isinstance(cause, Mapping):
        return dict(cause)
    if not isinstance(cause, str) or not cause:
        return {}
    try:
        parsed = json.loads(cause)
    except ValueError:
        return {"message": cause}
    return parsed if isinstance(parsed, dict) else {"message": cause}


def preserve_checkpoint(
    job_id: str,
    *,
    attempt: int,
    instance_id: str,
    availability_zone: str,
    volumes: Sequence[Mapping[str, Any]],
    failure: Mapping[str, Any],
    store: JobStore,
    ec2_client: Any,
    s3_client: Any,
    bucket: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Keep the checkpoint for the next attempt and count what happened to this one."""
    now = now or datetime.now(UTC)
    record = store.get(job_id)
    if record.status.is_terminal():
        raise JobInvalid(f"job {job_id} is {record.status.value}")
    spec = JobSpec.model_validate(record.spec)
    error = str(failure.get("Error") or "")
    cause = parse_cause(failure.get("Cause"))
    outcome = _OUTCOME_OF_ERROR.get(error, budget.INTERRUPTED)
    if (
        outcome == budget.TIMED_OUT
        and budget.exhausted(record, spec, now=now, open_cost_usd=_open_cost(record, now)) is None
    ):
        outcome = budget.INTERRUPTED  # moto's heartbeat timeout, not a limit

    stored = dict(record.checkpoint or {})
    step = _committed_step(cause, stored, spec, job_id, bucket, s3_client=s3_client)
    checkpoint_volume = next((v for v in volumes if v.get("role") == "checkpoint"), None)
    keep: list[str] = []
    snapshot_id = stored.get("snapshot_id")
    volume_id = None
    if checkpoint_volume is not None:
        zones = _subnet_zones(spec.subnets, ec2_client=ec2_client)
        if zones == {availability_zone}:
            volume_id = checkpoint_volume["volume_id"]
            keep = [volume_id]
        else:
            snapshot_id = _start_snapshot(
                checkpoint_volume["volume_id"], job_id, attempt, step, spec, ec2_client=ec2_client
            )
    checkpoint = {
        "step": step,
        "volume_id": volume_id,
        "snapshot_id": snapshot_id,
        "availability_zone": availability_zone if volume_id else None,
        "s3_uri": checkpoint_s3_uri(spec, job_id, bucket),
    }
    save_checkpoint(store, job_id, checkpoint)
    record = store.get(job_id)
    step = (record.checkpoint or {}).get("step", step)

    attempts = [dict(entry) for entry in record.attempts]
    for entry in attempts:
        if entry.get("attempt") == attempt and not entry.get("outcome"):
            entry["outcome"] = outcome
            entry["error"] = _error_text(error, cause)
    counters = {"interruptions": 1} if outcome == budget.INTERRUPTED else {}
    if outcome == budget.RESTART:
        counters = {"restarts_on_error": 1}
    try:
        store.update(
            job_id,
            set={"attempts": attempts, "status": JobStatus.INTERRUPTED, "task_token": None},
            add=counters,
            expect_status=_NOT_TERMINAL,
        )
    except JobConflictError:
        raise JobInvalid(f"job {job_id} ended while its checkpoint was preserved") from None
    return {"outcome": outcome, "checkpoint_step": step, "keep_volume_ids": keep}


def save_checkpoint(store: JobStore, job_id: str, checkpoint: Mapping[str, Any]) -> None:
    """Record where the checkpoint lives; with a step, through the never-backwards commit."""
    if isinstance(checkpoint.get("step"), int):
        store.commit_checkpoint(job_id, checkpoint)
    else:
        # No step known yet (nothing committed): only the location is news.
        store.update(job_id, set={"checkpoint": dict(checkpoint)})


def _committed_step(
    cause: Mapping[str, Any],
    stored: Mapping[str, Any],
    spec: JobSpec,
    job_id: str,
    bucket: str,
    *,
    s3_client: Any,
) -> int | None:
    """The newest step known committed: the report, the S3 mirror's pointer, the record."""
    candidates = [cause.get("checkpoint_step"), stored.get("step")]
    uri = checkpoint_s3_uri(spec, job_id, bucket)
    if uri and cause.get("checkpoint_step") is None:
        candidates.append(_mirror_step(uri, s3_client=s3_client))
    steps = [c for c in candidates if isinstance(c, int) and not isinstance(c, bool) and c >= 0]
    return max(steps) if steps else None


def _mirror_step(uri: str, *, s3_client: Any) -> int | None:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    try:
        body = s3_client.get_object(Bucket=bucket, Key=prefix + "LATEST")["Body"].read()
        step = json.loads(body).get("step")
    except ClientError:
        return None  # no mirror yet, or not readable: the record's step stands
    except ValueError:
        return None
    return step if isinstance(step, int) else None


def _subnet_zones(subnet_ids: Iterable[str], *, ec2_client: Any) -> set[str]:
    subnets = ec2_client.describe_subnets(SubnetIds=list(subnet_ids))["Subnets"]
    return {subnet["AvailabilityZone"] for subnet in subnets}


def _start_snapshot(
    volume_id: str,
    job_id: str,
    attempt: int,
    step: int | None,
    spec: JobSpec,
    *,
    ec2_client: Any,
) -> str:
    extra = {tags.ROLE: "checkpoint"}
    if step is not None:
        extra["spotrun:checkpoint-step"] = str(step)
    response = ec2_client.create_snapshot(
        VolumeId=volume_id,
        Description=f"spotrun {job_id} checkpoint after attempt {attempt}",
        TagSpecifications=tags.tag_specifications(
            "snapshot", tags.resource_tags(job_id, attempt, spec.tags, **extra)
        ),
    )
    return response["SnapshotId"]


def _error_text(error: str, cause: Mapping[str, Any]) -> str:
    detail = cause.get("error") or cause.get("reason") or cause.get("errorMessage")
    detail = detail or cause.get("message") or ""
    return f"{error}: {detail}" if detail else error


# -- release ---------------------------------------------------------------


def release_attempt(
    job_id: str,
    *,
    attempt: int | None,
    instance_id: str | None,
    keep_volume_ids: Sequence[str],
    outcome: str,
    store: JobStore,
    ec2_client: Any,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Terminate, detach, delete; close the attempt; say whether to relaunch.

    With ``instance_id`` None (the failure path) every instance of the job is
    released, whatever the state data knew about.
    """
    now = now or datetime.now(UTC)
    release_job_instances(
        job_id, ec2_client=ec2_client, only=[instance_id] if instance_id else None
    )
    if outcome == budget.FAILED:
        _snapshot_only_copy(store, store.get(job_id), ec2_client=ec2_client)
    delete_job_volumes(job_id, keep=keep_volume_ids, ec2_client=ec2_client)
    record = _close_attempts(store, job_id, attempt, outcome)
    if record.status.is_terminal():
        return {"relaunch": False, "reason": f"job is {record.status.value}"}
    spec = JobSpec.model_validate(record.spec)
    decision = budget.verdict(record, spec, outcome, now=now)
    if decision.relaunch:
        try:
            store.update(job_id, set={"status": JobStatus.RECOVERING}, expect_status=_NOT_TERMINAL)
        except JobConflictError:
            return {"relaunch": False, "reason": "the job ended meanwhile"}
    return {"relaunch": decision.relaunch, "reason": decision.reason}


def _snapshot_only_copy(store: JobStore, record: JobRecord, *, ec2_client: Any) -> None:
    """Before a failed job's volumes go, snapshot the checkpoint volume that is the only copy.

    The volume kept for reuse holds checkpoints nothing else has when the spec
    has no S3 mirror and no snapshot was taken since; deleting it would throw
    away progress a user may want to resume from by hand.
    """
    checkpoint = record.checkpoint or {}
    volume_id = checkpoint.get("volume_id")
    if not volume_id or checkpoint.get("s3_uri"):
        return
    for volume in job_volumes(record.job_id, ec2_client=ec2_client):
        if volume["VolumeId"] != volume_id:
            continue
        kept = {
            t["Key"]: t["Value"] for t in volume.get("Tags", []) if not t["Key"].startswith("aws:")
        }
        snapshot = ec2_client.create_snapshot(
            VolumeId=volume_id,
            Description=f"spotrun {record.job_id} last checkpoint volume",
            TagSpecifications=tags.tag_specifications("snapshot", kept),
        )
        save_checkpoint(
            store,
            record.job_id,
            {**checkpoint, "snapshot_id": snapshot["SnapshotId"], "volume_id": None},
        )


def job_instances(job_id: str, *, ec2_client: Any) -> list[str]:
    """Ids of the job's instances that are not terminated."""
    paginator = ec2_client.get_paginator("describe_instances")
    ids: list[str] = []
    for page in paginator.paginate(
        Filters=[
            {"Name": f"tag:{tags.JOB_ID}", "Values": [job_id]},
            {"Name": "instance-state-name", "Values": _ALIVE_STATES},
        ]
    ):
        for reservation in page.get("Reservations", []):
            ids.extend(instance["InstanceId"] for instance in reservation.get("Instances", []))
    return ids


def release_job_instances(
    job_id: str, *, ec2_client: Any, only: Sequence[str] | None = None
) -> list[str]:
    """Terminate the job's live instances (or just ``only``); return the ids terminated."""
    ids = list(only) if only else job_instances(job_id, ec2_client=ec2_client)
    if not ids:
        return []
    try:
        ec2_client.terminate_instances(InstanceIds=ids)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
            raise
    return ids


def job_volumes(job_id: str, *, ec2_client: Any) -> list[dict[str, Any]]:
    """The job's volumes (by tag), as DescribeVolumes returns them."""
    paginator = ec2_client.get_paginator("describe_volumes")
    volumes: list[dict[str, Any]] = []
    for page in paginator.paginate(Filters=[{"Name": f"tag:{tags.JOB_ID}", "Values": [job_id]}]):
        volumes.extend(page.get("Volumes", []))
    return volumes


def delete_job_volumes(job_id: str, *, keep: Sequence[str] = (), ec2_client: Any) -> list[str]:
    """Detach and delete every volume of the job except ``keep`` (which is only detached)."""
    volumes = job_volumes(job_id, ec2_client=ec2_client)
    attached = []
    for volume in volumes:
        for attachment in volume.get("Attachments", []):
            if attachment.get("State") in ("attaching", "attached"):
                _detach(volume["VolumeId"], attachment["InstanceId"], ec2_client=ec2_client)
                attached.append(volume["VolumeId"])
    if attached:
        ec2_client.get_waiter("volume_available").wait(
            VolumeIds=attached, WaiterConfig=_VOLUME_WAIT
        )
    deleted = []
    for volume in volumes:
        if volume["VolumeId"] in keep:
            continue
        try:
            ec2_client.delete_volume(VolumeId=volume["VolumeId"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidVolume.NotFound":
                raise
        deleted.append(volume["VolumeId"])
    return deleted


def _detach(volume_id: str, instance_id: str, *, ec2_client: Any) -> None:
    # InstanceId is optional for AWS but moto crashes without it (FINDINGS.md). The
    # instance is terminating, so Force is safe: every committed checkpoint is
    # already fsynced, and the store ignores anything uncommitted.
    try:
        ec2_client.detach_volume(VolumeId=volume_id, InstanceId=instance_id, Force=True)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in ("IncorrectState", "InvalidAttachment.NotFound", "InvalidVolume.NotFound"):
            raise


def _open_cost(record: JobRecord, now: datetime) -> float:
    """What the attempts not yet released have cost up to ``now``."""
    ended_at = now.isoformat()
    return sum(
        pricing.attempt_cost(entry.get("price_per_hour"), entry["started_at"], ended_at)
        for entry in record.attempts
        if not entry.get("ended_at") and entry.get("started_at")
    )


def _close_attempts(store: JobStore, job_id: str, attempt: int | None, outcome: str) -> JobRecord:
    """Set end time, outcome and cost on open attempts (all, or just ``attempt``), once."""
    record = store.get(job_id)
    ended_at = utc_now()
    attempts = [dict(entry) for entry in record.attempts]
    ledger: list[dict[str, Any]] = []
    for entry in attempts:
        if entry.get("ended_at") or (attempt is not None and entry.get("attempt") != attempt):
            continue
        entry["ended_at"] = ended_at
        entry["outcome"] = entry.get("outcome") or outcome
        entry["cost_usd"] = pricing.attempt_cost(
            entry.get("price_per_hour"), entry["started_at"], ended_at
        )
        ledger.append(
            {
                "attempt": entry["attempt"],
                "instance_type": entry.get("instance_type"),
                "market": entry.get("market"),
                "price_per_hour": entry.get("price_per_hour"),
                "seconds": _seconds(entry["started_at"], ended_at),
                "cost_usd": entry["cost_usd"],
            }
        )
    if not ledger:
        return record  # a retried release: already closed
    # The state machine is the only writer of attempts[], one task at a time, so
    # replacing the list cannot lose another writer's change.
    return store.update(
        job_id,
        set={"attempts": attempts, "current_instance_id": None, "task_token": None},
        add={"cost_usd": sum(item["cost_usd"] for item in ledger)},
        append={"cost_ledger": ledger},
    )


def _seconds(started_at: str, ended_at: str) -> float:
    start = datetime.fromisoformat(started_at.replace("Z", "+00:00"))
    end = datetime.fromisoformat(ended_at.replace("Z", "+00:00"))
    return round(max(0.0, (end - start).total_seconds()), 3)
