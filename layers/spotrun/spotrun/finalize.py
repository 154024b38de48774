"""The end of a job: final status, model, cost ledger, nothing left running, a notification."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from spotrun.attempts import delete_job_volumes, parse_cause, release_job_instances
from spotrun.errors import JobConflictError
from spotrun.jobs import JobRecord, JobStore
from spotrun.status import JobStatus

logger = logging.getLogger(__name__)

MAX_REASON_CHARS = 1000


def failure_reason(failure: Mapping[str, Any] | None) -> str:
    """A one-line reason from a caught error: ``"<Error>: <message>"``."""
    if not failure:
        return "failed"
    error = str(failure.get("Error") or "Error")
    cause = parse_cause(failure.get("Cause"))
    message = (
        cause.get("errorMessage")
        or cause.get("error")
        or cause.get("reason")
        or cause.get("message")
        or ""
    )
    text = f"{error}: {message}" if message else error
    return text[:MAX_REASON_CHARS]


def finalize_job(
    job_id: str,
    status: str,
    *,
    result: Mapping[str, Any] | None,
    failure: Mapping[str, Any] | None,
    store: JobStore,
    ec2_client: Any,
    sns_client: Any,
    topic_arn: str | None,
) -> dict[str, Any]:
    """Make sure nothing of the job runs, write the final status, and notify.

    A job already terminal (cancelled meanwhile) keeps its status: the record
    says what the user did, not what the state machine was doing.
    """
    final = JobStatus(status)
    # Safety net: the attempt was released already on every normal path.
    release_job_instances(job_id, ec2_client=ec2_client)
    delete_job_volumes(job_id, ec2_client=ec2_client)

    change: dict[str, Any] = {"task_token": None, "current_instance_id": None}
    reason = None
    if final is JobStatus.SUCCEEDED and result:
        change["model_uri"] = result.get("model_uri")
        change["metrics"] = dict(result.get("metrics") or {})
        step = result.get("checkpoint_step", result.get("final_step"))
        if isinstance(step, int) and not isinstance(step, bool):
            current = store.get(job_id).checkpoint or {}
            store.commit_checkpoint(job_id, {**current, "step": step})
    if final is JobStatus.FAILED:
        reason = failure_reason(failure)
    store.update(job_id, set=change)
    try:
        record = store.set_status(
            job_id,
            final,
            reason=reason,
            expect_status=[s for s in JobStatus if not s.is_terminal()],
        )
    except JobConflictError:
        record = store.get(job_id)
    notify_outcome(record, sns_client=sns_client, topic_arn=topic_arn)
    return {"status": record.status.value, "reason": record.reason}


def notification(record: JobRecord) -> dict[str, Any]:
    """The message published on the outcomes topic."""
    return {
        "job_id": record.job_id,
        "name": record.spec.get("name"),
        "status": record.status.value,
        "reason": record.reason,
        "model_uri": record.model_uri,
        "attempts": len(record.attempts),
        "interruptions": record.interruptions,
        "restarts_on_error": record.restarts_on_error,
        "checkpoint_step": (record.checkpoint or {}).get("step"),
        "cost_usd": round(record.cost_usd, 4),
        "cost_ledger": record.cost_ledger,
    }


def notify_outcome(record: JobRecord, *, sns_client: Any, topic_arn: str | None) -> None:
    """Publish the job's outcome on the topic (nothing without a topic); never raises
    for SNS."""
    if not topic_arn or sns_client is None:
        return
    try:
        sns_client.publish(
            TopicArn=topic_arn,
            Subject=f"spotrun job {record.job_id} {record.status.value}"[:100],
            Message=json.dumps(notification(record), default=str),
            MessageAttributes={
                "status": {"DataType": "String", "StringValue": record.status.value}
            },
        )
    except ClientError:
        # The record is final already; a lost notification must not turn a
        # succeeded job into a failed execution.
        logger.exception("could not publish the outcome of %s", record.job_id)
