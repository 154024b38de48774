"""spotrun_trainer.rng: every generator put back exactly, through a real checkpoint."""

from __future__ import annotations

import random

import numpy as np
import torch

from spotrun_trainer import rng
from spotrun_trainer.checkpoint import Checkpointer, LocalStore


def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),  # leaves a cached gauss behind in Python's generator
        np.random.standard_normal(3).tolist(),  # and in NumPy's legacy generator
        np.random.randint(0, 1 << 30, size=4).tolist(),
        torch.rand(4).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
    )


def test_rng_capture_restore_through_a_checkpoint_repeats_every_draw(tmp_path):
    # GIVEN generators that have been used (mid-stream, with cached gaussians)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    _draws()
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    # WHEN their state is checkpointed, more numbers are drawn, and it is restored
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        ckpt.save(1, {"rng": rng.capture()})
        expected = _draws()
        _draws()  # the generators move on
        restored = ckpt.restore()
    rng.restore(restored.state["rng"])
    # THEN python, numpy and torch draw exactly the same numbers again
    assert _draws() == expected


def test_rng_capture_leaves_cuda_alone_without_a_context():
    state = rng.capture()
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        assert state["cuda"] is None
