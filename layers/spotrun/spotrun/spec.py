"""The job spec (version 1): its model, its constraints, and parsing a submitted body."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from spotrun.errors import SpecError
from spotrun.tags import RESERVED_PREFIXES

MAX_SPEC_BYTES = 64 * 1024
DEFAULT_COMMAND = ("python", "-m", "spotrun_trainer.examples.tiny_lm")
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 300
# EC2 allows 50 tags per resource; spotrun adds up to four of its own (tags.py).
MAX_USER_TAGS = 40
BODY = "$"  # the "field" of an error about the body as a whole


def _matches(pattern: str, what: str):
    """A validator that accepts strings matching ``pattern`` and names ``what`` otherwise."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {what}, got {value!r}")
        return value

    return AfterValidator(check)


JobName = Annotated[
    str,
    _matches(
        r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
        "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    ),
]
InstanceType = Annotated[
    str, _matches(r"[a-z][a-z0-9-]*\.[a-z0-9-]+", "an EC2 instance type such as 'g5.xlarge'")
]
SubnetId = Annotated[
    str, _matches(r"subnet-[0-9a-f]{8,17}", "a subnet id such as 'subnet-0a1b2c3d'")
]
SnapshotId = Annotated[
    str, _matches(r"snap-[0-9a-f]{8,17}", "a snapshot id such as 'snap-0123456789abcdef0'")
]
S3Uri = Annotated[
    str,
    _matches(
        r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x1f]*)?",
        "an S3 URI 's3://<bucket>/<prefix>'",
    ),
]
MountPoint = Annotated[str, _matches(r"/[A-Za-z0-9._/-]*", "an absolute path")]
EnvName = Annotated[str, _matches(r"[A-Za-z_][A-Za-z0-9_]{0,127}", "an environment variable name")]
CommandWord = Annotated[str, Field(min_length=1, max_length=4096)]
PositiveMoney = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _check_interval(value: Any) -> str | dict[str, int]:
    """``"auto"``, ``{"seconds": N}`` or ``{"steps": N}`` with N a positive integer."""
    if value == "auto":
        return "auto"
    if isinstance(value, dict) and len(value) == 1:
        ((unit, amount),) = value.items()
        if (
            unit in ("seconds", "steps")
            and isinstance(amount, int)
            and not isinstance(amount, bool)
            and 0 < amount <= 10**9
        ):
            return {unit: amount}
    raise ValueError('must be "auto", {"seconds": N} or {"steps": N} with N a positive integer')


# PlainValidator: one clear message instead of pydantic's per-union-member errors.
CheckpointInterval = Annotated[
    str | dict[str, int], PlainValidator(_check_interval), PlainSerializer(lambda v: v)
]


def _check_tag_key(key: str) -> str:
    if not 1 <= len(key) <= 128:
        raise ValueError("tag keys are 1-128 characters")
    if key.lower().startswith(RESERVED_PREFIXES):
        raise ValueError(f"tag keys may not start with {' or '.join(RESERVED_PREFIXES)}")
    return key


