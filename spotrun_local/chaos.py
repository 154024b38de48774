"""Chaos: spot interruptions, rebalance recommendations and silent deaths, delivered as AWS does.

An interruption is: the IMDS notice on the instance (``spot/instance-action``),
the "EC2 Spot Instance Interruption Warning" event to the rules, then after the
notice period (two minutes on AWS; scaled down for demos and tests) EC2
terminates the instance, which the instance runner turns into SIGTERM/SIGKILL
and the shutting-down/terminated state-change events. A rebalance
recommendation is the IMDS entry and its event, nothing more. A kill is a
SIGKILL of the instance's processes with moto's record left "running" — no
notice, no event — which only a heartbeat timeout can discover.

Triggers: a training step (followed on the trainer's stdout JSON lines), a
time since the plan was armed, or a random rate per minute of training.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from spotrun_local.aws import ACCOUNT_ID, REGION, MotoServer
from spotrun_local.instances import InstanceRunner, LocalInstance

log = logging.getLogger(__name__)

SPOT_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
KINDS = ("interrupt", "rebalance", "kill")


@dataclass
class Fault:
    """One scheduled fault: at a step of the job's training, or at seconds after arming."""

    kind: str = "interrupt"
    at_step: int | None = None
    at_seconds: float | None = None
    fired: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")
        if (self.at_step is None) == (self.at_seconds is None):
            raise ValueError("a fault needs exactly one of at_step and at_seconds")


@dataclass(frozen=True)
class Delivered:
    """A fault as it happened: which instance, when, and the step it had reached."""

    kind: str
    job_id: str | None
    instance_id: str
    attempt: str | None
    time: float
    step: int | None
    termination_time: float | None


@dataclass
class Chaos:
    """Delivers faults to the instances of one job (or of any job when ``job_id`` is None)."""

    aws: MotoServer
    runner: InstanceRunner
    put_event: Callable[[str, str, dict, list[str]], None]
    notice_seconds: float = 120.0
    faults: list[Fault] = field(default_factory=list)
    random_rate_per_minute: float = 0.0
    seed: int = 0
    job_id: str | None = None
    delivered: list[Delivered] = field(default_factory=list)
    _armed_at: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _noticed: set[str] = field(default_factory=set)
    _last_step: dict[str, int] = field(default_factory=dict)

    def start(self) -> Chaos:
        self._random = random.Random(self.seed)
        self._ec2 = self.aws.client("ec2")
        self.runner.listeners.append(self._on_trainer_line)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="chaos")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._on_trainer_line in self.runner.listeners:
            self.runner.listeners.remove(self._on_trainer_line)

    def arm(
        self,
        job_id: str | None,
        faults: list[Fault] | None = None,
        random_rate_per_minute: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Aim at ``job_id`` and (re)start the clock of ``at_seconds`` faults; ``seed``
        restarts the random interruptions' generator."""
        with self._lock:
            self.job_id = job_id
            if seed is not None:
                self.seed = seed
                self._random = random.Random(seed)
            if faults is not None:
                self.faults = list(faults)
            if random_rate_per_minute is not None:
                self.random_rate_per_minute = random_rate_per_minute
            self._armed_at = time.time()

    # -- triggers ------------------------------------------------------------------------

    def _ours(self, instance: LocalInstance) -> bool:
        return self.job_id is None or instance.job_id == self.job_id

    def _training(self) -> list[LocalInstance]:
        """Instances of the job that train now: alive, not ending, not already noticed."""
        return [
            instance
            for instance in self.runner.instances.values()
            if self._ours(instance)
            and instance.ended is None
            and not instance.killed_without_notice
            and instance.instance_id not in self._noticed
            and instance.instance_id in self._last_step
        ]

    def _on_trainer_line(self, instance: LocalInstance, event: dict) -> None:
        if event.get("event") != "step" or not self._ours(instance):
            return
        step = int(event["step"])
        with self._lock:
            self._last_step[instance.instance_id] = step
            if instance.instance_id in self._noticed:
                return
            for fault in self.faults:
                if not fault.fired and fault.at_step is not None and step >= fault.at_step:
                    fault.fired = True
                    self.deliver(fault.kind, instance)
                    return

    def _loop(self) -> None:
        tick = 0.2
        while not self._stop.wait(tick):
            with self._lock:
                if self._armed_at is None:
                    continue
                training = self._training()
                if not training:
                    continue
                elapsed = time.time() - self._armed_at
                for fault in self.faults:
                    if (
                        not fault.fired
                        and fault.at_seconds is not None
                        and elapsed >= fault.at_seconds
                    ):
                        fault.fired = True
                        self.deliver(fault.kind, training[0])
                        break
                else:
                    chance = self.random_rate_per_minute * tick / 60.0
                    if chance and self._random.random() < chance:
                        self.deliver("interrupt", self._random.choice(training))

    # -- delivery ------------------------------------------------------------------------

    def deliver(self, kind: str, instance: LocalInstance) -> Delivered:
        """Deliver one fault to ``instance`` now."""
        with self._lock:
            now = time.time()
            arn = f"arn:aws:ec2:{REGION}:{ACCOUNT_ID}:instance/{instance.instance_id}"
            termination = None
            if kind == "interrupt":
                self._noticed.add(instance.instance_id)
                termination = now + self.notice_seconds
                instance.imds.notify_interruption(termination)
                self.put_event(
                    "aws.ec2",
                    SPOT_WARNING,
                    {"instance-id": instance.instance_id, "instance-action": "terminate"},
                    [arn],
                )
                timer = threading.Timer(self.notice_seconds, self._terminate, [instance])
                timer.daemon = True
                timer.start()
            elif kind == "rebalance":
                instance.imds.notify_rebalance(now)
                self.put_event("aws.ec2", REBALANCE, {"instance-id": instance.instance_id}, [arn])
            else:
                self._noticed.add(instance.instance_id)
                self.runner.kill_without_notice(instance.instance_id)
            record = Delivered(
                kind=kind,
                job_id=instance.job_id,
                instance_id=instance.instance_id,
                attempt=instance.attempt,
                time=now,
                step=self._last_step.get(instance.instance_id),
                termination_time=termination,
            )
            self.delivered.append(record)
            log.info("chaos: %s on %s at step %s", kind, instance.instance_id, record.step)
            return record

    def _terminate(self, instance: LocalInstance) -> None:
        """The end of the notice: EC2 reclaims the instance (if it is still there)."""
        if self._stop.is_set() or instance.ended is not None:
            return
        try:
            self._ec2.terminate_instances(InstanceIds=[instance.instance_id])
        except Exception as error:  # already gone, or the cloud is shutting down
            log.info("chaos: terminate %s: %s", instance.instance_id, error)
