"""The reference loader: PIL decoding + the SimMIM augmentation in DataLoader workers.

Yields `(images, masks)` (`labels=True` appends the labels; `masks=None` leaves masks out, for
classification; `train=False` gives the evaluation view, resize + centre crop): images float
(B, 3, S, S) normalised on the training device, masks bool (B, S/32, S/32) drawn on that device. The slowest backend and the one the others are checked
against.
"""
from __future__ import annotations

import torch

from .augment import Augmentation, normalize
from .decode import MAX_PIXELS, checked_max_pixels
from .errors import DatasetError
from .folder import ImageFolder, ShardedSampler, num_batches, shard_size
from .masking import MaskGenerator
from .scanlist import checked_samples
from .seeding import torch_generator


class LoaderContract:
    """What every backend shares: the epoch / start-batch state, one batch at least per epoch,
    masks from `GlobalBatchMasks`, and the batch tuple `(images[, masks][, labels])`.
    Expects mask_generator, seed, rank, world, batch_size, device, labels, num_samples."""

    epoch = start_batch = 0
    accum_steps = 1  # micro-batches per optimizer step: masks are drawn per step (GlobalBatchMasks)

    def set_accum_steps(self, accum_steps: int) -> None:
        """The trainer's gradient accumulation: `accum_steps` consecutive batches form one step."""
        self.accum_steps = accum_steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields epoch `epoch` from batch `start_batch` on (mid-epoch resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def require_one_batch(self) -> None:
        if len(self) == 0:
            raise DatasetError(f"{self.num_samples} images over {self.world} ranks do not fill one batch of "
                               f"{self.batch_size}: lower data.batch_size")

    def epoch_masks(self) -> GlobalBatchMasks | None:
        if self.mask_generator is None:
            return None
        return GlobalBatchMasks(self.mask_generator, self.seed, self.epoch, self.rank, self.world,
                                self.batch_size, self.device, self.accum_steps)

    def make_batch(self, k: int, masks: GlobalBatchMasks | None, images: torch.Tensor, labels) -> tuple:
        """Batch k of the epoch; `labels` (a callable giving them on the device) only when asked for."""
        # a short last batch (drop_last=False, evaluation) takes the first masks of its slice
        batch = (images, masks(k)[:images.shape[0]]) if masks is not None else (images,)
        return batch + (labels(),) if self.labels else batch


class ReferenceLoader(LoaderContract):
    """One epoch per `iter()`; `set_epoch` reseeds order, augmentation and masks.

    batch_size is per process; batches per epoch = (len(dataset) // world) // batch_size
    (drop_last: every batch is full, so every step has the same global batch).
    """

    def __init__(self, root: str, aug: Augmentation, masks: MaskGenerator, batch_size: int,
                 num_workers: int = 4, device: torch.device | str = "cpu", rank: int = 0,
                 world: int = 1, seed: int = 0, shuffle: bool | None = None,
                 dtype: torch.dtype = torch.float32, train: bool = True, labels: bool = False,
                 crop_ratio: float = 0.875, transform=None, drop_last: bool = True, max_pixels: int = MAX_PIXELS,
                 rand_augment: str = ""):
        max_pixels = checked_max_pixels(max_pixels)
        if train and rand_augment and transform is None:  # timm's RandAugment on the PIL crop, in the workers
            from .rand_augment import PILRandAugment

            transform = PILRandAugment(rand_augment, aug.mean)
        # the scan list beside a folder (or data.path a list) when there is one, as DALI reads it
        listed = checked_samples(str(root), max_pixels, max(1, num_workers), rank, world, required=False,
                                 who="torch")
        self.dataset = ImageFolder(root, aug, train, crop_ratio, transform, max_pixels, listed)
        self.num_samples, self.labels, self.classes = len(self.dataset), labels, self.dataset.classes
        self.drop_last = drop_last
        shuffle = train if shuffle is None else shuffle
        self.aug, self.mask_generator = aug, masks
        self.batch_size, self.device, self.dtype = batch_size, torch.device(device), dtype
        self.seed, self.rank, self.world = seed, rank, world
        self.sampler = ShardedSampler(len(self.dataset), rank, world, seed, shuffle, drop_last)
        self.require_one_batch()
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", drop_last=drop_last,
            # workers' base seed from an explicit generator, never the global RNG (augmentation is
            # seeded per sample anyway; this keeps the process's global state out of the data path)
            generator=torch_generator("loader", seed, rank),
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)

    def __len__(self) -> int:
        """Batches per epoch (a full epoch, whatever `start_batch`)."""
        return num_batches(shard_size(self.num_samples, self.rank, self.world, self.drop_last), self.batch_size,
                           self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __iter__(self):
        masks = self.epoch_masks()
        for k, (images, labels) in enumerate(self.loader, start=self.start_batch):
            images = normalize(images.to(self.device, non_blocking=True), self.aug.mean, self.aug.std, self.dtype)
            yield self.make_batch(k, masks, images, lambda: labels.to(self.device, non_blocking=True))


class GlobalBatchMasks:
    """Masks for micro-batch k of an epoch, drawn per optimizer step for the step's whole global
    batch (batch_size x world x accum_steps samples) from `derive_seed("masks", seed, epoch, step)`.

    Global position p of an epoch's sample stream (the `ShardedSampler` permutation) lies in step
    p // G at offset p % G (G the global batch); rank r's micro-batch m of step s holds offsets
    world * batch_size * m + r + world * j (j < batch_size), so it takes those masks. A sample thus
    gets the same mask whatever the split of G into ranks and accumulation steps, and any batch can
    be drawn directly, so resuming mid-epoch needs no replay.
    """

    def __init__(self, generator: MaskGenerator, seed: int, epoch: int, rank: int, world: int,
                 batch_size: int, device: torch.device, accum_steps: int = 1):
        self.generator, self.seed, self.epoch = generator, seed, epoch
        self.rank, self.world, self.batch_size, self.accum = rank, world, batch_size, accum_steps
        self.device = device
        self.step, self.step_masks = -1, None

    def __call__(self, k: int) -> torch.Tensor:
        """(batch_size, h, w) bool: the masks of this rank's micro-batch k of the epoch."""
        step, micro = divmod(k, self.accum)
        if step != self.step:
            g = torch_generator("masks", self.seed, self.epoch, step, device=self.device)
            self.step_masks = self.generator.sample(self.batch_size * self.world * self.accum, generator=g,
                                                    device=self.device)  # (G, h, w)
            self.step = step
        micro_masks = self.step_masks[micro * self.batch_size * self.world:(micro + 1) * self.batch_size * self.world]
        return micro_masks[self.rank::self.world].contiguous()
