"""JobsApiFunction: the REST API (POST/GET /jobs, GET/DELETE /jobs/{job_id})."""

from __future__ import annotations

import functools
import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging import correlation_paths

from spotrun import api, aws
from spotrun.jobs import JobStore
from spotrun.submission import SubmissionSettings

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@functools.cache
def dependencies() -> api.ApiDependencies:
    """Built on the first invocation and kept for the container's life."""
    dynamodb = aws.client("dynamodb")
    return api.ApiDependencies(
        settings=SubmissionSettings.from_env(),
        store=JobStore(os.environ["JOBS_TABLE"], dynamodb_client=dynamodb),
        sfn_client=aws.client("stepfunctions"),
        ec2_client=aws.client("ec2"),
        dynamodb_client=dynamodb,
        metrics=metrics,
    )


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return api.handle(event, context, dependencies=dependencies())
