"""Releasing what jobs leave in EC2: per job, after an abnormal end, and by the sweeper.

Resources are found by tag only (``spotrun:job-id`` and ``spotrun:managed=true``),
so release works without the job record and is safe to run any number of times.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError, WaiterError

from spotrun import tags
from spotrun.errors import JobConflictError, JobNotFoundError
from spotrun.finalize import notify_outcome
from spotrun.jobs import JobStore
from spotrun.status import JobStatus

# The newest checkpoint snapshot is what a resubmitted job could resume from; older
# ones are superseded (the committed step never goes backwards).
DEFAULT_SNAPSHOT_RETENTION = 1
_LIVE_INSTANCE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
_OPEN_SPOT_REQUEST_STATES = ["open", "active", "disabled"]
# Codes meaning "already gone": a second release must not fail on them.
_GONE = {
    "InvalidInstanceID.NotFound",
    "InvalidVolume.NotFound",
    "InvalidSnapshot.NotFound",
    "InvalidSpotInstanceRequestID.NotFound",
    "IncorrectState",
}


@dataclass
class ReleaseReport:
    """What one release did; ``pending_volumes`` could not be deleted yet (still detaching)."""

    job_id: str
    terminated_instances: list[str] = field(default_factory=list)
    cancelled_spot_requests: list[str] = field(default_factory=list)
    deleted_volumes: list[str] = field(default_factory=list)
    pending_volumes: list[str] = field(default_factory=list)
    deleted_snapshots: list[str] = field(default_factory=list)
    kept_snapshots: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def complete(self) -> bool:
        return not self.pending_volumes


def job_filters(job_id: str) -> list[dict[str, Any]]:
    """EC2 filters selecting what spotrun created for ``job_id``."""
    return [
        {"Name": f"tag:{tags.JOB_ID}", "Values": [job_id]},
        {"Name": f"tag:{tags.MANAGED}", "Values": ["true"]},
    ]


def release_job_resources(
    job_id: str,
    *,
    ec2_client: Any,
    keep_snapshots: int = DEFAULT_SNAPSHOT_RETENTION,
    volume_wait_seconds: int = 60,
) -> ReleaseReport:
    """Terminate the job's instances, cancel its spot requests, delete its volumes,
    and keep only the newest ``keep_snapshots`` snapshots of each role.

    Order: spot requests first (an open request would replace a terminated
    instance), then instances, then volumes (force-detached, then waited for up to
    ``volume_wait_seconds`` until available), then snapshots. A volume still
    detaching after the wait is reported in ``pending_volumes``; the next release
    (or the sweeper) deletes it.
    """
    report = ReleaseReport(job_id)
    instance_ids = _live_instances(ec2_client, job_id)
    _cancel_spot_requests(ec2_client, job_id, report)
    if instance_ids:
        _ignore_gone(lambda: ec2_client.terminate_instances(InstanceIds=instance_ids))
        report.terminated_instances = instance_ids
    _delete_volumes(ec2_client, job_id, report, volume_wait_seconds)
    _apply_snapshot_retention(ec2_client, job_id, keep_snapshots, report)
    return report


def _live_instances(ec2_client: Any, job_id: str) -> list[str]:
    filters = [
        *job_filters(job_id),
        {"Name": "instance-state-name", "Values": _LIVE_INSTANCE_STATES},
    ]
    instance_ids = []
    for page in ec2_client.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            instance_ids.extend(i["InstanceId"] for i in reservation["Instances"])
    return sorted(instance_ids)


def _cancel_spot_requests(ec2_client: Any, job_id: str, report: ReleaseReport) -> None:
    # Only requests tagged as the job's: IAM lets us cancel nothing else. The one-time
    # requests of an instant EC2 Fleet carry no tags of ours and need no cancelling:
    # they close by themselves when their instance is terminated.
    state = {"Name": "state", "Values": _OPEN_SPOT_REQUEST_STATES}
    response = ec2_client.describe_spot_instance_requests(Filters=[*job_filters(job_id), state])
    ids = sorted(r["SpotInstanceRequestId"] for r in response["SpotInstanceRequests"])
    if ids:
        _ignore_gone(lambda: ec2_client.cancel_spot_instance_requests(SpotInstanceRequestIds=ids))
        report.cancelled_spot_requests = ids


def _delete_volumes(ec2_client: Any, job_id: str, report: ReleaseReport, wait_seconds: int) -> None:
    volumes = []
    for page in ec2_client.get_paginator("describe_volumes").paginate(Filters=job_filters(job_id)):
        volumes.extend(page["Volumes"])
    waiting = []
    for volume in volumes:
        volume_id = volume["VolumeId"]
        for attachment in volume.get("Attachments", []):
            if attachment.get("State") in ("attaching", "attached"):
                # InstanceId is required by moto (it crashes without it) and harmless on AWS.
                _ignore_gone(
                    lambda a=attachment, v=volume_id: ec2_client.detach_volume(
                        VolumeId=v, InstanceId=a["InstanceId"], Force=True
                    )
                )
        if volume["State"] != "available" or volume.get("Attachments"):
            waiting.append(volume_id)
    if waiting and wait_seconds > 0:
        delay = 5
        # Whatever is still in use after the wait is reported below and retried later.
        with contextlib.suppress(WaiterError):
            ec2_client.get_waiter("volume_available").wait(
                VolumeIds=waiting,
                WaiterConfig={"Delay": delay, "MaxAttempts": max(1, wait_seconds // delay)},
            )
    for volume in volumes:
        volume_id = volume["VolumeId"]
        try:
            ec2_client.delete_volume(VolumeId=volume_id)
        except ClientError as exc:
            code = _code(exc)
            if code in ("VolumeInUse", "IncorrectState"):
                report.pending_volumes.append(volume_id)
                continue
            if code != "InvalidVolume.NotFound":
                raise
        report.deleted_volumes.append(volume_id)


def _apply_snapshot_retention(
    ec2_client: Any, job_id: str, keep: int, report: ReleaseReport
) -> None:
    by_role: dict[str, list[dict[str, Any]]] = defaultdict(list)
    paginator = ec2_client.get_paginator("describe_snapshots")
    # OwnerIds=self plus our tags: an untagged describe lists every public snapshot.
    for page in paginator.paginate(OwnerIds=["self"], Filters=job_filters(job_id)):
        for snapshot in page["Snapshots"]:
            role = next((t["Value"] for t in snapshot.get("Tags", []) if t["Key"] == tags.ROLE), "")
            by_role[role].append(snapshot)
    for snapshots in by_role.values():
        snapshots.sort(key=lambda s: (s["StartTime"], s["SnapshotId"]), reverse=True)
        for snapshot in snapshots[: max(keep, 0)]:
            report.kept_snapshots.append(snapshot["SnapshotId"])
        for snapshot in snapshots[max(keep, 0) :]:
            snapshot_id = snapshot["SnapshotId"]
            try:
                ec2_client.delete_snapshot(SnapshotId=snapshot_id)
            except ClientError as exc:
                if _code(exc) == "InvalidSnapshot.InUse":
                    # Still the source of a volume being created; the next run gets it.
                    report.kept_snapshots.append(snapshot_id)
                    continue
                if _code(exc) != "InvalidSnapshot.NotFound":
                    raise
            report.deleted_snapshots.append(snapshot_id)


def _ignore_gone(call: Any) -> None:
    try:
        call()
    except ClientError as exc:
        if _code(exc) not in _GONE:
            raise


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


# Step Functions execution statuses that end a job without finalize_job running.
ENDED_STATUSES = frozenset({"ABORTED", "TIMED_OUT", "FAILED"})
MAX_REASON_CHARS = 2000


def settle_ended_execution(
    *,
    job_id: str,
    execution_status: str,
    error: str | None,
    cause: str | None,
    store: JobStore,
    ec2_client: Any,
    sns_client: Any = None,
    topic_arn: str | None = None,
) -> dict[str, Any]:
    """After an execution ended abnormally: release all of the job, then settle its record.

    ABORTED (``DELETE /jobs/{id}``, or a stop from the console) settles as CANCELLED,
    TIMED_OUT and FAILED as FAILED with the error and cause as the reason. Resources
    go first, so a crash in between leaves a record that is not yet terminal and a
    redelivered event (or the sweeper) finishes the work. A record that is already
    terminal keeps its status. The outcome is published on ``topic_arn`` by the call
    that ends the job, as finalize_job does for the jobs that end on their own path.
    """
    if execution_status not in ENDED_STATUSES:
        return {"job_id": job_id, "ignored": True, "execution_status": execution_status}
    report = release_job_resources(job_id, ec2_client=ec2_client)
    if execution_status == "ABORTED":
        status = JobStatus.CANCELLED
        reason = "cancelled" + (f": {cause}" if cause else "")
    elif execution_status == "TIMED_OUT":
        status = JobStatus.FAILED
        reason = "execution timed out"
    else:
        status = JobStatus.FAILED
        reason = "execution failed: " + ": ".join(part for part in (error, cause) if part)
    result: dict[str, Any] = {"job_id": job_id, "release": report.to_dict()}
    try:
        ended_before = store.get(job_id).status.is_terminal()
        record = store.set_status(job_id, status, reason=reason[:MAX_REASON_CHARS])
        if record.status is status and (record.task_token or record.current_instance_id):
            # Nothing runs any more: the token is dead and the instance is gone.
            record = store.update(job_id, set={"task_token": None, "current_instance_id": None})
        result["status"] = record.status.value
        if not ended_before:  # a redelivered event must not announce it twice
            notify_outcome(record, sns_client=sns_client, topic_arn=topic_arn)
    except JobConflictError as exc:
        result["status"] = exc.status  # ended by its own path first (finalize_job)
    except JobNotFoundError:
        result["status"] = None
    return result


@dataclass
class _Holdings:
    """What one job id has in EC2, and when the newest of it was created."""

    live: int = 0  # instances, volumes, open spot requests
    snapshots: int = 0
    newest: datetime | None = None

    def saw(self, created: datetime | None, *, snapshot: bool = False) -> None:
        if snapshot:
            self.snapshots += 1
        else:
            self.live += 1
        if created is not None and (self.newest is None or created > self.newest):
            self.newest = created


def sweep_orphans(
    *,
    store: JobStore,
    ec2_client: Any,
    grace_seconds: int = 900,
    keep_snapshots: int = DEFAULT_SNAPSHOT_RETENTION,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Release whatever is tagged ``spotrun:managed=true`` but belongs to no running job.

    A job qualifies when its record is terminal, or missing and its newest
    resource is older than ``grace_seconds`` (a record is written before any
    resource is created, so a young resource without one is a race, not an
    orphan). Jobs with nothing but their retained snapshots are left alone.
    """
    now = now or datetime.now(UTC)
    holdings = _managed_holdings(ec2_client)
    released, active, young, untagged = [], [], [], holdings.pop("", None)
    for job_id, held in sorted(holdings.items()):
        if held.live == 0 and held.snapshots <= keep_snapshots:
            continue
        try:
            record = store.get(job_id)
        except JobNotFoundError:
            record = None
        if record is not None and not record.status.is_terminal():
            active.append(job_id)
            continue
        within_grace = (
            held.newest is not None and (now - held.newest).total_seconds() < grace_seconds
        )
        if record is None and within_grace:
            young.append(job_id)
            continue
        # No waiting for detaching volumes: the next sweep deletes them, and one slow
        # job must not use up the run's time limit.
        report = release_job_resources(
            job_id, ec2_client=ec2_client, keep_snapshots=keep_snapshots, volume_wait_seconds=0
        )
        released.append(
            {
                "job_id": job_id,
                "record": "missing" if record is None else record.status.value,
                **report.to_dict(),
            }
        )
    return {
        "released": released,
        "active_jobs": active,
        "within_grace": young,
        "untagged_resources": untagged.live + untagged.snapshots if untagged else 0,
    }


