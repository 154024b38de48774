"""HandleExecutionEndedFunction: releases a job whose execution was aborted, timed out or failed."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import BaseModel, parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import Field

from spotrun import aws
from spotrun.cleanup import settle_ended_execution
from spotrun.jobs import JobStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()


class ExecutionStatusChange(BaseModel):
    """The detail of a "Step Functions Execution Status Change" event (fields we use)."""

    execution_arn: str = Field(alias="executionArn")
    state_machine_arn: str = Field(alias="stateMachineArn")
    name: str
    status: str
    input: str | None = None
    error: str | None = None
    cause: str | None = None


class ExecutionStatusChangeEvent(EventBridgeModel):
    detail: ExecutionStatusChange


@functools.cache
def dependencies() -> dict[str, Any]:
    """Built on the first invocation and kept for the container's life."""
    return {
        "store": JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        "ec2_client": aws.client("ec2"),
        "sns_client": aws.client("sns"),
        "topic_arn": os.environ.get("TOPIC_ARN"),
    }


def job_id_of(detail: ExecutionStatusChange) -> str:
    """The job id from the execution input; the execution name is the same id."""
    try:
        job_id = json.loads(detail.input or "{}").get("job_id")
    except (ValueError, AttributeError):
        job_id = None
    return job_id if isinstance(job_id, str) and job_id else detail.name


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    detail = parse(event=event, model=ExecutionStatusChangeEvent).detail
    ours = os.environ.get("STATE_MACHINE_ARN")
    if ours and detail.state_machine_arn != ours:
        # The rule filters on our state machine; this guards a rule edited by hand.
        logger.warning("execution of another state machine", extra={"arn": detail.execution_arn})
        return {"ignored": True, "execution_arn": detail.execution_arn}
    result = settle_ended_execution(
        job_id=job_id_of(detail),
        execution_status=detail.status,
        error=detail.error,
        cause=detail.cause,
        **dependencies(),
    )
    logger.info("execution ended", extra={"execution_status": detail.status, **result})
    if not result.get("ignored"):
        metrics.add_metric(
            name=f"Executions{detail.status.title()}", unit=MetricUnit.Count, value=1
        )
    return result
