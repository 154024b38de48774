"""The job record and its store in DynamoDB: conditional writes, never read-modify-write."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from decimal import Context, Decimal, Inexact, Rounded
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from spotrun.errors import JobConflictError, JobNotFoundError
from spotrun.status import JobStatus

# Every job record carries this, and idempotency records (which share the table) do
# not: listing filters on it so it never returns powertools' bookkeeping.
RECORD_KIND = "job"
JOB_ID_PREFIX = "j-"
MAX_PAGE_SIZE = 100

_TERMINAL = [status.value for status in JobStatus if status.is_terminal()]
# DynamoDB numbers carry 38 significant digits; a float's repr never needs more.
_DECIMAL_CONTEXT = Context(prec=38, traps=[Inexact, Rounded])


def new_job_id() -> str:
    """A random job id: ``j-`` and 20 lowercase hex characters."""
    return JOB_ID_PREFIX + secrets.token_hex(10)


def derived_job_id(*parts: str) -> str:
    """A job id determined by ``parts``, so a repeated submission maps to the same id."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return JOB_ID_PREFIX + digest[:20]


def utc_now() -> str:
    """Now, as the ISO-8601 UTC string every timestamp on a record uses."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class JobRecord:
    """One job as stored. ``attempts`` entries and ``checkpoint`` are plain dicts.

    ``attempts[]``: attempt, instance_id, instance_type, availability_zone, subnet_id,
    market, price_per_hour, started_at, ended_at, outcome, cost_usd.
    ``checkpoint``: step, volume_id, snapshot_id, availability_zone, s3_uri.
    """

    job_id: str
    status: JobStatus
    spec: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    created_at: str = field(default_factory=utc_now)
    updated_at: str = ""
    execution_arn: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    interruptions: int = 0
    restarts_on_error: int = 0
    capacity_failures: int = 0
    checkpoint: dict[str, Any] | None = None
    cost_usd: float = 0.0
    cost_ledger: list[dict[str, Any]] = field(default_factory=list)
    model_uri: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    notices: list[dict[str, Any]] = field(default_factory=list)
    task_token: str | None = None
    current_instance_id: str | None = None
    # Where the submission came from: {"kind": "api"} or {"kind": "s3", bucket, key, ...}.
    source: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)
        if not self.updated_at:
            self.updated_at = self.created_at

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (status as its string value)."""
        data = asdict(self)
        data["status"] = self.status.value
        return data

    def to_item(self) -> dict[str, Any]:
        """The DynamoDB item (typed attribute values); absent values are left out."""
        plain = {key: value for key, value in self.to_dict().items() if value is not None}
        plain["kind"] = RECORD_KIND
        return {key: _serialize(value) for key, value in plain.items()}

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> JobRecord:
        plain = {key: _deserialize(value) for key, value in item.items()}
        known = {f.name for f in fields(cls)}
        record = cls(**{key: value for key, value in plain.items() if key in known})
        # Numbers come back as int when integral; these two are money.
        record.cost_usd = float(record.cost_usd)
        return record


FIELD_NAMES = frozenset(f.name for f in fields(JobRecord)) - {"job_id"}
_NUMERIC_FIELDS = frozenset({"interruptions", "restarts_on_error", "capacity_failures", "cost_usd"})
_LIST_FIELDS = frozenset({"attempts", "cost_ledger", "notices"})


