"""The jobs REST API: routes for submitting, listing, reading and cancelling jobs."""

from __future__ import annotations

import binascii
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import ClientError

from spotrun.errors import JobConflictError, JobNotFoundError, SpecError
from spotrun.jobs import JobRecord, JobStore, derived_job_id, new_job_id, utc_now
from spotrun.spec import BODY
from spotrun.status import JobStatus
from spotrun.submission import SubmissionSettings, execution_arn_for, submit_job

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_JOB_ID = re.compile(r"j-[0-9a-f]{20}")
_NOT_TERMINAL = [status for status in JobStatus if not status.is_terminal()]
# What a job listing shows of each record; GET /jobs/{id} shows the whole record.
_SUMMARY_FIELDS = (
    "job_id",
    "status",
    "reason",
    "created_at",
    "updated_at",
    "execution_arn",
    "interruptions",
    "cost_usd",
)


@dataclass(frozen=True)
class ApiDependencies:
    """Everything the routes use, built once per container by the handler."""

    settings: SubmissionSettings
    store: JobStore
    sfn_client: Any
    ec2_client: Any
    dynamodb_client: Any
    metrics: Any = None


app = APIGatewayRestResolver()


def handle(event: dict[str, Any], context: Any, *, dependencies: ApiDependencies) -> dict:
    """Resolve one API Gateway proxy event with ``dependencies``."""
    app.append_context(dependencies=dependencies, lambda_context=context)
    return app.resolve(event, context)


def _deps() -> ApiDependencies:
    return app.context["dependencies"]


def _json(status_code: int, body: Any) -> Response:
    return Response(
        status_code=status_code,
        content_type="application/json",
        body=json.dumps(body, separators=(",", ":"), default=str),
    )


@app.exception_handler(SpecError)
def _invalid_spec(error: SpecError) -> Response:
    return _json(400, {"message": "invalid job spec", "errors": error.errors})


@app.exception_handler(JobNotFoundError)
def _not_found(error: JobNotFoundError) -> Response:
    return _json(404, {"message": str(error), "job_id": error.job_id})


@app.exception_handler(JobConflictError)
def _conflict(error: JobConflictError) -> Response:
    return _json(409, {"message": str(error), "job_id": error.job_id, "status": error.status})


@app.post("/jobs")
def post_job() -> Response:
    """Submit a job. With an ``Idempotency-Key`` header, a retry within the window
    gets the first call's response and starts nothing new."""
    event = app.current_event
    try:
        body = event.decoded_body or ""
    except (UnicodeDecodeError, binascii.Error):
        raise SpecError([{"field": BODY, "reason": "not UTF-8 text"}]) from None
    key = _header(event.headers, IDEMPOTENCY_HEADER)
    caller = _caller(event.raw_event)
    if key is None:
        result = _submit(body=body, job_id=new_job_id(), caller=caller)
    elif not _IDEMPOTENCY_KEY.fullmatch(key):
        return _json(
            400,
            {
                "message": "invalid request",
                "errors": [
                    {
                        "field": IDEMPOTENCY_HEADER,
                        "reason": "must be 1-255 printable ASCII characters without spaces",
                    }
                ],
            },
        )
    else:
        result = _submit_idempotently(body=body, key=key, caller=caller)
    return _json(result["status_code"], result["body"])


def _submit(*, body: str, job_id: str, caller: str) -> dict[str, Any]:
    deps = _deps()
    submission = submit_job(
        body,
        job_id=job_id,
        settings=deps.settings,
        store=deps.store,
        sfn_client=deps.sfn_client,
        ec2_client=deps.ec2_client,
        source={"kind": "api", "caller": caller},
    )
    if submission.created and deps.metrics is not None:
        deps.metrics.add_metric(name="JobsSubmitted", unit=MetricUnit.Count, value=1)
    # 200 for a job that already existed under this id (its idempotency record expired).
    status_code = 201 if submission.created else 200
    return {"status_code": status_code, "body": submission.to_dict()}


def _submit_idempotently(*, body: str, key: str, caller: str) -> dict[str, Any]:
    # Imported here: the idempotency utility costs ~0.1 s to import and only keyed
    # POSTs need it, so every other route (and cold start) skips it.
    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyAlreadyInProgressError,
        IdempotencyValidationError,
    )

    request = {"caller": caller, "idempotency_key": key, "body": body}
    submitter, config = _idempotent_submitter(_deps())
    context = app.context.get("lambda_context")
    if hasattr(context, "get_remaining_time_in_millis"):
        # Lets an in-progress record expire with the invocation if it times out.
        config.register_lambda_context(context)
    try:
        return submitter(request=request)
    except IdempotencyValidationError:
        return {
            "status_code": 422,
            "body": {"message": f"{IDEMPOTENCY_HEADER} {key!r} was used with a different body"},
        }
    except IdempotencyAlreadyInProgressError:
        return {
            "status_code": 409,
            "body": {"message": f"a request with {IDEMPOTENCY_HEADER} {key!r} is in progress"},
        }


