"""The reference loader: PIL decoding + the SimMIM augmentation in DataLoader workers.

Yields `(images, masks)`: images float (B, 3, S, S) normalised on the training device, masks bool
(B, S/32, S/32) drawn on that device. The slowest backend and the one the others are checked
against.
"""
from __future__ import annotations

import torch

from .augment import Augmentation, normalize
from .folder import ImageFolder, ShardedSampler
from .masking import MaskGenerator


class ReferenceLoader:
    """One epoch per `iter()`; `set_epoch` reseeds order, augmentation and masks.

    batch_size is per process; batches per epoch = (len(dataset) // world) // batch_size
    (drop_last: every batch is full, so every step has the same global batch).
    """

    def __init__(self, root: str, aug: Augmentation, masks: MaskGenerator, batch_size: int,
                 num_workers: int = 4, device: torch.device | str = "cpu", rank: int = 0,
                 world: int = 1, seed: int = 0, shuffle: bool = True,
                 dtype: torch.dtype = torch.float32):
        self.dataset = ImageFolder(root, aug)
        self.aug, self.mask_generator = aug, masks
        self.batch_size, self.device, self.dtype = batch_size, torch.device(device), dtype
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.sampler = ShardedSampler(len(self.dataset), rank, world, seed, shuffle)
        if len(self) == 0:
            raise ValueError(f"{len(self.dataset)} images over {world} ranks do not fill one batch of "
                             f"{batch_size}: lower data.batch_size")
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", drop_last=True,
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def mask_rng(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
        return g

    def __iter__(self):
        g = self.mask_rng()
        for images, _ in self.loader:
            images = images.to(self.device, non_blocking=True)
            masks = self.mask_generator.sample(images.shape[0], generator=g, device=self.device)
            yield normalize(images, self.aug.mean, self.aug.std, self.dtype), masks
