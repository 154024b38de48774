"""Request Spot Capacity: one try at an instance for the job's next attempt."""

from __future__ import annotations

import os
from typing import Any, Literal

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import BaseModel, Field, parse
from aws_lambda_powertools.utilities.typing import LambdaContext

from spotrun import aws
from spotrun.capacity import request_capacity
from spotrun.jobs import JobStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()


class RequestCapacityInput(BaseModel):
    job_id: str
    try_number: int = Field(default=0, ge=0, alias="try")
    market: Literal["spot", "on-demand"] = "spot"


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse(event=event, model=RequestCapacityInput)
    logger.append_keys(job_id=request.job_id)
    result = request_capacity(
        request.job_id,
        request.try_number,
        request.market,
        store=JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        ec2_client=aws.client("ec2"),
        launch_template_id=os.environ["LAUNCH_TEMPLATE_ID"],
        retry_base_seconds=float(os.environ.get("CAPACITY_RETRY_BASE_SECONDS", "30")),
    )
    metrics.add_metric(
        name="CapacityGranted" if result["granted"] else "CapacityRefused",
        unit=MetricUnit.Count,
        value=1,
    )
    logger.info("capacity", extra={"capacity": result})
    return result
