"""spotrun_trainer.data.ResumableSampler: the same order after a resume, across epochs."""

from __future__ import annotations

import random

import pytest

from spotrun_trainer.data import ResumableSampler


def _take(sampler: ResumableSampler, count: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(count)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_resumable_sampler_resumed_anywhere_continues_the_same_order(drop_last):
    # GIVEN 10 items in batches of 3: several epochs in 12 batches
    straight = _take(ResumableSampler(10, 3, seed=5, drop_last=drop_last), 12)
    # WHEN the order is interrupted at random batches, each resume in a new sampler
    picks = random.Random(3)
    resumed: list[list[int]] = []
    state = None
    while len(resumed) < len(straight):
        sampler = ResumableSampler(10, 3, seed=5, drop_last=drop_last)
        if state is not None:
            sampler.load_state_dict(state)
        resumed += _take(sampler, min(picks.randint(1, 4), len(straight) - len(resumed)))
        state = sampler.state_dict()
    # THEN the batches are the same, and every epoch is a permutation of the items
    assert resumed == straight
    per_epoch = 3 if drop_last else 4
    for epoch in range(len(straight) // per_epoch):
        batches = straight[epoch * per_epoch : (epoch + 1) * per_epoch]
        items = [i for batch in batches for i in batch]
        assert len(set(items)) == len(items)
        assert len(items) == (9 if drop_last else 10)
    assert straight[:per_epoch] != straight[per_epoch : 2 * per_epoch]  # epochs reshuffle


def test_resumable_sampler_refuses_a_state_of_another_dataset():
    state = ResumableSampler(10, 3, seed=5).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        ResumableSampler(11, 3, seed=5).load_state_dict(state)