def _managed_holdings(ec2_client: Any) -> dict[str, _Holdings]:
    managed = [{"Name": f"tag:{tags.MANAGED}", "Values": ["true"]}]
    holdings: dict[str, _Holdings] = defaultdict(_Holdings)

    def job_of(resource: dict[str, Any]) -> str:
        return next((t["Value"] for t in resource.get("Tags", []) if t["Key"] == tags.JOB_ID), "")

    instance_filters = [
        *managed,
        {"Name": "instance-state-name", "Values": _LIVE_INSTANCE_STATES},
    ]
    for page in ec2_client.get_paginator("describe_instances").paginate(Filters=instance_filters):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                holdings[job_of(instance)].saw(instance.get("LaunchTime"))
    for page in ec2_client.get_paginator("describe_volumes").paginate(Filters=managed):
        for volume in page["Volumes"]:
            holdings[job_of(volume)].saw(volume.get("CreateTime"))
    requests = ec2_client.describe_spot_instance_requests(
        Filters=[*managed, {"Name": "state", "Values": _OPEN_SPOT_REQUEST_STATES}]
    )["SpotInstanceRequests"]
    for request in requests:
        holdings[job_of(request)].saw(request.get("CreateTime"))
    paginator = ec2_client.get_paginator("describe_snapshots")
    for page in paginator.paginate(OwnerIds=["self"], Filters=managed):
        for snapshot in page["Snapshots"]:
            holdings[job_of(snapshot)].saw(snapshot.get("StartTime"), snapshot=True)
    return dict(holdings)
