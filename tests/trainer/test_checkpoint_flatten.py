"""Flattening nested training state into tensors and a JSON tree, and back."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from spotrun_trainer.checkpoint import UnsupportedStateError
from spotrun_trainer.checkpoint.flatten import flatten, tensor_names, unflatten


def test_flatten_round_trip_through_json_keeps_types(ckpt_make_state, ckpt_assert_same):
    state = ckpt_make_state(0)
    state["rng"]["python"] = random.Random(5).getstate()
    state["rng"]["numpy"] = np.random.default_rng(1).bit_generator.state
    state["rng"]["legacy_numpy"] = np.random.RandomState(2).get_state()
    state["odd"] = {None: 1, 2.5: "x", True: [float("-inf"), b"\xff"], "a/b~c": {}}
    tensors, tree = flatten(state)
    again = unflatten(json.loads(json.dumps(tree)), tensors)
    ckpt_assert_same(state, again)
    assert tensor_names(tree) == list(tensors)


def test_flatten_names_follow_the_state_paths(ckpt_make_state):
    tensors, _ = flatten(ckpt_make_state(0))
    assert "model/1.weight" in tensors
    assert "optimizer/state/0/exp_avg" in tensors
    assert "rng/torch" in tensors


def test_flatten_colliding_paths_stay_distinct():
    tensors, tree = flatten(
        {1: torch.zeros(1), "1": torch.ones(1), "a/b": torch.ones(2), "a": {"b": torch.zeros(2)}}
    )
    assert len(tensors) == 4
    back = unflatten(tree, tensors)
    assert torch.equal(back["1"], torch.ones(1)) and torch.equal(back[1], torch.zeros(1))


def test_flatten_serialises_plain_values_at_call_time():
    data = {"index": 1, "seen": [1, 2]}
    _, tree = flatten({"data": data})
    data["index"] = 2
    data["seen"].append(3)
    assert unflatten(tree, {}) == {"data": {"index": 1, "seen": [1, 2]}}


@pytest.mark.parametrize("value", [object(), {1, 2}, torch.nn.Linear(1, 1)])
def test_flatten_unsupported_value_is_named(value):
    with pytest.raises(UnsupportedStateError, match="at 'x/y'"):
        flatten({"x": {"y": value}})
