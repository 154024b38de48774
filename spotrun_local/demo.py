"""``make demo``: one real job on the local cloud, interrupted on schedule, shown live.

Starts the local cloud, submits the example job through the REST API, delivers
the interruptions (IMDS notice + EventBridge warning + termination after the
notice period), shows a progress bar with the job's status and each
interruption's time-to-safe and recovery time, then writes
``<out>/summary.json``, ``<out>/timeline.png`` and the final model.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from spotrun_local.capacity import CapacityFault
from spotrun_local.chaos import Fault
from spotrun_local.cloud import TERMINAL, CloudConfig, LocalCloud
from spotrun_local.metrics import JobTimeline
from spotrun_local.plot import plot_timeline

log = logging.getLogger(__name__)

# Small enough to finish in about a minute on two cores, big enough to show a curve.
DEFAULT_STEPS = 200
EXAMPLE_SPEC: dict[str, Any] = {
    "name": "tiny-lm-demo",
    "command": ["python", "-m", "spotrun_trainer.examples.tiny_lm"],
    "environment": {
        "SPOTRUN_EXAMPLE_D_MODEL": "32",
        "SPOTRUN_EXAMPLE_LAYERS": "1",
        "SPOTRUN_EXAMPLE_CONTEXT": "32",
        "SPOTRUN_EXAMPLE_BATCH": "8",
        "SPOTRUN_EXAMPLE_EVAL_EVERY": "50",
        "SPOTRUN_EXAMPLE_PATIENCE": "1000",
    },
    "checkpoint": {"interval": {"steps": 20}, "keep": 2},
    "heartbeat_timeout_seconds": 20,
    "max_interruptions": 10,
}


@dataclass
class DemoOptions:
    interruptions: int = 3
    seed: int = 0
    notice_seconds: float = 6.0
    steps: int = DEFAULT_STEPS
    step_sleep: float = 0.05
    spec: Mapping[str, Any] | None = None
    faults: list[Fault] | None = None  # an explicit schedule replaces ``interruptions``
    random_rate_per_minute: float = 0.0
    capacity_faults: list[CapacityFault] = field(default_factory=list)
    out: Path = Path("out/demo")
    timeout_seconds: float = 600.0
    template: Path | None = None
    root: Path | None = None  # keep the cloud's files (logs, volumes, instances) here


def parse_schedule(text: str) -> list[Fault]:
    """``"interrupt@step=60,kill@step=120,rebalance@t=20"`` → faults."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, when = item.partition("@")
        key, _, value = when.partition("=")
        if key == "step":
            faults.append(Fault(kind=kind, at_step=int(value)))
        elif key in ("t", "time", "seconds"):
            faults.append(Fault(kind=kind, at_seconds=float(value)))
        else:
            raise ValueError(f"bad schedule item {item!r}: use KIND@step=N or KIND@t=SECONDS")
    return faults


def parse_pool(text: str) -> CapacityFault:
    """``"g5.xlarge@us-east-1a"``, ``"g5.xlarge"`` or ``"@us-east-1b"`` → a refusing fault."""
    instance_type, _, zone = text.partition("@")
    return CapacityFault(
        instance_type=instance_type or None, availability_zone=zone or None, market="spot"
    )


def job_spec(options: DemoOptions) -> dict[str, Any]:
    spec = json.loads(json.dumps(options.spec or EXAMPLE_SPEC))
    environment = spec.setdefault("environment", {})
    environment.setdefault("SPOTRUN_EXAMPLE_STEPS", str(options.steps))
    environment.setdefault("SPOTRUN_EXAMPLE_STEP_SLEEP", str(options.step_sleep))
    environment.setdefault("SPOTRUN_EXAMPLE_SEED", str(1234 + options.seed))
    return spec


