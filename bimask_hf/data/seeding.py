"""Augmentation that depends only on (seed, epoch, example indices), not on when examples are loaded.

Random transforms draw from the global random number generators. Data loaders fetch ahead of the
training step (Accelerate one batch, workers several), so with global draws the crops of a batch depend
on what ran before it was fetched, and a run resumed from a checkpoint draws other crops than the run
it continues. :class:`SeededExamples` loads a batch of examples of epoch ``e`` with the generators
seeded from ``(seed, e, indices)`` and restores them afterwards: augmentation is the same in a straight
and a resumed run, with any number of workers, and data loading leaves the training's random stream alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["SeededExamples", "example_seed"]


def example_seed(seed: int, epoch: int, index: int | Sequence[int]) -> int:
    """A 63-bit seed for example ``index`` (or the batch of examples ``index``) in ``epoch`` of a run.

    Args:
        seed (`int`): The run's seed.
        epoch (`int`): The epoch.
        index (`int` or `Sequence[int]`): An example's index, or the indices of a batch.

    Returns:
        `int`: A non-negative seed below ``2**63``.
    """
    key = ",".join(map(str, index)) if isinstance(index, Sequence) else str(index)
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Only the CPU generators: a transform runs on the CPU, and the CUDA streams belong to training.
    saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


class SeededExamples(torch.utils.data.Dataset):
    """A map-style dataset whose examples are loaded (and augmented) with seeded generators.

    Example ``i`` of epoch ``e`` is loaded with the torch, ``random`` and numpy generators seeded by
    :func:`example_seed` ``(seed, e, i)``. A data loader fetches a whole batch at once (``__getitems__``):
    the batch is then loaded under one seed made from its indices, which costs far less than seeding each
    example and gives the same batches the same draws as long as the batch size stays. The training loop
    calls :meth:`set_epoch` before each epoch's data loader starts (``BiMaskTrainer`` does, from a
    callback).

    Args:
        dataset (`Any`): The map-style dataset to wrap.
        seed (`int`): The run's seed.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation of ``epoch`` from now on.

        Args:
            epoch (`int`): The epoch about to start.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with _seeded(example_seed(self.seed, self.epoch, int(index))):
            return self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        indices = [int(i) for i in indices]
        with _seeded(example_seed(self.seed, self.epoch, indices)):
            if hasattr(self.dataset, "__getitems__"):
                return list(self.dataset.__getitems__(indices))
            return [self.dataset[i] for i in indices]
