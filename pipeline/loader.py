"""What every loader backend shares: `Loader`, the base of the torch, FFCV and DALI loaders.

A loader is built from a frozen `LoaderSpec` (what to read and how to batch it), the mask
generator (None: no masks, for classification), the training device and the process's place in the
job (rank, world_size, seed). One `iter()` is one epoch of this rank's batches, from `start_batch` on:

    images  float (B, 3, S, S), normalised (`augment.normalize`), `spec.dtype`, on the device
    masks   bool (B, S/32, S/32) on the device, from `GlobalBatchMasks` (absent when masks is None)
    labels  int64 (B,) on the device (only when `spec.labels`)

The base owns the epoch / start-batch state, the number of batches, the masks, batch assembly and
the figure preview; a backend implements only `read_batches` (this rank's images, and labels, for
batches start_batch, start_batch + 1, ... of `self.epoch`, in the order of `sharding`) and, where it
does not read image files, `preview_images`.

Augmentation hooks. `spec.rand_augment` reaches every backend through the spec: the torch backend
applies timm's RandAugment on the PIL crop in its workers; a backend that hands over uint8 batches
can apply a batched device op by overriding `device_transform` (run by the base on the training
view's uint8 (B, 3, S, S) images on the device, before normalisation, with a generator keyed by
(seed, epoch, batch, rank): FFCV's `rand_augment.BatchRandAugment`); DALI builds its op into its
graph (`dali_graph.DALIGraph.graph_augment`: DALI's own RandAugment, `dali_augment.py`).
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import logging
import os
from typing import Callable, Iterator

import torch

from simmim.core.errors import DatasetError
from simmim.core.seeding import torch_generator

from .augment import normalize
from .decode import DecodeError, decode_rgb
from .channels import read_pixels
from .skips import log_skips, no_image_error
from .views import center_crop, channel_view, to_tensor
from .masking import MaskGenerator
from .options import LoaderSpec
from .sharding import num_batches, shard_size

log = logging.getLogger(__name__)


class Loader(abc.ABC):
    """One epoch of `(images[, masks][, labels])` batches per `iter()` (see the module docstring).

    batch_size (`spec.batch_size`) is per process; `len()` is the batches of a full epoch on this
    rank, whatever `start_batch`: (samples // world_size) // batch_size with `spec.drop_last` (every batch
    full, every rank the same count), else every sample once, the last batch short.
    Subclasses set `num_samples` (and `classes`, the class names, where known), then call
    `require_one_batch()`.
    """

    num_samples = 0
    classes: list[str] | None = None

    def __init__(self, spec: LoaderSpec, masks: MaskGenerator | None, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        self.spec, self.aug, self.mask_generator = spec, spec.aug, masks
        self.path, self.batch_size, self.labels = str(spec.path), spec.batch_size, spec.labels
        self.train, self.drop_last, self.dtype = spec.train, spec.drop_last, spec.dtype
        self.device, self.rank, self.world_size, self.seed = torch.device(device), rank, world_size, seed
        self.epoch = self.start_batch = 0
        self.accum_steps = 1  # micro-batches per optimizer step: masks are drawn per step (GlobalBatchMasks)
        self.batch_transform = self.device_transform() if spec.train else None

    def fingerprint(self) -> str:
        """A cheap identity of the data (12 hex digits), which a resume compares with the one its
        checkpoint saved: the `SampleList`'s paths and labels where the backend lists image files,
        else the data file's sample count and size (a .beton)."""
        samples = getattr(self, "samples", None)
        if hasattr(samples, "fingerprint"):
            return samples.fingerprint()

        size = os.path.getsize(self.path) if os.path.isfile(self.path) else 0
        return hashlib.sha1(f"{self.num_samples} {size}".encode()).hexdigest()[:12]

    def describe(self) -> str:
        """The backend as the run's log names it: `data.backend`, and what decodes where it
        chooses (DALI's device, the stream backend's decoder)."""
        return self.spec.backend

    # ---------------------------------------------------------------- what a backend implements

    @abc.abstractmethod
    def read_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """This rank's batches k = start_batch, start_batch + 1, ... of epoch `self.epoch`, as
        (images, labels): images uint8 (B, 3, S, S) on any device (the base moves them, applies
        `batch_transform`, normalises), or already normalised float on the device; labels (B,) of
        any integer dtype and device, or None when `spec.labels` is false. Closed when the consumer
        leaves the epoch early (a `finally` there releases the backend's epoch)."""

    def preview_images(self, indices: list[int]) -> list[torch.Tensor]:
        """uint8 (3, S, S) evaluation views (torchvision's Resize(int(S / crop_ratio)) + CenterCrop(S)) of the
        samples at `indices`, an unreadable one skipped and the next readable sample taken instead
        (`skips.log_skips`: the first few named, then one line counting them; the (path, reason) of
        each in `self.preview_skipped`). This default reads `self.samples` (a `SampleList` of image
        files) by `decode.decode_rgb`'s rules, with `self.max_pixels`; for data.channels != 3 by
        `channels.read_pixels`', as normalised float32 (C, S, S) views (`views.channel_view`)."""
        channels = self.spec.channels
        out, tried, self.preview_skipped = [], set(), []
        for i in indices:
            for j in (*range(i, self.num_samples), *range(i)):
                if j in tried:
                    continue
                tried.add(j)
                path = self.samples.path(j)
                try:
                    img = decode_rgb(path, self.max_pixels) if channels == 3 else \
                        read_pixels(path, channels, self.max_pixels)
                except DecodeError as e:
                    self.preview_skipped.append((path, str(e)))
                    continue
                out.append(to_tensor(center_crop(img, self.aug.size, self.spec.crop_ratio)) if channels == 3 else
                           channel_view(img, self.aug, False, self.spec.crop_ratio, None))
                break
        if out:  # none read: preview_batch's error tells them
            log_skips(log, "figure preview", self.preview_skipped, len(tried), f"{self.path} tried")
        return out

    def device_transform(self) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
        """Hook for a backend's batched augmentation of the training view: a function of (uint8
        (B, 3, S, S) images on the device, a CPU torch.Generator keyed by (seed, epoch, batch,
        rank) for all its random draws) returning uint8 (B, 3, S, S), run before normalisation
        (e.g. RandAugment from `spec.rand_augment`), so a batch's augmentation does not depend on
        how the run got there. None (this default): nothing. Called once, by `__init__`."""
        return None

    # ---------------------------------------------------------------- shared

    def set_accum_steps(self, accum_steps: int) -> None:
        """The trainer's gradient accumulation: `accum_steps` consecutive batches form one step."""
        self.accum_steps = accum_steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields epoch `epoch` from batch `start_batch` on (mid-epoch resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def shard_samples(self) -> int:
        """Samples this rank reads in a full epoch (`sharding.shard_size`)."""
        return shard_size(self.num_samples, self.rank, self.world_size, self.drop_last)

    def __len__(self) -> int:
        """Batches per epoch on this rank (a full epoch, whatever `start_batch`)."""
        return num_batches(self.shard_samples(), self.batch_size, self.drop_last)

    def require_one_batch(self) -> None:
        """DatasetError (one line) unless every rank has at least one batch per epoch, or first, when
        labels are asked for (`spec.labels`), if the data is unlabeled (`classes == []`): then no
        batch size would help."""
        if self.labels and self.classes == []:
            raise DatasetError(f"'{self.path}' is unlabeled (images directly in its top folder, or a list of bare "
                               f"paths): linear probing, fine-tuning and evaluation need labels: class folders "
                               f"<root>/<class>/<image> or a `path label` list")
        if self.num_samples < self.world_size and self.drop_last:
            raise DatasetError(f"dataset of {self.num_samples} images is smaller than the {self.world_size} ranks "
                               f"sharing it")
        if len(self) == 0:
            raise DatasetError(f"{self.num_samples} images over {self.world_size} ranks do not fill one batch of "
                               f"{self.batch_size}: lower data.batch_size")

    def epoch_masks(self) -> GlobalBatchMasks | None:
        if self.mask_generator is None:
            return None
        return GlobalBatchMasks(self.mask_generator, self.seed, self.epoch, self.rank, self.world_size,
                                self.batch_size, self.device, self.accum_steps)

    def __iter__(self):
        masks = self.epoch_masks()
        with contextlib.closing(self.read_batches()) as batches:
            for k, (images, labels) in enumerate(batches, start=self.start_batch):
                yield self.make_batch(k, masks, self.to_model(images, k), labels)

    def to_model(self, images: torch.Tensor, k: int = 0) -> torch.Tensor:
        """A backend's images (batch k of the epoch) as the model takes them: on the device,
        normalised, `spec.dtype`."""
        images = images.to(self.device, non_blocking=True)
        if images.dtype != torch.uint8:
            return images.to(self.dtype)
        if self.batch_transform is not None:
            images = self.batch_transform(images, torch_generator("device_augment", self.seed, self.epoch, k,
                                                                  self.rank))
        return normalize(images, self.aug.mean, self.aug.std, self.dtype)

    def make_batch(self, k: int, masks: GlobalBatchMasks | None, images: torch.Tensor,
                   labels: torch.Tensor | None) -> tuple:
        """Batch k of the epoch: (images[, masks][, labels])."""
        # a short last batch (drop_last=False, evaluation) takes the first masks of its slice
        batch = (images, masks(k)[:images.shape[0]]) if masks is not None else (images,)
        if self.labels:
            batch += (labels.to(self.device, non_blocking=True).view(-1).long(),)
        return batch

    def preview_batch(self, n: int = 8) -> tuple:
        """(images[, masks]) for figures: the same n samples, spread evenly over the dataset, in
        the evaluation view (decoded by PIL, whatever the backend), float32 normalised on the
        device, with masks drawn from the "figure" stream of the seed: the same every call. A file
        that fails to decode is skipped with a logged warning naming it, and the next readable
        sample is taken; DatasetError if none can be read."""
        count = min(n, self.num_samples)
        wanted = [round(i * (self.num_samples - 1) / max(1, count - 1)) for i in range(count)]
        self.preview_skipped = []
        images = self.preview_images(wanted)
        if not images:
            skipped = self.preview_skipped
            if skipped and len(skipped) == self.num_samples:
                raise no_image_error(f"'{self.path}'", skipped, len(skipped), self.spec.channels)
            raise DatasetError(f"no image of '{self.path}' could be read for the figure preview")
        images = torch.stack(images).to(self.device)
        batch = (normalize(images, self.aug.mean, self.aug.std) if images.dtype == torch.uint8 else images,)
        if self.mask_generator is not None:
            g = torch_generator("figure", self.seed, device=self.device)
            batch += (self.mask_generator.sample(len(images), generator=g, device=self.device),)
        return batch


class GlobalBatchMasks:
    """Masks for micro-batch k of an epoch, drawn per optimizer step for the step's whole global
    batch (batch_size x world_size x accum_steps samples) from `derive_seed("masks", seed, epoch, step)`.

    Global position p of an epoch's sample stream (the `ShardedSampler` permutation) lies in step
    p // G at offset p % G (G the global batch); rank r's micro-batch m of step s holds offsets
    world_size * batch_size * m + r + world_size * j (j < batch_size), so it takes those masks. A sample thus
    gets the same mask whatever the split of G into ranks and accumulation steps, and any batch can
    be drawn directly, so resuming mid-epoch needs no replay.
    """

    def __init__(self, generator: MaskGenerator, seed: int, epoch: int, rank: int, world_size: int,
                 batch_size: int, device: torch.device, accum_steps: int = 1):
        self.generator, self.seed, self.epoch = generator, seed, epoch
        self.rank, self.world_size, self.batch_size, self.accum = rank, world_size, batch_size, accum_steps
        self.device = device
        self.step, self.step_masks = -1, None

    def __call__(self, k: int) -> torch.Tensor:
        """(batch_size, h, w) bool: the masks of this rank's micro-batch k of the epoch."""
        step, micro = divmod(k, self.accum)
        if step != self.step:
            g = torch_generator("masks", self.seed, self.epoch, step, device=self.device)
            self.step_masks = self.generator.sample(self.batch_size * self.world_size * self.accum, generator=g,
                                                    device=self.device)  # (G, h, w)
            self.step = step
        micro_masks = self.step_masks[micro * self.batch_size * self.world_size:(micro + 1) * self.batch_size * self.world_size]
        return micro_masks[self.rank::self.world_size].contiguous()
