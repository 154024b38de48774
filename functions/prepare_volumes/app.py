"""Prepare Volumes: the attempt's checkpoint and data volumes, created or reused, attached."""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.parser import BaseModel, parse
from aws_lambda_powertools.utilities.typing import LambdaContext

from spotrun import aws
from spotrun.jobs import JobStore
from spotrun.volumes import prepare_volumes

logger = Logger()
tracer = Tracer()
metrics = Metrics()


class PrepareVolumesInput(BaseModel):
    job_id: str
    attempt: int
    instance_id: str
    availability_zone: str


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse(event=event, model=PrepareVolumesInput)
    logger.append_keys(job_id=request.job_id, attempt=request.attempt)
    volumes = prepare_volumes(
        request.job_id,
        request.attempt,
        request.instance_id,
        request.availability_zone,
        store=JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        ec2_client=aws.client("ec2"),
    )
    return {"volumes": volumes}
