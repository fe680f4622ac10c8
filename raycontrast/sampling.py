"""Data order and per-step randomness as pure functions of the run's seed, so a resumed run replays exactly.

- `ShardSampler`: each rank's share of the training set, shuffled as `DistributedSampler(shuffle=True,
  drop_last=True)` from (seed, epoch), able to skip the samples already trained on before a resume;
- `SeededItems`: each sample's augmentation drawn from torch's RNG seeded by (seed, epoch, index), so it
  does not depend on rank, DataLoader workers or resumes;
- `step_seed`: the seed of a rank's anchor- and memory-sampling generator at an iteration.

With these, the batch and every random draw of iteration k are functions of (seed, rank, k) alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["SeededItems", "ShardSampler", "step_seed"]


def step_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. seed, rank, iteration) with NumPy's SeedSequence: nearby
    tuples give unrelated streams."""
    a, b = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


class ShardSampler(DistributedSampler):
    """`DistributedSampler(shuffle=True, drop_last=True)` that yields `(epoch, index)` and can skip.

    The order depends only on (seed, epoch); `skip` drops that many leading samples of this rank's shard
    (batches already trained on before a resume). The epoch travels with the index so that
    `SeededItems` can seed each sample's augmentation, also inside DataLoader worker processes.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class SeededItems(Dataset):
    """Wraps a dataset whose transforms draw from torch's global RNG: item `(epoch, i)` is drawn with that
    RNG seeded from (seed, epoch, i), so augmentations do not depend on rank, loader workers or resumes."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(self.seed, epoch, index))
            return self.dataset[index]