class JobStore:
    """Job records in the jobs table (key ``job_id``), through a low-level DynamoDB client.

    Every change is one conditional ``UpdateItem``/``PutItem``, so concurrent writers
    (state machine tasks, event handlers, the API) never overwrite each other's fields.
    """

    def __init__(self, table_name: str, *, dynamodb_client: Any) -> None:
        self.table_name = table_name
        self._client = dynamodb_client

    def create(self, record: JobRecord) -> bool:
        """Write a new record; False (and nothing written) if the job id already exists."""
        try:
            self._client.put_item(
                TableName=self.table_name,
                Item=record.to_item(),
                ConditionExpression="attribute_not_exists(job_id)",
            )
        except ClientError as exc:
            if _code(exc) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def get(self, job_id: str) -> JobRecord:
        """The record of ``job_id``; raises :class:`JobNotFoundError`."""
        item = self._get_item(job_id)
        if item is None:
            raise JobNotFoundError(job_id)
        return JobRecord.from_item(item)

    def list_jobs(
        self,
        *,
        status: JobStatus | Iterable[JobStatus] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Up to ``limit`` records (optionally of the given statuses) and a cursor for more.

        A Scan: records come in table order, not by time. ``cursor`` is opaque; pass
        back what the previous page returned. Raises ``ValueError`` for a bad cursor.
        """
        limit = max(1, min(int(limit), MAX_PAGE_SIZE))
        names = {"#kind": "kind"}
        values: dict[str, Any] = {":kind": {"S": RECORD_KIND}}
        condition = "#kind = :kind"
        if status is not None:
            wanted = [JobStatus(status)] if isinstance(status, str) else list(status)
            placeholders = []
            for index, one in enumerate(wanted):
                values[f":s{index}"] = {"S": JobStatus(one).value}
                placeholders.append(f":s{index}")
            names["#status"] = "status"
            condition += f" AND #status IN ({', '.join(placeholders)})"

        start_key = _decode_cursor(cursor) if cursor else None
        records: list[JobRecord] = []
        while True:
            request: dict[str, Any] = {
                "TableName": self.table_name,
                "FilterExpression": condition,
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": values,
                "Limit": limit,
            }
            if start_key:
                request["ExclusiveStartKey"] = start_key
            page = self._client.scan(**request)
            for item in page.get("Items", []):
                records.append(JobRecord.from_item(item))
                if len(records) == limit:
                    # Resume after the last record returned, not after the whole page
                    # (the page may hold more matches than we hand out).
                    return records, _encode_cursor({"job_id": item["job_id"]})
            start_key = page.get("LastEvaluatedKey")
            if not start_key:
                return records, None

    def update(
        self,
        job_id: str,
        *,
        set: Mapping[str, Any] | None = None,  # named after the DynamoDB verb
        add: Mapping[str, int | float] | None = None,
        append: Mapping[str, Iterable[Any]] | None = None,
        expect_status: Iterable[JobStatus] | JobStatus | None = None,
    ) -> JobRecord:
        """Change top-level fields of an existing record in one conditional write.

        ``set`` assigns (``None`` removes), ``add`` adds numeric deltas, ``append``
        extends list fields. With ``expect_status`` the write happens only while the
        record's status is one of those; otherwise :class:`JobConflictError`.
        Returns the record as written.
        """
        builder = _UpdateBuilder()
        for name, value in (set or {}).items():
            _check_field(name)
            if name == "status":
                value = JobStatus(value).value
            builder.set(name, value)
        for name, delta in (add or {}).items():
            if name not in _NUMERIC_FIELDS:
                raise ValueError(f"{name!r} is not a numeric field of a job record")
            builder.add(name, delta)
        for name, items in (append or {}).items():
            if name not in _LIST_FIELDS:
                raise ValueError(f"{name!r} is not a list field of a job record")
            builder.append(name, list(items))
        builder.set("updated_at", utc_now())

        condition = "attribute_exists(job_id)"
        if expect_status is not None:
            condition += " AND " + builder.status_in(_statuses(expect_status))
        return self._conditional_update(job_id, builder, condition, expect_status)

    def set_status(
        self,
        job_id: str,
        status: JobStatus,
        *,
        reason: str | None = None,
        expect_status: Iterable[JobStatus] | JobStatus | None = None,
    ) -> JobRecord:
        """Move the job to ``status``; a terminal status is never left.

        Setting the terminal status a job already has is a no-op that returns the
        record unchanged (a redelivered event must not fail). Any other change away
        from a terminal status, or from outside ``expect_status``, raises
        :class:`JobConflictError`.
        """
        status = JobStatus(status)
        builder = _UpdateBuilder()
        builder.set("status", status.value)
        if reason is not None:
            builder.set("reason", reason)
        builder.set("updated_at", utc_now())
        condition = "attribute_exists(job_id) AND NOT " + builder.status_in(_TERMINAL)
        if expect_status is not None:
            condition += " AND " + builder.status_in(_statuses(expect_status))
        try:
            return self._conditional_update(job_id, builder, condition, expect_status)
        except JobConflictError:
            current = self.get(job_id)
            if current.status is status and status.is_terminal():
                return current
            raise

    def commit_checkpoint(self, job_id: str, checkpoint: Mapping[str, Any]) -> bool:
        """Record ``checkpoint`` unless the stored one has a higher step.

        The step never goes backwards: a late report of an older checkpoint loses
        the condition and returns False. An equal step overwrites (the same
        checkpoint gaining a snapshot id). Raises :class:`JobNotFoundError`.
        """
        step = checkpoint.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
        builder = _UpdateBuilder()
        builder.set("checkpoint", dict(checkpoint))
        builder.set("updated_at", utc_now())
        builder.names["#step"] = "step"
        builder.values[":step"] = {"N": str(step)}
        condition = (
            "attribute_exists(job_id) AND "
            "(attribute_not_exists(#checkpoint.#step) OR #checkpoint.#step <= :step)"
        )
        try:
            self._conditional_update(job_id, builder, condition, None)
        except JobConflictError:
            return False
        return True

    def _conditional_update(
        self,
        job_id: str,
        builder: _UpdateBuilder,
        condition: str,
        expect_status: Iterable[JobStatus] | JobStatus | None,
    ) -> JobRecord:
        try:
            response = self._client.update_item(
                TableName=self.table_name,
                Key={"job_id": {"S": job_id}},
                UpdateExpression=builder.expression(),
                ConditionExpression=condition,
                ExpressionAttributeNames=builder.names,
                ExpressionAttributeValues=builder.values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _code(exc) != "ConditionalCheckFailedException":
                raise
            # Tell "no such job" from "not in the expected state" with one read;
            # the write has already failed, so this read cannot race it into harm.
            item = self._get_item(job_id)
            if item is None:
                raise JobNotFoundError(job_id) from None
            current = JobRecord.from_item(item)
            expected = "" if expect_status is None else f" (expected {_statuses(expect_status)})"
            raise JobConflictError(
                job_id,
                f"status is {current.status.value}{expected}",
                status=current.status.value,
            ) from None
        return JobRecord.from_item(response["Attributes"])

    def _get_item(self, job_id: str) -> dict[str, Any] | None:
        response = self._client.get_item(
            TableName=self.table_name, Key={"job_id": {"S": job_id}}, ConsistentRead=True
        )
        item = response.get("Item")
        if item is None or _deserialize(item.get("kind", {"NULL": True})) != RECORD_KIND:
            return None
        return item


class _UpdateBuilder:
    """Collects SET/ADD/REMOVE clauses with placeholder names and values."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self._set: list[str] = []
        self._add: list[str] = []
        self._remove: list[str] = []

    def _name(self, name: str) -> str:
        self.names[f"#{name}"] = name
        return f"#{name}"

    def _value(self, value: Any) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = _serialize(value)
        return placeholder

    def set(self, name: str, value: Any) -> None:
        if value is None:
            self._remove.append(self._name(name))
        else:
            self._set.append(f"{self._name(name)} = {self._value(value)}")

    def add(self, name: str, delta: int | float) -> None:
        self._add.append(f"{self._name(name)} {self._value(delta)}")

    def append(self, name: str, items: list[Any]) -> None:
        attr = self._name(name)
        empty = self._value([])
        self._set.append(
            f"{attr} = list_append(if_not_exists({attr}, {empty}), {self._value(items)})"
        )

    def status_in(self, statuses: Iterable[str]) -> str:
        placeholders = ", ".join(self._value(status) for status in statuses)
        return f"{self._name('status')} IN ({placeholders})"

    def expression(self) -> str:
        parts = []
        if self._set:
            parts.append("SET " + ", ".join(self._set))
        if self._add:
            parts.append("ADD " + ", ".join(self._add))
        if self._remove:
            parts.append("REMOVE " + ", ".join(self._remove))
        return " ".join(parts)


def _check_field(name: str) -> None:
    if name not in FIELD_NAMES:
        raise ValueError(f"{name!r} is not a field of a job record")


def _statuses(expect: Iterable[JobStatus] | JobStatus) -> list[str]:
    if isinstance(expect, str):
        return [JobStatus(expect).value]
    return [JobStatus(one).value for one in expect]


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


_SERIALIZER = TypeSerializer()
_DESERIALIZER = TypeDeserializer()


def _to_dynamo(value: Any) -> Any:
    """Floats become Decimals (boto3 refuses floats); everything else passes through."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("DynamoDB cannot store NaN or infinity")
        return _DECIMAL_CONTEXT.create_decimal(repr(value))
    if isinstance(value, Mapping):
        return {str(key): _to_dynamo(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_dynamo(item) for item in value]
    if isinstance(value, JobStatus):
        return value.value
    return value


def _from_dynamo(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {key: _from_dynamo(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_dynamo(item) for item in value]
    return value


def _serialize(value: Any) -> dict[str, Any]:
    return _SERIALIZER.serialize(_to_dynamo(value))


def _deserialize(attribute: Mapping[str, Any]) -> Any:
    return _from_dynamo(_DESERIALIZER.deserialize(attribute))


def _encode_cursor(key: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode()


def _decode_cursor(cursor: str) -> dict[str, Any]:
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        job_id = key["job_id"]["S"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise ValueError("invalid cursor") from None
    if not isinstance(job_id, str):
        raise ValueError("invalid cursor")
    return {"job_id": {"S": job_id}}
