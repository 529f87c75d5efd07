"""Picks the loader for `data.backend`; every backend yields the same (images, masks) contract."""
from __future__ import annotations

import torch

from .augment import Augmentation
from .masking import MaskGenerator
from .reference import ReferenceLoader

BACKENDS = ("torch",)


def build_loader(backend: str, path: str, aug: Augmentation, masks: MaskGenerator, batch_size: int,
                 num_workers: int, device: torch.device, rank: int = 0, world: int = 1, seed: int = 0):
    if backend not in BACKENDS:
        raise ValueError(f"unknown data.backend '{backend}' (available here: {', '.join(BACKENDS)})")
    return ReferenceLoader(path, aug, masks, batch_size, num_workers, device, rank, world, seed)
