"""EC2 events about a job's instance: record them, and fail the task when the instance is gone.

The trainer reports interruptions itself (it sees the IMDS notice and SIGTERM).
These handlers cover the case where it cannot: the instance stopped or
terminated with the task still open. They fail the task with ``Instance.Lost``
using the token start_trainer stored on the record. Racing the trainer's own
report is harmless: the second report on a closed task fails with
``TaskTimedOut``/``InvalidToken`` and is ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from spotrun import tags
from spotrun.errors import InstanceLost, JobNotFoundError
from spotrun.jobs import JobStore, utc_now
from spotrun.status import JobStatus

logger = logging.getLogger(__name__)

SPOT_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
STATE_CHANGE = "EC2 Instance State-change Notification"
GONE_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
_CLOSED_TASK_CODES = frozenset({"TaskTimedOut", "InvalidToken", "TaskDoesNotExist"})


def instance_job(instance_id: str, *, ec2_client: Any) -> tuple[str | None, str | None, str | None]:
    """(job id, attempt, state) of an instance from its tags, or Nones if it is not ours."""
    try:
        reservations = ec2_client.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
            return None, None, None
        raise
    for reservation in reservations:
        for instance in reservation.get("Instances", []):
            found = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
            if found.get(tags.MANAGED) == "true" and tags.JOB_ID in found:
                return found[tags.JOB_ID], found.get(tags.ATTEMPT), instance["State"]["Name"]
    return None, None, None


def handle_instance_event(
    event: Mapping[str, Any],
    *,
    store: JobStore,
    ec2_client: Any,
    sfn_client: Any,
) -> dict[str, Any]:
    """Handle one EventBridge EC2 event (spot warning, rebalance, state change)."""
    kind = str(event.get("detail-type", ""))
    detail = event.get("detail") or {}
    instance_id = detail.get("instance-id")
    if kind not in (SPOT_WARNING, REBALANCE, STATE_CHANGE) or not instance_id:
        return {"action": "ignored", "reason": "not an EC2 instance event spotrun handles"}
    job_id, attempt, state = instance_job(instance_id, ec2_client=ec2_client)
    if job_id is None:
        return {"action": "ignored", "reason": f"{instance_id} is not a spotrun instance"}
    try:
        record = store.get(job_id)
    except JobNotFoundError:
        return {"action": "ignored", "reason": f"no record for {job_id}"}
    if record.status.is_terminal():
        return {"action": "ignored", "job_id": job_id, "reason": f"job is {record.status.value}"}

    event_state = detail.get("state") if kind == STATE_CHANGE else None
    notice = {
        "kind": _notice_kind(kind),
        "instance_id": instance_id,
        "attempt": int(attempt) if attempt and attempt.isdigit() else None,
        "time": event.get("time") or utc_now(),
        "received_at": utc_now(),
        "detail": {k: v for k, v in detail.items() if k != "instance-id"},
    }
    change: dict[str, Any] = {}
    if kind == SPOT_WARNING and record.status is JobStatus.RUNNING:
        change["status"] = JobStatus.INTERRUPTED
    store.update(job_id, set=change or None, append={"notices": [notice]})

    # The trainer can no longer report once its instance is going away.
    current_state = event_state or state
    lost = (
        record.task_token
        and record.current_instance_id == instance_id
        and current_state in GONE_STATES
    )
    if not lost:
        return {"action": "recorded", "job_id": job_id, "notice": notice["kind"]}
    failed = fail_task(
        record.task_token, instance_id, f"instance is {current_state}", sfn_client=sfn_client
    )
    if failed:
        store.update(job_id, set={"task_token": None})
    return {
        "action": "failed-task" if failed else "recorded",
        "job_id": job_id,
        "notice": notice["kind"],
    }


def fail_task(task_token: str, instance_id: str, reason: str, *, sfn_client: Any) -> bool:
    """Fail the Run Trainer task with ``Instance.Lost``; False if the task was closed already."""
    try:
        sfn_client.send_task_failure(
            taskToken=task_token,
            error=InstanceLost.__name__,
            cause=json.dumps({"instance_id": instance_id, "reason": reason}),
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _CLOSED_TASK_CODES:
            logger.info("task of %s already closed", instance_id)
            return False
        raise
    return True


def _notice_kind(detail_type: str) -> str:
    return {
        SPOT_WARNING: "instance-action",
        REBALANCE: "rebalance",
        STATE_CHANGE: "state-change",
    }[detail_type]
