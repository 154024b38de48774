"""A function for the machinery tests: reports its environment and records what it receives."""

import json
import os

import boto3
import minilib

_calls = {"count": 0}  # module state survives between calls in a warm container
_s3 = boto3.client("s3")


def lambda_handler(event, context):
    _calls["count"] += 1
    if isinstance(event, dict) and event.get("fail"):
        raise minilib.CapacityUnavailable("no capacity in any pool")
    if isinstance(event, dict) and "detail-type" in event:
        key = f"seen/{event['detail-type'].replace(' ', '_')}/{event['id']}.json"
        _s3.put_object(Bucket=os.environ["JOBS_BUCKET"], Key=key, Body=json.dumps(event))
    if isinstance(event, dict) and "httpMethod" in event:
        return {
            "statusCode": 200,
            "headers": {"Content-Type": "application/json"},
            "body": json.dumps(
                {
                    "path": event["path"],
                    "resource": event["resource"],
                    "pathParameters": event["pathParameters"],
                    "caller": event["requestContext"]["identity"]["caller"],
                    "stage": event["requestContext"]["stage"],
                    "body": event["body"],
                }
            ),
        }
    return {
        "count": _calls["count"],
        "pid": os.getpid(),
        "function": context.function_name,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("JOBS_", "OWN_", "GLOBAL_"))},
        "pythonpath": os.environ.get("PYTHONPATH"),
    }
