"""Run Trainer: store the task token and write the attempt's ticket (`.waitForTaskToken`)."""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.parser import BaseModel, Field, parse
from aws_lambda_powertools.utilities.typing import LambdaContext

from spotrun import aws
from spotrun.jobs import JobStore
from spotrun.tickets import start_trainer

logger = Logger()
tracer = Tracer()
metrics = Metrics()


class Volume(BaseModel):
    role: str
    volume_id: str
    device: str
    mount_point: str
    format_if_empty: bool
    read_only: bool


class StartTrainerInput(BaseModel):
    job_id: str
    attempt: int
    instance_id: str
    volumes: list[Volume]
    heartbeat_timeout_seconds: int = Field(ge=1)
    task_token: str = Field(min_length=1)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse(event=event, model=StartTrainerInput)
    logger.append_keys(job_id=request.job_id, attempt=request.attempt)
    return start_trainer(
        request.job_id,
        attempt=request.attempt,
        instance_id=request.instance_id,
        volumes=[volume.model_dump() for volume in request.volumes],
        task_token=request.task_token,
        heartbeat_timeout_seconds=request.heartbeat_timeout_seconds,
        store=JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        s3_client=aws.client("s3"),
        bucket=os.environ["JOBS_BUCKET"],
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
