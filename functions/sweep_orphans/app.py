"""SweepOrphansFunction: on a schedule, releases anything of ours whose job has ended."""

from __future__ import annotations

import functools
import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from spotrun import aws
from spotrun.cleanup import sweep_orphans
from spotrun.jobs import JobStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@functools.cache
def dependencies() -> dict[str, Any]:
    """Built on the first invocation and kept for the container's life."""
    return {
        "store": JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        "ec2_client": aws.client("ec2"),
    }


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    # The scheduled event carries nothing we need beyond the fact that it fired.
    result = sweep_orphans(**dependencies())
    released = result["released"]
    metrics.add_metric(name="OrphanJobsReleased", unit=MetricUnit.Count, value=len(released))
    if released:
        logger.warning("released orphaned resources", extra={"released": released})
    return result
