"""The attempt's ticket: loading and validating it (docs/contracts.md, "Ticket").

The ticket is the whole interface between the control plane and the instance, so
every field is checked once here and a bad one is named in the error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotrun_trainer.errors import TicketError

TICKET_VERSION = 1
TICKET_ENV = "SPOTRUN_TICKET"


@dataclass(frozen=True)
class Volume:
    """One EBS volume of the attempt, as attached to the instance."""

    role: str
    volume_id: str
    device: str
    mount_point: str
    format_if_empty: bool
    read_only: bool


@dataclass(frozen=True)
class Interval:
    """How often to checkpoint: ``kind`` is ``auto``, ``seconds`` or ``steps``."""

    kind: str
    value: float | None = None


@dataclass(frozen=True)
class CheckpointSettings:
    dir: str
    s3_uri: str | None
    interval: Interval
    keep: int
    expected_interruption_seconds: float
    interruptions_seen: int | None = None  # None: not told (an older control plane)


@dataclass(frozen=True)
class Ticket:
    """A validated ticket. ``task_token`` is None only for a standalone run."""

    job_id: str
    attempt: int
    instance_id: str
    region: str
    task_token: str | None
    image: str | None
    command: tuple[str, ...]
    environment: Mapping[str, str]
    volumes: tuple[Volume, ...]
    dataset: Mapping[str, str] | None
    resume_enabled: bool
    resume_step: int | None
    checkpoint: CheckpointSettings
    model_uri: str
    heartbeat_seconds: float
    notice_poll_seconds: float
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @property
    def dataset_dir(self) -> str | None:
        """The mounted dataset folder, when the dataset is a snapshot."""
        return None if self.dataset is None else self.dataset.get("mount_point")

    @classmethod
    def standalone(cls, checkpoint_dir: str | os.PathLike[str]) -> Ticket:
        """A ticket for running a training script by hand, with no control plane."""
        directory = str(Path(checkpoint_dir).resolve())
        return cls(
            job_id="standalone",
            attempt=1,
            instance_id="local",
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            task_token=None,
            image=None,
            command=(),
            environment={},
            volumes=(),
            dataset=None,
            resume_enabled=True,
            resume_step=None,
            checkpoint=CheckpointSettings(
                dir=directory,
                s3_uri=None,
                interval=Interval("auto"),
                keep=3,
                expected_interruption_seconds=3600.0,
            ),
            model_uri=str(Path(directory) / "model.pt"),
            heartbeat_seconds=60.0,
            notice_poll_seconds=2.0,
        )


def load_ticket(path: str | os.PathLike[str]) -> Ticket:
    """Read and validate the ticket file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise TicketError(f"cannot read ticket {path}: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TicketError(f"ticket {path} is not JSON: {error}") from error
    return parse_ticket(data)


def ticket_from_env() -> Ticket | None:
    """The ticket named by ``SPOTRUN_TICKET``, or None when it is not set."""
    path = os.environ.get(TICKET_ENV)
    return load_ticket(path) if path else None


def parse_ticket(data: Any) -> Ticket:
    """Validate a decoded ticket; raise :class:`TicketError` naming the bad field."""
    root = _Fields(data, "ticket")
    version = root.integer("ticket_version")
    if version != TICKET_VERSION:
        raise TicketError(
            f"ticket field 'ticket_version': expected {TICKET_VERSION}, got {version}"
        )
    checkpoint = root.child("checkpoint")
    resume = root.child("resume")
    output = root.child("output")
    return Ticket(
        job_id=root.text("job_id"),
        attempt=root.integer("attempt", minimum=1),
        instance_id=root.text("instance_id"),
        region=root.text("region"),
        task_token=root.text("task_token"),
        image=root.text("image", optional=True),
        command=root.command("command"),
        environment=root.environment("environment"),
        volumes=tuple(_volume(v) for v in root.items("volumes")),
        dataset=_dataset(root),
        resume_enabled=resume.boolean("enabled"),
        resume_step=resume.integer("checkpoint_step", minimum=0, optional=True),
        checkpoint=CheckpointSettings(
            dir=checkpoint.text("dir"),
            s3_uri=checkpoint.s3_uri("s3_uri", optional=True),
            interval=_interval(checkpoint),
            keep=checkpoint.integer("keep", minimum=1),
            expected_interruption_seconds=checkpoint.number(
                "expected_interruption_seconds", positive=True
            ),
            interruptions_seen=checkpoint.integer("interruptions_seen", minimum=0, optional=True),
        ),
        model_uri=output.text("model_uri"),
        heartbeat_seconds=root.number("heartbeat_seconds", positive=True),
        notice_poll_seconds=root.number("notice_poll_seconds", positive=True),
        raw=data,
    )


def _volume(fields: _Fields) -> Volume:
    return Volume(
        role=fields.text("role"),
        volume_id=fields.text("volume_id"),
        device=fields.text("device"),
        mount_point=fields.absolute_path("mount_point"),
        format_if_empty=fields.boolean("format_if_empty"),
        read_only=fields.boolean("read_only"),
    )


def _dataset(root: _Fields) -> Mapping[str, str] | None:
    value = root.get("dataset", optional=True)
    if value is None:
        return None
    dataset = root.child("dataset")
    if "mount_point" in value:
        return {"mount_point": dataset.absolute_path("mount_point")}
    if "s3_uri" in value:
        return {"s3_uri": dataset.s3_uri("s3_uri")}
    raise TicketError("ticket field 'dataset': needs 'mount_point' or 's3_uri', or null")


def _interval(checkpoint: _Fields) -> Interval:
    value = checkpoint.get("interval")
    if value == "auto":
        return Interval("auto")
    if isinstance(value, dict) and len(value) == 1:
        ((kind, amount),) = value.items()
        if kind in ("seconds", "steps") and _is_number(amount) and amount > 0:
            if kind == "steps" and not isinstance(amount, int):
                raise TicketError("ticket field 'checkpoint.interval.steps': must be an integer")
            return Interval(kind, float(amount) if kind == "seconds" else amount)
    raise TicketError(
        'ticket field \'checkpoint.interval\': must be "auto", {"seconds": N} or '
        f'{{"steps": N}} with N > 0, got {value!r}'
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Fields:
    """Typed access to one JSON object, with errors that carry the field's path."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise TicketError(f"{path}: must be a JSON object, got {type(data).__name__}")
        self._data = data
        self._path = path

    def _name(self, key: str) -> str:
        prefix = "" if self._path == "ticket" else self._path.removeprefix("ticket.") + "."
        return f"ticket field '{prefix}{key}'"

    def get(self, key: str, optional: bool = False) -> Any:
        if key not in self._data:
            if optional:
                return None
            raise TicketError(f"{self._name(key)}: missing")
        return self._data[key]

    def child(self, key: str) -> _Fields:
        value = self.get(key)
        if not isinstance(value, dict):
            raise TicketError(f"{self._name(key)}: must be an object, got {value!r}")
        return _Fields(value, f"{self._path}.{key}")

    def items(self, key: str) -> list[_Fields]:
        value = self.get(key)
        if not isinstance(value, list):
            raise TicketError(f"{self._name(key)}: must be a list, got {value!r}")
        return [_Fields(v, f"{self._path}.{key}[{i}]") for i, v in enumerate(value)]

    def text(self, key: str, optional: bool = False) -> Any:
        value = self.get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise TicketError(f"{self._name(key)}: must be a non-empty string, got {value!r}")
        return value

    def absolute_path(self, key: str) -> str:
        value = self.text(key)
        if not value.startswith("/"):
            raise TicketError(f"{self._name(key)}: must be an absolute path, got {value!r}")
        return value

    def s3_uri(self, key: str, optional: bool = False) -> Any:
        value = self.text(key, optional)
        if value is not None and not value.startswith("s3://"):
            raise TicketError(f"{self._name(key)}: must be an s3:// URI, got {value!r}")
        return value

    def integer(self, key: str, minimum: int | None = None, optional: bool = False) -> Any:
        value = self.get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise TicketError(f"{self._name(key)}: must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise TicketError(f"{self._name(key)}: must be >= {minimum}, got {value}")
        return value

    def number(self, key: str, positive: bool = False) -> float:
        value = self.get(key)
        if not _is_number(value):
            raise TicketError(f"{self._name(key)}: must be a number, got {value!r}")
        if positive and value <= 0:
            raise TicketError(f"{self._name(key)}: must be > 0, got {value}")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise TicketError(f"{self._name(key)}: must be true or false, got {value!r}")
        return value

    def command(self, key: str) -> tuple[str, ...]:
        value = self.get(key)
        if not isinstance(value, list) or not value:
            raise TicketError(f"{self._name(key)}: must be a non-empty list of strings")
        if not all(isinstance(part, str) and part for part in value):
            raise TicketError(f"{self._name(key)}: every element must be a non-empty string")
        return tuple(value)

    def environment(self, key: str) -> dict[str, str]:
        value = self.get(key, optional=True)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise TicketError(f"{self._name(key)}: must map strings to strings")
        return dict(value)
