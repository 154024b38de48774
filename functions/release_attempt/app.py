"""Release Attempt: terminate, detach, delete; close the attempt; answer "Can We Relaunch?"."""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.parser import BaseModel, parse
from aws_lambda_powertools.utilities.typing import LambdaContext

from spotrun import aws
from spotrun.attempts import release_attempt
from spotrun.jobs import JobStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()


class ReleaseAttemptInput(BaseModel):
    job_id: str
    attempt: int | None = None
    instance_id: str | None = None
    keep_volume_ids: list[str] = []
    outcome: str


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse(event=event, model=ReleaseAttemptInput)
    logger.append_keys(job_id=request.job_id, attempt=request.attempt)
    result = release_attempt(
        request.job_id,
        attempt=request.attempt,
        instance_id=request.instance_id,
        keep_volume_ids=request.keep_volume_ids,
        outcome=request.outcome,
        store=JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        ec2_client=aws.client("ec2"),
    )
    logger.info("attempt released", extra={"release": result})
    return result