@functools.cache
def _idempotent_submitter(deps: ApiDependencies) -> tuple[Any, Any]:
    """The keyed submit wrapped in powertools idempotency (and its config), built once
    per set of dependencies, on first use."""
    from aws_lambda_powertools.utilities.idempotency import (
        DynamoDBPersistenceLayer,
        IdempotencyConfig,
        idempotent_function,
    )

    # Idempotency records share the jobs table; attribute names of their own keep
    # them from colliding with a job record's "status". "expiration" is the table's
    # TTL attribute (template.yaml), which job records never carry.
    persistence = DynamoDBPersistenceLayer(
        table_name=deps.store.table_name,
        key_attr="job_id",
        expiry_attr="expiration",
        in_progress_expiry_attr="idempotency_in_progress_expiration",
        status_attr="idempotency_status",
        data_attr="idempotency_data",
        validation_key_attr="idempotency_validation",
        boto3_client=deps.dynamodb_client,
    )
    config = IdempotencyConfig(
        event_key_jmespath="[caller, idempotency_key]",
        payload_validation_jmespath="body",
        expires_after_seconds=IDEMPOTENCY_WINDOW_SECONDS,
    )
    submitter = idempotent_function(
        data_keyword_argument="request", persistence_store=persistence, config=config
    )(_submit_keyed)
    return submitter, config


def _submit_keyed(*, request: dict[str, Any]) -> dict[str, Any]:
    # The job id follows from caller and key, so even after the idempotency record
    # expires a retry finds the same job instead of creating a second one.
    job_id = derived_job_id("api", request["caller"], request["idempotency_key"])
    return _submit(body=request["body"], job_id=job_id, caller=request["caller"])


@app.get("/jobs")
def list_jobs() -> Response:
    """Jobs, paged; ``?status=RUNNING,INTERRUPTED&limit=20&cursor=...``."""
    params = app.current_event.query_string_parameters or {}
    errors = []
    statuses = None
    if params.get("status"):
        try:
            statuses = [JobStatus(s.strip().upper()) for s in params["status"].split(",")]
        except ValueError:
            errors.append(
                {"field": "status", "reason": f"one of {', '.join(s.value for s in JobStatus)}"}
            )
    limit = 50
    if params.get("limit"):
        try:
            limit = int(params["limit"])
            if not 1 <= limit <= 100:
                raise ValueError
        except ValueError:
            errors.append({"field": "limit", "reason": "an integer from 1 to 100"})
    if errors:
        return _json(400, {"message": "invalid query", "errors": errors})
    try:
        records, cursor = _deps().store.list_jobs(
            status=statuses, limit=limit, cursor=params.get("cursor")
        )
    except ValueError:
        return _json(
            400,
            {
                "message": "invalid query",
                "errors": [{"field": "cursor", "reason": "not a cursor from this API"}],
            },
        )
    return _json(200, {"jobs": [_summary(r) for r in records], "next_cursor": cursor})


@app.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    return _json(200, _public(_deps().store.get(_checked_job_id(job_id))))


@app.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    """Stop the job's execution. The status stays until the execution-ended handler
    settles it as CANCELLED after releasing everything; 409 if already over."""
    deps = _deps()
    job_id = _checked_job_id(job_id)
    # Conditional: a job that has ended in the meantime answers 409, not "cancelling".
    record = deps.store.update(
        job_id,
        append={"notices": [{"kind": "cancel-requested", "at": utc_now()}]},
        expect_status=_NOT_TERMINAL,
    )
    execution_arn = record.execution_arn or execution_arn_for(
        deps.settings.state_machine_arn, job_id
    )
    try:
        deps.sfn_client.stop_execution(
            executionArn=execution_arn,
            error="Job.Cancelled",
            cause=f"DELETE /jobs/{job_id}",
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ExecutionDoesNotExist":
            raise
        # Never started: nothing runs that could settle the record, so settle it here.
        record = deps.store.set_status(
            job_id, JobStatus.CANCELLED, reason="cancelled before it started"
        )
    if deps.metrics is not None:
        deps.metrics.add_metric(name="JobsCancelled", unit=MetricUnit.Count, value=1)
    return _json(
        202,
        {"job_id": job_id, "status": record.status.value, "execution_arn": record.execution_arn},
    )


def _checked_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise JobNotFoundError(job_id)
    return job_id


def _public(record: JobRecord) -> dict[str, Any]:
    data = record.to_dict()
    # The task token lets its holder report the job's outcome; it stays private.
    data.pop("task_token", None)
    return data


def _summary(record: JobRecord) -> dict[str, Any]:
    data = record.to_dict()
    summary = {name: data[name] for name in _SUMMARY_FIELDS}
    summary["name"] = record.spec.get("name")
    summary["checkpoint_step"] = (record.checkpoint or {}).get("step")
    return summary


def _header(headers: dict[str, str] | None, name: str) -> str | None:
    for key, value in (headers or {}).items():
        if key.lower() == name.lower():
            return value
    return None


def _caller(raw_event: dict[str, Any]) -> str:
    """Who is calling (IAM auth), so two callers' equal keys do not collide."""
    identity = (raw_event.get("requestContext") or {}).get("identity") or {}
    return identity.get("userArn") or identity.get("caller") or identity.get("accountId") or ""
