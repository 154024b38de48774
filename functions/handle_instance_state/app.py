"""EC2 instance state changes: an instance of a running attempt that goes away loses its task."""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from aws_lambda_powertools.utilities.typing import LambdaContext

from spotrun import aws
from spotrun.jobs import JobStore
from spotrun.notices import handle_instance_event

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    parse(event=event, model=EventBridgeModel)  # rejects anything that is not an EventBridge event
    result = handle_instance_event(
        event,
        store=JobStore(os.environ["JOBS_TABLE"], dynamodb_client=aws.client("dynamodb")),
        ec2_client=aws.client("ec2"),
        sfn_client=aws.client("stepfunctions"),
    )
    logger.info("instance event", extra={"result": result})
    return result
