"""Exact resume: a run interrupted at random steps, each attempt a new process, ends
bitwise equal (model and optimizer) to the same run done straight.

Each attempt runs ``python -m spotrun_trainer run --ticket F`` with the example job, as
the bootstrap does; notices arrive as on EC2: the IMDS spot warning, SIGTERM, and a
rebalance recommendation followed by the warning.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import torch

from spotrun_trainer.checkpoint import Checkpointer, LocalStore
from spotrun_trainer.errors import EXIT_INTERRUPTED

STEPS = 40
EXAMPLE = {
    "SPOTRUN_EXAMPLE_STEPS": str(STEPS),
    "SPOTRUN_EXAMPLE_D_MODEL": "32",
    "SPOTRUN_EXAMPLE_CONTEXT": "32",
    "SPOTRUN_EXAMPLE_BATCH": "8",
    "SPOTRUN_EXAMPLE_EVAL_EVERY": "10",
    # Slow steps a little so that a notice lands between two steps, as on a GPU.
    "SPOTRUN_EXAMPLE_STEP_SLEEP": "0.03",
    "SPOTRUN_LOG_EVERY": "1",
}


def _bucket(endpoint: str) -> tuple[Any, str]:
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint)
    name = f"models-{random.randrange(1 << 30)}"
    s3.create_bucket(Bucket=name)
    return s3, name


class Attempt:
    """One trainer process, whose stdout lines are read as they come."""

    def __init__(self, ticket: dict[str, Any], path: Path, env: dict[str, str]) -> None:
        path.write_text(json.dumps(ticket))
        self.lines: list[dict[str, Any]] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "spotrun_trainer", "run", "--ticket", str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def read_until_step(self, step: int) -> int | None:
        """Read lines until a step event >= ``step``; its step, or None at EOF."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = json.loads(raw)
            self.lines.append(line)
            if line["event"] == "step" and line["step"] >= step:
                return line["step"]
        return None

    def finish(self) -> int:
        out, err = self.process.communicate(timeout=120)
        self.lines += [json.loads(raw) for raw in out.splitlines()]
        self.stderr = err
        return self.process.returncode

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == kind]


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _equal(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested state: tensors by bytes, the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(_bytes(a), _bytes(b)), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _model(s3: Any, bucket: str, key: str, scratch: Path) -> dict[str, torch.Tensor]:
    target = scratch / key.replace("/", "_")
    s3.download_file(bucket, key, str(target))
    return torch.load(target, weights_only=True)


def test_resume_after_random_interruptions_is_bitwise_exact(
    tmp_path, moto_server, sfn_tasks, fake_imds, trainer_env, make_ticket
):
    env = {**trainer_env, **EXAMPLE, "SPOTRUN_IMDS_ENDPOINT": fake_imds.url}
    s3, bucket = _bucket(moto_server)

    # GIVEN the run done straight, with an async checkpoint every 7 steps
    task = sfn_tasks.start()
    straight = Attempt(
        make_ticket(
            task_token=task.token,
            checkpoint_dir=str(tmp_path / "straight"),
            model_uri=f"s3://{bucket}/models/straight/model.pt",
            interval={"steps": 7},
        ),
        tmp_path / "straight.json",
        env,
    )
    assert straight.finish() == 0, straight.stderr
    assert json.loads(task.result()["output"])["final_step"] == STEPS

    # WHEN the same run is interrupted three times at random steps
    chooser = random.Random()
    targets = sorted(chooser.sample(range(3, STEPS - 6), 3))
    deliveries = ["instance-action", "sigterm", "rebalance+instance-action"]
    committed: list[int] = []
    for attempt, (target, how) in enumerate(zip(targets, deliveries, strict=True), start=1):
        fake_imds.instance_action = fake_imds.rebalance = None
        task = sfn_tasks.start()
        run = Attempt(
            make_ticket(
                task_token=task.token,
                checkpoint_dir=str(tmp_path / "resumed"),
                model_uri=f"s3://{bucket}/models/resumed/model.pt",
                interval={"steps": 7},
                attempt=attempt,
                resume=attempt > 1,
            ),
            tmp_path / f"attempt-{attempt}.json",
            env,
        )
        seen = run.read_until_step(target)
        assert seen is not None, f"attempt {attempt} ended before step {target}"
        if how == "sigterm":
            run.process.send_signal(signal.SIGTERM)
        elif how == "instance-action":
            fake_imds.notify_interruption()
        else:
            fake_imds.recommend_rebalance()
            assert run.read_until_step(seen + 3) is not None
            fake_imds.notify_interruption()
        status = run.finish()

        # THEN each attempt saved the step it was at, reported it, and exited 75
        assert status == EXIT_INTERRUPTED, run.stderr
        (report,) = run.events("report")
        assert report["outcome"] == "Spot.Interrupted"
        assert report["checkpoint_step"] >= seen
        assert run.events("checkpoint")[-1]["step"] == report["checkpoint_step"]
        assert run.events("notice")[-1]["kind"] == how.split("+")[-1]
        if how.startswith("rebalance"):
            assert run.events("notice")[0]["kind"] == "rebalance"
        result = task.result()
        assert result["error"] == "Spot.Interrupted"
        cause = json.loads(result["cause"])
        assert cause["checkpoint_step"] == report["checkpoint_step"]
        assert cause["notice"] == how.split("+")[-1]
        assert cause["checkpoint_location"] == "volume"
        if committed:
            assert run.events("start")[0]["resumed_from"] == committed[-1]
        committed.append(report["checkpoint_step"])

    fake_imds.instance_action = fake_imds.rebalance = None
    task = sfn_tasks.start()
    last = Attempt(
        make_ticket(
            task_token=task.token,
            checkpoint_dir=str(tmp_path / "resumed"),
            model_uri=f"s3://{bucket}/models/resumed/model.pt",
            interval={"steps": 7},
            attempt=4,
            resume=True,
        ),
        tmp_path / "attempt-4.json",
        env,
    )
    assert last.finish() == 0, last.stderr
    assert last.events("start")[0]["resumed_from"] == committed[-1]
    assert task.result()["status"] == "SUCCEEDED"

    # THEN the final model and the whole training state are bitwise those of the straight run
    _equal(
        _model(s3, bucket, "models/straight/model.pt", tmp_path),
        _model(s3, bucket, "models/resumed/model.pt", tmp_path),
    )
    straight_state = Checkpointer(LocalStore(tmp_path / "straight")).restore()
    resumed_state = Checkpointer(LocalStore(tmp_path / "resumed")).restore()
    assert straight_state.step == resumed_state.step == STEPS
    for name in ("model", "optimizer", "scheduler", "data", "early_stopping", "scaler"):
        _equal(straight_state.state["objects"][name], resumed_state.state["objects"][name], name)
    _equal(straight_state.state["rng"], resumed_state.state["rng"], "rng")
