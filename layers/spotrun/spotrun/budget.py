"""Whether a job may launch another attempt: interruptions, restarts, deadline, cost cap."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from spotrun.jobs import JobRecord
from spotrun.spec import JobSpec

# Outcomes of an attempt (the ``outcome`` on attempts[] and in the state data).
INTERRUPTED = "interrupted"  # Spot.Interrupted, Instance.Lost, heartbeat timeout
RESTART = "trainer-failed"  # Trainer.Failed: the program's own error
TIMED_OUT = "timed-out"  # Run Trainer's deadline/cost timeout (States.Timeout)
SUCCEEDED = "succeeded"
FAILED = "failed"

RELAUNCHABLE = frozenset({INTERRUPTED, RESTART, TIMED_OUT})


@dataclass(frozen=True)
class Verdict:
    """The answer to "Can We Relaunch?"; ``reason`` says why not."""

    relaunch: bool
    reason: str | None = None


def verdict(record: JobRecord, spec: JobSpec, outcome: str, *, now: datetime) -> Verdict:
    """Decide after an attempt ended with ``outcome``; the counters on ``record`` include it.

    Order matters only for the reason shown: the deadline and the cost cap are
    hard limits of the job, the two counters are limits of patience.
    """
    if outcome not in RELAUNCHABLE:
        return Verdict(False)
    limit = exhausted(record, spec, now=now)
    if limit:
        return Verdict(False, limit)
    if record.interruptions > spec.max_interruptions:
        return Verdict(
            False,
            f"interrupted {record.interruptions} times; max_interruptions is "
            f"{spec.max_interruptions}",
        )
    if record.restarts_on_error > spec.max_restarts_on_error:
        last_error = _last_error(record)
        return Verdict(
            False,
            f"trainer failed {record.restarts_on_error} times (max_restarts_on_error is "
            f"{spec.max_restarts_on_error}); last error: {last_error}",
        )
    return Verdict(True)


def exhausted(
    record: JobRecord, spec: JobSpec, *, now: datetime, open_cost_usd: float = 0.0
) -> str | None:
    """The hard limit the job has reached (deadline, cost cap), or None.

    ``open_cost_usd`` is what attempts still running have cost so far: the ledger
    (``record.cost_usd``) has an attempt only once it is released.
    """
    if spec.deadline is not None and now >= spec.deadline:
        return f"deadline {spec.deadline.isoformat()} passed"
    spent = record.cost_usd + open_cost_usd
    if spec.cost_cap_usd is not None and spent >= spec.cost_cap_usd:
        return f"cost cap ${spec.cost_cap_usd:.2f} reached (${spent:.2f} spent)"
    return None


def run_timeout_seconds(
    record: JobRecord,
    spec: JobSpec,
    price_per_hour: float | None,
    *,
    now: datetime,
    heartbeat_timeout_seconds: int,
) -> int:
    """How long Run Trainer may last before the deadline or the cost cap is hit.

    Enforced by the state's ``TimeoutSecondsPath``, so a job that is never
    interrupted still stops at its limits without a polling loop. Step Functions
    wants the timeout above the heartbeat timeout, and at most a year.
    """
    limit = 365 * 24 * 3600.0
    if spec.deadline is not None:
        limit = min(limit, (spec.deadline - now).total_seconds())
    if spec.cost_cap_usd is not None and price_per_hour:
        remaining = max(0.0, spec.cost_cap_usd - record.cost_usd)
        limit = min(limit, remaining / price_per_hour * 3600.0)
    return max(int(limit), heartbeat_timeout_seconds + 1)


def _last_error(record: JobRecord) -> str:
    for attempt in reversed(record.attempts):
        if attempt.get("error"):
            return str(attempt["error"])
    return "unknown"
