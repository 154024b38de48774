"""When to checkpoint: every N steps, every N seconds, or ``auto`` (Young/Daly).

``auto`` balances the cost of checkpointing against the work an interruption
throws away. With C the cost of one checkpoint and M the mean time between
interruptions, Young's first-order optimum is ``sqrt(2·C·M)``; Daly's correction
subtracts C (J. T. Daly, "A higher order estimate of the optimum checkpoint
interval for restart dumps", FGCS 2006). Here:

* C is the measured stall (the first checkpoint, before any measurement, comes
  after ``first_seconds``): how long the training loop was blocked by a save
  (staging a copy of the state). An asynchronous save costs little more than
  that, but it occupies the writer, so the interval is never shorter than twice
  the time a save takes to become durable: the writer stays idle half the time
  and a save never waits for the previous one.
* M starts from the ticket's ``expected_interruption_seconds`` and is updated
  with what this job has seen: with n interruptions in T seconds of training, the
  estimate is ``(M0 + T) / (1 + n)`` (the posterior mean of an exponential
  lifetime with the ticket's value as one prior observation). On attempt 4 after
  600 s of training with M0 = 3600 that gives (3600 + 600) / 4 = 1050 s.

Example: C = 0.05 s and M = 3600 s give sqrt(2·0.05·3600) - 0.05 ≈ 19 s.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from spotrun_trainer.ticket import Interval

DEFAULT_MIN_SECONDS = 2.0
DEFAULT_MAX_SECONDS = 3600.0
# Until one save has been measured, C is unknown: the first checkpoint comes after
# this long, so the formula works with a measured cost from then on.
DEFAULT_FIRST_SECONDS = 10.0


@dataclass(frozen=True)
class SaveCost:
    """What one committed save cost: loop stall and time until durable."""

    stall_seconds: float
    seconds: float


class IntervalPolicy(ABC):
    """Decides at each step whether a checkpoint is due."""

    # A time-based policy is due again at the next step, so while a save is still
    # being written it is better to wait a step than to stall on the writer.
    skip_while_busy = True

    def __init__(self) -> None:
        self.last_step: int | None = None
        self.last_time: float | None = None

    def start(self, step: int, now: float | None = None) -> None:
        """The run starts (or resumes) at ``step``: intervals count from here."""
        self.last_step = step
        self.last_time = time.monotonic() if now is None else now

    def saved(self, step: int, now: float | None = None) -> None:
        """A save of ``step`` was started at ``now``."""
        self.last_step = step
        self.last_time = time.monotonic() if now is None else now

    def measured(self, cost: SaveCost) -> None:  # noqa: B027 - optional hook
        """A save committed; policies that adapt use its cost."""

    @abstractmethod
    def due(self, step: int, now: float | None = None) -> bool:
        """True when ``step`` should be checkpointed."""


class EveryNSteps(IntervalPolicy):
    # The user asked for these exact steps: save them, even if that means waiting.
    skip_while_busy = False

    def __init__(self, steps: int) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps

    def due(self, step: int, now: float | None = None) -> bool:
        return step > 0 and step % self.steps == 0 and step != self.last_step


class EveryNSeconds(IntervalPolicy):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        self.seconds = seconds

    def due(self, step: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.last_time is None:
            self.start(step, now)
            return False
        return step != self.last_step and now - self.last_time >= self.seconds


class YoungDaly(IntervalPolicy):
    """The ``auto`` interval; see the module docstring for the reasoning."""

    def __init__(
        self,
        expected_interruption_seconds: float,
        *,
        interruptions_seen: int = 0,
        elapsed_seconds: float = 0.0,
        min_seconds: float = DEFAULT_MIN_SECONDS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        first_seconds: float = DEFAULT_FIRST_SECONDS,
        smoothing: float = 0.3,
    ) -> None:
        super().__init__()
        if expected_interruption_seconds <= 0:
            raise ValueError("expected_interruption_seconds must be > 0")
        self.prior_seconds = float(expected_interruption_seconds)
        self.interruptions_seen = max(0, int(interruptions_seen))
        self.elapsed_before = max(0.0, float(elapsed_seconds))
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.first_seconds = first_seconds
        self.stall_seconds = 0.0
        self.save_seconds = 0.0
        self._smoothing = smoothing
        self._measured = False
        self._attempt_started = time.monotonic()

    def elapsed_seconds(self, now: float | None = None) -> float:
        """Training time of the whole job: earlier attempts plus this one so far."""
        now = time.monotonic() if now is None else now
        return self.elapsed_before + max(0.0, now - self._attempt_started)

    def start(self, step: int, now: float | None = None) -> None:
        super().start(step, now)
        self._attempt_started = self.last_time  # type: ignore[assignment]

    def mean_time_between_interruptions(self, now: float | None = None) -> float:
        return (self.prior_seconds + self.elapsed_seconds(now)) / (1 + self.interruptions_seen)

    def measured(self, cost: SaveCost) -> None:
        if not self._measured:
            self.stall_seconds, self.save_seconds = cost.stall_seconds, cost.seconds
            self._measured = True
            return
        # Smooth: one slow save (a cold page cache, a busy disk) must not swing it.
        a = self._smoothing
        self.stall_seconds = (1 - a) * self.stall_seconds + a * cost.stall_seconds
        self.save_seconds = (1 - a) * self.save_seconds + a * cost.seconds

    def interval_seconds(self, now: float | None = None) -> float:
        mtbi = self.mean_time_between_interruptions(now)
        if not self._measured:
            return min(max(self.first_seconds, self.min_seconds), mtbi)
        cost = max(self.stall_seconds, 1e-3)
        # When a checkpoint costs half the MTBI or more, once per MTBI is all that pays.
        interval = math.sqrt(2 * cost * mtbi) - cost if cost < mtbi / 2 else mtbi
        lower = max(self.min_seconds, 2 * self.save_seconds)
        upper = max(lower, min(self.max_seconds, mtbi))
        return min(max(interval, lower), upper)

    def due(self, step: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.last_time is None:
            self.start(step, now)
            return False
        return step != self.last_step and now - self.last_time >= self.interval_seconds(now)


def make_policy(
    interval: Interval,
    *,
    expected_interruption_seconds: float = 3600.0,
    interruptions_seen: int = 0,
    elapsed_seconds: float = 0.0,
) -> IntervalPolicy:
    """The policy for a ticket's ``checkpoint.interval``."""
    if interval.kind == "steps":
        return EveryNSteps(int(interval.value))  # type: ignore[arg-type]
    if interval.kind == "seconds":
        return EveryNSeconds(float(interval.value))  # type: ignore[arg-type]
    if interval.kind == "auto":
        return YoungDaly(
            expected_interruption_seconds,
            interruptions_seen=interruptions_seen,
            elapsed_seconds=elapsed_seconds,
        )
    raise ValueError(f"unknown interval kind {interval.kind!r}")
