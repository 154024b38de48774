"""Preserve Checkpoint: commit the step, keep the volume or snapshot it, count the interruption."""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import BaseModel, parse
from aws_lambda_powertools.utilities.typing import LambdaContext

from spotrun import aws
from spotrun.attempts import preserve_checkpoint
from spotrun.jobs import JobStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()


class Failure(BaseModel):
    Error: str
    Cause: str | None = None


class PreserveCheckpointInput(BaseModel):
    job_id: str
    attempt: int
    instance_id: str
    availability_zone: str
    volumes: list[dict[str, Any]]
    failure: Failure


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse(event=event, model=PreserveCheckpointInput)
    logger.append_keys(job_id=request.job_id, attempt=request.attempt)
    result = preserve_checkpoint(
        request.job_id,
        attempt=request.attempt,
        instance_id=request.instance_id,
        availability_zone=request.availability_zone,
        volumes=request.volumes,
        failure=request.failure.model_dump(),
        store=JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        ec2_client=aws.client("ec2"),
        s3_client=aws.client("s3"),
        bucket=os.environ["JOBS_BUCKET"],
    )
    metrics.add_dimension(name="outcome", value=result["outcome"])
    metrics.add_metric(name="AttemptsEnded", unit=MetricUnit.Count, value=1)
    logger.info("checkpoint preserved", extra={"preserved": result, "error": request.failure.Error})
    return result
