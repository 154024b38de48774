"""Finalize Job: final status, model, cost ledger, nothing left running, the SNS notification."""

from __future__ import annotations

import os
from typing import Any, Literal

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import BaseModel, parse
from aws_lambda_powertools.utilities.typing import LambdaContext

from spotrun import aws
from spotrun.finalize import finalize_job
from spotrun.jobs import JobStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()


class FinalizeJobInput(BaseModel):
    job_id: str
    status: Literal["SUCCEEDED", "FAILED"]
    result: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse(event=event, model=FinalizeJobInput)
    logger.append_keys(job_id=request.job_id)
    outcome = finalize_job(
        request.job_id,
        request.status,
        result=request.result,
        failure=request.failure,
        store=JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        ec2_client=aws.client("ec2"),
        sns_client=aws.client("sns"),
        topic_arn=os.environ.get("TOPIC_ARN"),
    )
    metrics.add_dimension(name="status", value=outcome["status"])
    metrics.add_metric(name="JobsFinished", unit=MetricUnit.Count, value=1)
    logger.info("job finalized", extra=outcome)
    return outcome
