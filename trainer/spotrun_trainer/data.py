"""A data order that can be checkpointed: epoch + position in a seeded permutation.

Each epoch visits the items in ``randperm(num_items)`` drawn from a generator
seeded with ``seed + epoch``, so the order depends only on (seed, epoch) and
never on the global RNGs; resuming needs only the epoch and the position.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


class ResumableSampler:
    """Yields batches of item indices; ``state_dict()`` says where the next starts.

    Usable directly (``next_batch()``) or as a ``DataLoader`` ``batch_sampler``
    with ``num_workers=0``: its position counts batches handed out, and prefetching
    workers would take batches before the step that uses them.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int = 0, drop_last: bool = True
    ) -> None:
        if num_items < 1 or batch_size < 1:
            raise ValueError("num_items and batch_size must be >= 1")
        if drop_last and batch_size > num_items:
            raise ValueError(f"batch_size {batch_size} > num_items {num_items}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.index = 0
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    def _permutation(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.num_items, generator=generator)
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    def next_batch(self) -> list[int]:
        """The next batch of indices, moving to the next epoch when one ends."""
        remaining = self.num_items - self.index
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.index = 0
        order = self._permutation()
        batch = order[self.index : self.index + self.batch_size].tolist()
        self.index += len(batch)
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "index": self.index,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("num_items", "batch_size", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"checkpointed data order has {key}={state[key]}, "
                    f"this sampler {getattr(self, key)}: the dataset or batch changed"
                )
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