TagKey = Annotated[str, AfterValidator(_check_tag_key)]
TagValue = Annotated[str, Field(max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class DatasetSpec(_Strict):
    """Where the training data comes from: an EBS snapshot or an S3 prefix."""

    snapshot_id: SnapshotId | None = None
    s3_uri: S3Uri | None = None
    volume_size_gib: Annotated[int, Field(ge=1, le=65536)] | None = None
    mount_point: MountPoint = "/mnt/spotrun/data"

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DatasetSpec:
        if (self.snapshot_id is None) == (self.s3_uri is None):
            raise ValueError("give exactly one of snapshot_id, s3_uri")
        return self


class CheckpointSpec(_Strict):
    """How often to checkpoint, how many to keep, and whether to mirror them to S3."""

    volume_size_gib: Annotated[int, Field(ge=1, le=16384)] = 50
    interval: CheckpointInterval = "auto"
    keep: Annotated[int, Field(ge=1, le=100)] = 3
    s3_mirror: bool = True
    s3_uri: S3Uri | None = None
    expected_interruption_seconds: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] = 3600


class JobSpec(_Strict):
    """A training job as submitted. Only ``name`` is required.

    ``image``, ``instance_types``, ``subnets`` and ``heartbeat_timeout_seconds`` are
    filled from the deployment's defaults by :func:`parse_spec`, so a stored spec
    always has them. ``deadline`` must be in the future only at submission: a
    stored spec read back later validates with a past deadline.
    """

    spec_version: Literal[1] = 1
    name: JobName
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    command: Annotated[list[CommandWord], Field(min_length=1, max_length=256)] = Field(
        default_factory=lambda: list(DEFAULT_COMMAND)
    )
    instance_types: Annotated[list[InstanceType], Field(max_length=20)] = Field(
        default_factory=list
    )
    subnets: Annotated[list[SubnetId], Field(max_length=16)] = Field(default_factory=list)
    dataset: DatasetSpec | None = None
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    max_interruptions: Annotated[int, Field(ge=0, le=1000)] = 10
    max_restarts_on_error: Annotated[int, Field(ge=0, le=100)] = 2
    on_demand_fallback: bool = False
    max_spot_price: PositiveMoney | None = None
    deadline: AwareDatetime | None = None
    cost_cap_usd: PositiveMoney | None = None
    heartbeat_timeout_seconds: Annotated[int, Field(ge=5, le=3600)] | None = None
    environment: Annotated[
        dict[EnvName, Annotated[str, Field(max_length=32768)]], Field(max_length=100)
    ] = Field(default_factory=dict)
    tags: Annotated[dict[TagKey, TagValue], Field(max_length=MAX_USER_TAGS)] = Field(
        default_factory=dict
    )

    @field_validator("instance_types", "subnets")
    @classmethod
    def _no_duplicates(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("must not repeat an entry")
        return values

    @field_validator("deadline")
    @classmethod
    def _deadline_in_future(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        # Only checked when the caller says "now" (submission); see the class docstring.
        now = (info.context or {}).get("now")
        if value is not None and now is not None and value <= now:
            raise ValueError(f"must be in the future (now is {now.isoformat()})")
        return value

    def to_record(self) -> dict[str, Any]:
        """The JSON form stored on the job record (datetimes as ISO-8601 strings)."""
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class SpecDefaults:
    """The deployment's defaults for what a spec may leave out."""

    image: str | None = None
    instance_types: tuple[str, ...] = ()
    subnets: tuple[str, ...] = ()
    heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SpecDefaults:
        """Read ``TRAINER_IMAGE_URI``, ``DEFAULT_INSTANCE_TYPES``, ``SUBNET_IDS``,
        ``HEARTBEAT_TIMEOUT_SECONDS`` (the names the template sets)."""
        env = os.environ if environ is None else environ
        return cls(
            image=env.get("TRAINER_IMAGE_URI") or None,
            instance_types=_split(env.get("DEFAULT_INSTANCE_TYPES", "")),
            subnets=_split(env.get("SUBNET_IDS", "")),
            heartbeat_timeout_seconds=int(
                env.get("HEARTBEAT_TIMEOUT_SECONDS") or DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
            ),
        )


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def parse_spec(
    raw: bytes | str | dict[str, Any],
    *,
    defaults: SpecDefaults,
    now: datetime | None = None,
) -> JobSpec:
    """Validate a submitted spec and fill in the deployment's defaults.

    Every problem -- a body over 64 KiB, malformed JSON, a non-object, wrong types,
    unknown fields, a past deadline, nothing to fall back on for a default -- comes
    out as one :class:`SpecError` listing each bad field and the reason.
    """
    data = _decode(raw)
    now = now or datetime.now(UTC)
    try:
        # Strict JSON validation: "5" is not an integer and true is not a count, but
        # an ISO-8601 string is a datetime (JSON has no datetime type).
        spec = JobSpec.model_validate_json(json.dumps(data), strict=True, context={"now": now})
    except ValidationError as exc:
        raise SpecError(_field_errors(exc)) from None

    filled: dict[str, Any] = {}
    missing: list[dict[str, str]] = []
    if spec.image is None:
        if defaults.image:
            filled["image"] = defaults.image
        else:
            missing.append(_missing("image", "TRAINER_IMAGE_URI"))
    if not spec.instance_types:
        if defaults.instance_types:
            filled["instance_types"] = list(defaults.instance_types)
        else:
            missing.append(_missing("instance_types", "DEFAULT_INSTANCE_TYPES"))
    if not spec.subnets:
        if defaults.subnets:
            filled["subnets"] = list(defaults.subnets)
        else:
            missing.append(_missing("subnets", "SUBNET_IDS"))
    if spec.heartbeat_timeout_seconds is None:
        filled["heartbeat_timeout_seconds"] = defaults.heartbeat_timeout_seconds
    if missing:
        raise SpecError(missing)
    # model_copy skips validation; the defaults come from the deployment, so run them
    # through the model once more to keep a bad default from reaching the record.
    try:
        return JobSpec.model_validate({**spec.model_dump(), **filled})
    except ValidationError as exc:
        raise SpecError(
            [{**e, "reason": f"deployment default: {e['reason']}"} for e in _field_errors(exc)]
        ) from None


def _decode(raw: bytes | str | dict[str, Any]) -> Any:
    if isinstance(raw, dict):
        size = len(json.dumps(raw, separators=(",", ":"), default=str).encode())
        data: Any = raw
    else:
        body = raw.encode() if isinstance(raw, str) else bytes(raw)
        size = len(body)
        data = None
    if size > MAX_SPEC_BYTES:
        raise SpecError(
            [{"field": BODY, "reason": f"spec is {size} bytes; the limit is {MAX_SPEC_BYTES}"}]
        )
    if data is None:
        try:
            # Decoded here: json.loads would guess UTF-16/32 from the bytes.
            data = json.loads(body.decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise SpecError([{"field": BODY, "reason": "not UTF-8 text"}]) from None
        except json.JSONDecodeError as exc:
            raise SpecError([{"field": BODY, "reason": f"not valid JSON: {exc}"}]) from None
    if not isinstance(data, dict):
        raise SpecError(
            [{"field": BODY, "reason": f"must be a JSON object, got {type(data).__name__}"}]
        )
    return data


def _missing(field: str, variable: str) -> dict[str, str]:
    return {"field": field, "reason": f"not given, and the deployment sets no {variable}"}


def _field_errors(exc: ValidationError) -> list[dict[str, str]]:
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        errors.append({"field": _path(error["loc"]), "reason": _reason(error)})
    return errors


def _path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":
            # pydantic marks a bad dict key with a "[key]" element after the key.
            path += " (key)"
        else:
            path += f".{part}" if path else str(part)
    return path or BODY


def _reason(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    return str(error["msg"])
