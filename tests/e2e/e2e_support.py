"""Helpers shared by the end-to-end tests: a small job spec, waiting, the time scales."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Scaled, not changed: a 4 s spot notice instead of 120 s, a small model, few steps.
NOTICE_SECONDS = 4.0
CHECKPOINT_INTERVAL_STEPS = 10


def job_spec(name: str, steps: int = 60, **overrides: Any) -> dict[str, Any]:
    """A small tiny_lm job: about 0.06 s a step on this machine."""
    spec: dict[str, Any] = {
        "name": name,
        "command": ["python", "-m", "spotrun_trainer.examples.tiny_lm"],
        "environment": {
            "SPOTRUN_EXAMPLE_STEPS": str(steps),
            "SPOTRUN_EXAMPLE_STEP_SLEEP": "0.05",
            "SPOTRUN_EXAMPLE_D_MODEL": "32",
            "SPOTRUN_EXAMPLE_LAYERS": "1",
            "SPOTRUN_EXAMPLE_CONTEXT": "32",
            "SPOTRUN_EXAMPLE_BATCH": "8",
            "SPOTRUN_EXAMPLE_EVAL_EVERY": "20",
            "SPOTRUN_EXAMPLE_PATIENCE": "1000",
        },
        "checkpoint": {"interval": {"steps": CHECKPOINT_INTERVAL_STEPS}, "keep": 2},
        "heartbeat_timeout_seconds": 30,
        "max_interruptions": 10,
    }
    spec.update(overrides)
    return spec


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"not true within {timeout} s")
