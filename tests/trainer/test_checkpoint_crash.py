"""Checkpointer under kill -9: a save killed at any moment never costs a committed step."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import torch

from spotrun_trainer.checkpoint import Checkpointer, LocalStore

TRIALS = 25


def _state_for(step: int) -> dict:
    """A deterministic state per step: some tensors change every step, some every third
    step (deduplicated chunks, GC of shared ones), small ones share packs."""
    g = torch.Generator().manual_seed(step)
    slow = torch.Generator().manual_seed(step // 3)
    return {
        "model": {
            "big": torch.randn(300_000, generator=g),  # several chunks
            "frozen": torch.randn(200, 300, generator=slow),
            "bf16": torch.randn(500, 100, generator=g).bfloat16(),
            "bias": torch.randn(50, generator=g),
            "norm": torch.ones(50),
        },
        "optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": []},
        "data": {"step": step, "index": step * 10},
    }


def _save_forever(root: str, start: int, log_path: str) -> None:
    # Runs in a forked child: torch's thread pool is not carried over a fork.
    torch.set_num_threads(1)
    ckpt = Checkpointer(LocalStore(root), keep=2, chunk_bytes=256 << 10, small_bytes=8 << 10)
    step = start
    with open(log_path, "a") as log:
        while True:
            state = _state_for(step)
            if step % 2:
                ckpt.save_async(step, state).wait()
            else:
                ckpt.save(step, state)
            log.write(f"{step}\n")  # written only after save returned: committed
            log.flush()
            step += 1


def _committed(log_path: Path) -> int | None:
    if not log_path.exists():
        return None
    lines = log_path.read_text().split()
    return int(lines[-1]) if lines else None


def test_checkpoint_kill9_during_saves_never_loses_a_committed_step(tmp_path, ckpt_assert_same):
    # GIVEN a store that a trainer process keeps saving into, killed at random moments
    root = tmp_path / "volume"
    log_path = tmp_path / "committed.log"
    context = multiprocessing.get_context("fork")  # torch is imported once, not per trial
    rng = random.Random(20261204)
    newest = None
    for _ in range(TRIALS):
        start = 1 if newest is None else newest + 1
        child = context.Process(target=_save_forever, args=(str(root), start, str(log_path)))
        child.start()
        # WHEN it is killed with SIGKILL after a random delay (mid-chunk, mid-manifest,
        # between manifest and pointer, during GC...)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        # THEN a relaunched trainer restores the newest committed step, or a newer one
        # whose pointer landed before the kill, and its state is exactly that step's
        committed = _committed(log_path)
        with Checkpointer(LocalStore(root), keep=2) as ckpt:
            restored = ckpt.restore()
        if committed is None and restored is None:
            continue
        assert restored is not None, "a committed checkpoint was lost"
        assert restored.skipped == []  # torn writes are never candidates
        assert committed is None or restored.step >= committed
        assert newest is None or restored.step >= newest
        ckpt_assert_same(_state_for(restored.step), restored.state)
        newest = restored.step
    assert newest is not None and newest >= 3  # the trials really committed saves