def spread_interruptions(count: int, steps: int) -> list[Fault]:
    """``count`` interruptions at evenly spaced steps of the run."""
    return [Fault(kind="interrupt", at_step=steps * (i + 1) // (count + 1)) for i in range(count)]


def cloud_config(options: DemoOptions) -> CloudConfig:
    config = CloudConfig(notice_seconds=options.notice_seconds, root=options.root)
    if options.template is not None:
        config.template = options.template
    return config


class LiveView:
    """The terminal view: a progress bar line, and one line per event worth keeping."""

    def __init__(self, total_steps: int, stream: TextIO = sys.stdout) -> None:
        self.total, self.stream = total_steps, stream
        self.tty = stream.isatty()
        self._last_plain = 0.0

    def event(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, step: int, status: str, attempt: int, elapsed: float) -> None:
        width = 30
        done = min(width, int(width * step / max(1, self.total)))
        bar = "#" * done + "-" * (width - done)
        line = (
            f"[{bar}] step {step:>4}/{self.total}  {status:<11} attempt {attempt}  {elapsed:5.1f}s"
        )
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
        elif time.monotonic() - self._last_plain > 5:
            self._last_plain = time.monotonic()
            self.event(line)


def run_demo(options: DemoOptions, stream: TextIO = sys.stdout) -> dict[str, Any]:
    """Run the demo; return the summary (also written to ``options.out``)."""
    spec = job_spec(options)
    total_steps = int(spec["environment"]["SPOTRUN_EXAMPLE_STEPS"])
    faults = options.faults
    if faults is None:
        faults = spread_interruptions(options.interruptions, total_steps)
    view = LiveView(total_steps, stream)
    view.event("starting the local cloud (moto on 127.0.0.1, template.yaml deployed) ...")
    with LocalCloud(cloud_config(options)) as cloud:
        info = cloud.describe()
        view.event(
            f"  API {info['api_url']}   AWS {info['endpoint_url']}   bucket {info['bucket']}"
        )
        for fault in options.capacity_faults:
            cloud.inject_capacity_errors(fault)
        started = time.time()
        response = cloud.submit(spec)
        if response.status >= 300:
            raise RuntimeError(f"POST /jobs refused the job: {response.status} {response.body}")
        job_id = _job_id(response.body)
        view.event(f"submitted job {job_id} through POST /jobs ({total_steps} steps)")
        cloud.chaos.arm(job_id, faults, options.random_rate_per_minute, seed=options.seed)
        job = _follow(cloud, job_id, view, options.timeout_seconds, started)
        timed_out = str(job.get("status")) not in TERMINAL
        if timed_out:
            # Still write what happened, and leave nothing running: cancel the job.
            limit = options.timeout_seconds
            view.event(f"job {job_id} did not end within {limit:.0f}s: cancelling it")
            cloud.client.cancel(job_id)
            try:
                job = cloud.wait_for_job(job_id, timeout=60)
            except TimeoutError:
                job = cloud.job(job_id)
        wall = time.time() - started
        view.event(f"job {job_id}: {job.get('status')} after {wall:.1f}s")
        leaks = cloud.wait_no_leaks(job_id)
        timeline = JobTimeline.collect(
            job_id, cloud.runner.instances.values(), cloud.chaos.delivered
        )
        options.out.mkdir(parents=True, exist_ok=True)
        model_path = None
        if job.get("status") == "SUCCEEDED":
            model_path = cloud.download_model(job_id, options.out / "model.pt").resolve()
        summary = _summary(job, timeline, leaks, model_path, wall)
        summary["timed_out"] = timed_out
    (options.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_timeline(timeline, options.out / "timeline.png", f"{job_id}: {summary['status']}")
    _print_summary(summary, view, options.out)
    return summary


def _job_id(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("job_id", "jobId", "id"):
            if isinstance(body.get(key), str):
                return body[key]
        if isinstance(body.get("job"), dict) and "job_id" in body["job"]:
            return body["job"]["job_id"]
    raise RuntimeError(f"POST /jobs answered without a job id: {body!r}")


def _follow(cloud: LocalCloud, job_id: str, view: LiveView, timeout: float, started: float) -> dict:
    deadline = time.monotonic() + timeout
    reported: set[int] = set()
    job: dict[str, Any] = {}
    next_poll = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_poll:
            job = cloud.job(job_id)
            next_poll = time.monotonic() + 1.0
        timeline = JobTimeline.collect(
            job_id, cloud.runner.instances.values(), cloud.chaos.delivered
        )
        for number, outcome in enumerate(timeline.interruptions(), start=1):
            if number in reported or outcome.recovery_seconds is None:
                continue
            reported.add(number)
            safe = outcome.time_to_safe_seconds
            view.event(
                f"  {outcome.kind} {number} on {outcome.instance_id} "
                f"at step {outcome.step_at_notice}: "
                f"safe in {'-' if safe is None else f'{safe:.2f}s'} (step {outcome.safe_step}), "
                f"training again after {outcome.recovery_seconds:.1f}s from step "
                f"{outcome.resumed_from} (lost {outcome.steps_lost} steps)"
            )
        status = str(job.get("status", "?"))
        view.progress(timeline.max_step(), status, len(timeline.attempts()), time.time() - started)
        if status in TERMINAL:
            return job
        time.sleep(0.25)
    return job  # not terminal: the caller ends it


def _summary(job: dict, timeline: JobTimeline, leaks: dict, model_path: Path | None, wall: float):
    outcomes = [o for o in timeline.interruptions() if o.kind == "interrupt"]
    attempts = job.get("attempts")
    return {
        "job_id": timeline.job_id,
        "status": job.get("status"),
        "interruptions": len(outcomes),
        "steps_lost": [o.steps_lost for o in outcomes],
        "time_to_safe_seconds": [_round(o.time_to_safe_seconds) for o in outcomes],
        "recovery_seconds": [_round(o.recovery_seconds) for o in outcomes],
        "attempts": len(attempts) if isinstance(attempts, list) else len(timeline.attempts()),
        "final_step": timeline.max_step(),
        "leaked": leaks,
        "model_path": str(model_path) if model_path else None,
        "wall_seconds": round(wall, 1),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _print_summary(summary: dict, view: LiveView, out: Path) -> None:
    view.event("")
    view.event("summary")
    for key in (
        "status",
        "interruptions",
        "steps_lost",
        "time_to_safe_seconds",
        "recovery_seconds",
        "attempts",
        "leaked",
        "model_path",
        "wall_seconds",
    ):
        view.event(f"  {key:<22} {summary[key]}")
    view.event(f"  wrote {out / 'summary.json'} and {out / 'timeline.png'}")
