"""The example job's own parts: early stopping, corpus, schedule, model."""

from __future__ import annotations

import math

import pytest
import torch

from spotrun_trainer.examples import tiny_lm


def test_tiny_lm_early_stopping_after_patience_evaluations():
    early = tiny_lm.EarlyStopping(patience=2, min_delta=0.01)
    for step, loss in [(10, 3.0), (20, 2.5), (30, 2.495), (40, 2.6)]:
        early.update(step, loss)
    assert early.stopped and early.best == 2.5 and early.best_step == 20
    restored = tiny_lm.EarlyStopping(patience=2)
    restored.load_state_dict(early.state_dict())
    assert restored.state_dict() == early.state_dict()


def test_tiny_lm_schedule_warms_up_then_decays_to_a_tenth():
    factor = tiny_lm.lr_lambda_for(steps=100, warmup=10)
    assert factor(0) == 0.1 and factor(9) == 1.0
    assert math.isclose(factor(100), 0.1)


def test_tiny_lm_model_loss_starts_near_uniform():
    config = tiny_lm.Config.from_env(on_gpu=False)
    text = tiny_lm.load_text(config, None)
    vocab = sorted(set(text))
    torch.manual_seed(0)
    model = tiny_lm.TinyLM(len(vocab), config)
    tokens = torch.randint(len(vocab), (2, config.context + 1))
    loss = model(tokens[:, :-1], tokens[:, 1:]).item()
    assert abs(loss - math.log(len(vocab))) < 1.0
    assert len(text) > 3000  # the shipped corpus


def test_tiny_lm_scaler_state_moves_between_instance_types():
    # GIVEN the scaler state of a run without loss scaling (CPU, or bf16 on a GPU)
    state = tiny_lm.PortableScaler(torch.amp.GradScaler("cpu", enabled=False)).state_dict()
    assert state == {}
    # WHEN it is resumed where a scaler is on (fp16 on a T4; the CPU one stands in here,
    # and torch refuses an empty state for it just the same)
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="empty"):
        enabled.load_state_dict(state)
    resumed = tiny_lm.PortableScaler(enabled)
    resumed.load_state_dict(state)
    # THEN the scaler keeps its defaults instead of failing the job
    assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == 65536.0
