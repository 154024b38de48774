"""SubmitJobFileFunction: submits the job in a `jobs/*.json` object created in the jobs bucket."""

from __future__ import annotations

import functools
import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import S3EventNotificationEventBridgeModel

from spotrun import aws
from spotrun.jobs import JobStore
from spotrun.status import JobStatus
from spotrun.submission import SubmissionSettings, submit_job_object

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@functools.cache
def dependencies() -> dict[str, Any]:
    """Built on the first invocation and kept for the container's life."""
    return {
        "settings": SubmissionSettings.from_env(),
        "store": JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        "s3_client": aws.client("s3"),
        "sfn_client": aws.client("stepfunctions"),
        "ec2_client": aws.client("ec2"),
    }


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    detail = parse(event=event, model=S3EventNotificationEventBridgeModel).detail
    submission = submit_job_object(
        bucket=detail.bucket.name,
        key=detail.object.key,
        etag=detail.object.etag or None,
        version_id=detail.object.version_id,
        **dependencies(),
    )
    if submission is None:
        logger.info("not a job file", extra={"key": detail.object.key})
        return {"job_id": None, "ignored": True}
    result = submission.to_dict()
    logger.info("job file submitted", extra=result)
    if submission.created:
        rejected = submission.status is JobStatus.REJECTED
        metrics.add_metric(
            name="JobsRejected" if rejected else "JobsSubmitted", unit=MetricUnit.Count, value=1
        )
    return result
