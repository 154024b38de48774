"""Checkpoint interval policies: every N steps, every N seconds, auto (Young/Daly)."""

from __future__ import annotations

import math

import pytest

from spotrun_trainer.interval import (
    EveryNSeconds,
    EveryNSteps,
    SaveCost,
    YoungDaly,
    make_policy,
)
from spotrun_trainer.ticket import Interval


def test_interval_steps_is_due_on_multiples_only():
    policy = EveryNSteps(5)
    policy.start(0, now=0.0)
    assert [s for s in range(1, 16) if policy.due(s)] == [5, 10, 15]


def test_interval_steps_not_due_again_for_the_step_just_saved():
    policy = EveryNSteps(5)
    policy.start(10, now=0.0)  # resumed from step 10
    assert not policy.due(10)


def test_interval_seconds_counts_from_the_last_save():
    policy = EveryNSeconds(30)
    policy.start(0, now=100.0)
    assert not policy.due(1, now=129.0)
    assert policy.due(2, now=130.0)
    policy.saved(2, now=130.0)
    assert not policy.due(3, now=150.0)
    assert policy.due(4, now=160.0)


def test_interval_auto_is_young_daly_with_the_measured_cost():
    # GIVEN a measured stall of 0.05 s and M = 3600 s
    policy = YoungDaly(3600, min_seconds=1, max_seconds=10_000)
    policy.start(0, now=0.0)
    policy.measured(SaveCost(stall_seconds=0.05, seconds=0.2))
    # THEN the interval is sqrt(2 C M) - C (M grows a little with the time trained)
    assert policy.interval_seconds(now=0.0) == pytest.approx(math.sqrt(2 * 0.05 * 3600) - 0.05)


def test_interval_auto_takes_a_first_checkpoint_early_to_measure_the_cost():
    policy = YoungDaly(3600, first_seconds=10)
    policy.start(0, now=0.0)
    assert not policy.due(1, now=9.0)
    assert policy.due(2, now=10.0)


def test_interval_auto_shrinks_with_interruptions_seen():
    # M = (M0 + T) / (1 + n): attempt 4 after 600 s of training, M0 = 3600 -> 1050 s
    fresh = YoungDaly(3600, min_seconds=0.1)
    seasoned = YoungDaly(3600, interruptions_seen=3, elapsed_seconds=600, min_seconds=0.1)
    for policy in (fresh, seasoned):
        policy.start(0, now=0.0)
        policy.measured(SaveCost(0.5, 1.0))
    assert seasoned.mean_time_between_interruptions(now=0.0) == pytest.approx(1050)
    assert seasoned.interval_seconds(now=0.0) < fresh.interval_seconds(now=0.0)
    assert seasoned.interval_seconds(now=0.0) == pytest.approx(math.sqrt(2 * 0.5 * 1050) - 0.5)


def test_interval_auto_clamps_to_the_save_duration_and_the_bounds():
    policy = YoungDaly(3600, min_seconds=2, max_seconds=600)
    policy.start(0, now=0.0)
    # a negligible stall, but a save that takes 20 s to become durable
    policy.measured(SaveCost(stall_seconds=0.0001, seconds=20))
    assert policy.interval_seconds(now=0.0) == pytest.approx(40)  # writer idle half the time
    # a huge stall: capped by max_seconds
    huge = YoungDaly(3600, min_seconds=2, max_seconds=600)
    huge.start(0, now=0.0)
    huge.measured(SaveCost(stall_seconds=500, seconds=500))
    assert huge.interval_seconds(now=0.0) == pytest.approx(1000)  # 2 x save beats max


def test_interval_auto_smooths_one_slow_save():
    policy = YoungDaly(3600, smoothing=0.3)
    policy.measured(SaveCost(0.1, 0.2))
    policy.measured(SaveCost(1.1, 1.2))
    assert policy.stall_seconds == pytest.approx(0.4)


def test_make_policy_follows_the_ticket():
    assert isinstance(make_policy(Interval("steps", 7)), EveryNSteps)
    assert isinstance(make_policy(Interval("seconds", 30.0)), EveryNSeconds)
    auto = make_policy(Interval("auto"), expected_interruption_seconds=900, interruptions_seen=2)
    assert isinstance(auto, YoungDaly)
    assert auto.prior_seconds == 900 and auto.interruptions_seen == 2
