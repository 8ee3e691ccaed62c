"""Deterministic, resumable batch order for data-parallel training.

Epoch ``e`` visits the training examples in the order of a permutation drawn
from a generator seeded with ``(seed, e)`` only — not from the global RNG — so
the order is the same on every rank, in every run, and after a resume. A
*global* micro-batch is ``batch_size * world_size`` consecutive examples of
that order; rank ``k`` takes the ``k``-th slice of ``batch_size``. The last
incomplete global micro-batch of an epoch is dropped so all ranks always take
the same number of steps.

The position ``(epoch, index)`` — ``index`` counts the global micro-batches
already consumed in that epoch — is all a checkpoint needs to continue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..tasks.base import Example, Task


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of ``n`` examples in ``epoch``: a permutation seeded by ``(seed, epoch)``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=gen).tolist()


@dataclass
class Position:
    """Where the data stream stands: ``index`` global micro-batches consumed in ``epoch``."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


class BatchStream:
    """Endless stream of this rank's encoded micro-batches, in the seeded order.

    Args:
        task: encodes examples into model inputs.
        tokenizer: passed to ``task.encode``.
        examples: the training set (the same list on every rank).
        batch_size: examples per rank per micro-batch.
        seed: seeds the per-epoch permutations.
        rank, world_size: this process's slice of each global micro-batch.
        max_length: passed to ``task.encode``.

    Raises:
        ValueError: fewer examples than one global micro-batch needs.
    """

    def __init__(self, task: Task, tokenizer: Any, examples: list[Example], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, max_length: int = 256) -> None:
        self.check_size(len(examples), batch_size, world_size)
        self.task, self.tokenizer, self.examples = task, tokenizer, examples
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.max_length = max_length
        self.batches_per_epoch = len(examples) // (batch_size * world_size)
        self.position = Position()
        self._order: list[int] = []
        self._order_epoch: int | None = None

    @staticmethod
    def check_size(n_examples: int, batch_size: int, world_size: int) -> None:
        """Raise ValueError unless ``n_examples`` fill at least one global micro-batch."""
        if n_examples < batch_size * world_size:
            raise ValueError(
                f"{n_examples} training examples are fewer than one global micro-batch "
                f"(train.batch_size={batch_size} x {world_size} processes); raise data.train_limit or lower the batch size"
            )

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = epoch_permutation(len(self.examples), self.seed, epoch), epoch
        return self._order

    def examples_at(self, epoch: int, index: int) -> list[Example]:
        """This rank's examples of global micro-batch ``index`` of ``epoch``."""
        order = self._epoch_order(epoch)
        start = index * self.batch_size * self.world_size + self.rank * self.batch_size
        return [self.examples[i] for i in order[start:start + self.batch_size]]

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch (CPU tensors); advances the position."""
        if self.position.index >= self.batches_per_epoch:
            self.position = Position(self.position.epoch + 1, 0)
        batch = self.task.encode(self.tokenizer, self.examples_at(self.position.epoch, self.position.index),
                                 self.max_length)
        self.position = Position(self.position.epoch, self.position.index + 1)
        return batch

    def seek(self, epoch: int, index: int) -> None:
        self.position = Position(epoch, index)

    def warmup_batches(self, count: int) -> Iterator[dict[str, torch.Tensor]]:
        """``count`` micro-batches from a separate order (epoch −1) for initializers like
        LoRA-GA; they do not move the training position."""
        for i in range(count):
            index = i % self.batches_per_epoch
            yield self.task.encode(self.tokenizer, self.examples_at(-1 - i // self.batches_per_epoch, index),
                                   self.max_length)
