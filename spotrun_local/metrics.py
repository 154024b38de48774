"""A job's run measured from outside: the trainer's lines and the faults delivered.

Time-to-safe is the notice → the first durable checkpoint the interrupted
instance reports after it; recovery is the notice → the first training step
reported by a later instance of the job; steps lost is the newest step the
interrupted instance reached minus the step the next attempt resumed from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from spotrun_local.chaos import Delivered
from spotrun_local.instances import LocalInstance, TrainerLine


@dataclass
class InterruptionOutcome:
    kind: str
    instance_id: str
    notice_time: float
    step_at_notice: int | None
    time_to_safe_seconds: float | None = None
    safe_step: int | None = None
    recovery_seconds: float | None = None
    resumed_from: int | None = None
    steps_lost: int | None = None


@dataclass
class JobTimeline:
    """All trainer lines of one job in time order, and the faults it met."""

    job_id: str
    lines: list[TrainerLine] = field(default_factory=list)
    faults: list[Delivered] = field(default_factory=list)

    @classmethod
    def collect(
        cls, job_id: str, instances: Iterable[LocalInstance], delivered: Iterable[Delivered]
    ) -> JobTimeline:
        lines = sorted(
            (
                line
                for instance in instances
                if instance.job_id == job_id
                for line in instance.lines
            ),
            key=lambda line: line.received,
        )
        faults = sorted(
            (fault for fault in delivered if fault.job_id == job_id), key=lambda fault: fault.time
        )
        return cls(job_id, lines, faults)

    def max_step(self) -> int:
        steps = [int(line.event["step"]) for line in self.lines if "step" in line.event]
        steps += [
            int(line.event["final_step"]) for line in self.lines if "final_step" in line.event
        ]
        return max(steps, default=0)

    def losses(self) -> list[tuple[int, float, str]]:
        """(step, loss, instance) of every step line that carries a loss."""
        return [
            (int(line.event["step"]), float(line.event["loss"]), line.instance_id)
            for line in self.lines
            if line.event.get("event") == "step" and line.event.get("loss") is not None
        ]

    def attempts(self) -> list[str]:
        """Instance ids in the order they started training."""
        order: list[str] = []
        for line in self.lines:
            if line.instance_id not in order:
                order.append(line.instance_id)
        return order

    def interruptions(self) -> list[InterruptionOutcome]:
        outcomes = []
        for fault in self.faults:
            if fault.kind == "rebalance":
                continue
            outcome = InterruptionOutcome(fault.kind, fault.instance_id, fault.time, fault.step)
            own = [line for line in self.lines if line.instance_id == fault.instance_id]
            after = [line for line in own if line.received >= fault.time]
            # The checkpoint the notice made: the one the trainer reported, or failing
            # a report, the first at or past the step reached. An interval save that
            # was in flight at the notice commits an older step first; it is not it.
            report = next(
                (
                    line
                    for line in after
                    if line.event.get("event") == "report"
                    and line.event.get("checkpoint_step") is not None
                ),
                None,
            )
            target = int(report.event["checkpoint_step"]) if report else (fault.step or 0)
            for line in after:
                if (
                    line.event.get("event") == "checkpoint"
                    and line.event.get("durable", True)
                    and int(line.event["step"]) >= target
                ):
                    outcome.time_to_safe_seconds = line.received - fault.time
                    outcome.safe_step = int(line.event["step"])
                    break
            reached = [
                int(line.event["step"])
                for line in own
                if line.event.get("event") in ("step", "checkpoint") and "step" in line.event
            ]
            later = [
                line
                for line in self.lines
                if line.received > fault.time and line.instance_id != fault.instance_id
            ]
            start = next((line for line in later if line.event.get("event") == "start"), None)
            step = next((line for line in later if line.event.get("event") == "step"), None)
            if step is not None:
                outcome.recovery_seconds = step.received - fault.time
            if start is not None:
                outcome.resumed_from = int(start.event.get("resumed_from") or 0)
                if reached:
                    outcome.steps_lost = max(0, max(reached) - outcome.resumed_from)
            outcomes.append(outcome)
        return outcomes

    def attempt_starts(self) -> list[tuple[str, int]]:
        """(instance, step it started from) for every attempt that started training."""
        return [
            (line.instance_id, int(line.event.get("resumed_from") or 0))
            for line in self.lines
            if line.event.get("event") == "start"
        ]
