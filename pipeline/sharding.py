"""How an epoch's samples are split among ranks and into batches: one rule for every backend.

The order of an epoch is a permutation of the dataset keyed by (seed, epoch) alone
(`seeding.torch_generator("order", seed, epoch)`), so every rank computes the same one; rank r of
`world_size` takes positions r, r + world_size, ... of it. Training (drop_last) keeps the first
`size // world_size * world_size` positions, so every rank has the same number of samples and the j-th global
batch of world_size x b samples is the same whatever the world size; evaluation keeps all of them (ranks
differ by at most one). A start offset skips a rank's first samples (mid-epoch resume).
"""
from __future__ import annotations

import numpy as np
import torch

from simmim.core.errors import DatasetError
from simmim.core.seeding import derive_seeds, torch_generator


class ShardedSampler(torch.utils.data.Sampler):
    """Yields (index, sample seed) for this rank's share of one epoch.

    The permutation depends on (seed, epoch) only, so every rank agrees on it; rank r takes
    positions r, r + world_size, ... of the first `len // world_size * world_size` (drop_last) entries. So the
    j-th global batch of world_size x b samples is the same whatever the world size, and rank r holds
    its positions r, r + world_size, ... (drop_last=False: all positions, for evaluation). `start`
    skips this rank's first samples (mid-epoch resume).
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if size < world_size and drop_last:
            raise DatasetError(f"dataset of {size} images is smaller than the {world_size} ranks sharing it")
        self.size, self.rank, self.world_size, self.drop_last = size, rank, world_size, drop_last
        self.seed, self.shuffle, self.epoch, self.start = seed, shuffle, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return shard_size(self.size, self.rank, self.world_size, self.drop_last) - self.start

    def indices(self) -> np.ndarray:
        """This rank's dataset indices for the epoch, from `start` on: int64 (len(self),).

        An array, not a list: at 14M images a list of the epoch's order costs seconds and ~600 MiB
        at every epoch start and resume; the array costs one permutation (torch.randperm, the
        same order as ever) and a strided copy of this rank's share."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch_generator("order", self.seed, self.epoch)).numpy()
        else:
            order = np.arange(self.size, dtype=np.int64)
        per_rank = self.size // self.world_size if self.drop_last else -(-self.size // self.world_size)
        return order[self.rank + self.start * self.world_size:per_rank * self.world_size:self.world_size].copy()

    def __iter__(self):
        """(index, `derive_seed("sample", seed, epoch, index)`) per sample, the seeds derived a block
        at a time (`derive_seeds`: ~0.1 us a sample in the main process instead of ~14)."""
        order = self.indices()
        for block in range(0, len(order), 4096):  # Python ints a block at a time, not the whole epoch
            indices = order[block:block + 4096]
            seeds = derive_seeds("sample", self.seed, self.epoch, last=indices)
            yield from zip(indices.tolist(), seeds.tolist())


def shard_size(size: int, rank: int, world_size: int, drop_last: bool = True) -> int:
    """Samples a rank gets per epoch: size // world_size (drop_last: the same on every rank), else its
    share of all of them (evaluation: ranks differ by at most one)."""
    return size // world_size if drop_last else len(range(rank, size, world_size))


def num_batches(samples: int, batch_size: int, drop_last: bool = True) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)
