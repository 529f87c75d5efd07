"""`data.backend: torch`, the reference loader: PIL decoding + the SimMIM augmentation in DataLoader
workers. The slowest backend and the one the others are checked against.

Reads a class-folder tree or a `path label` list (the scan list beside a folder when there is one,
as DALI reads it); the rank's samples per epoch are `sharding.ShardedSampler`'s. Each sample's crop
and flip come from its own generator (`derive_seed("sample", seed, epoch, index)`), so the batches
do not depend on the number of workers. The training view's resize is Pillow's bilinear filter,
run by `resample.resize_bilinear` (compiled, bit-identical, about half the CPU time:
`views.resized_crop_tensor`) where numba is installed and no per-image PIL transform follows, else
by Pillow itself. `spec.rand_augment` (fine-tuning) is timm's RandAugment on the PIL crop
(`rand_augment.PILRandAugment`). On a GPU the images leave the workers as uint8 (a quarter of the
bytes to copy) and are normalised on the device by the base (`loader.Loader`). On the CPU the
workers normalise their batch (`WorkerCollate`): in the main process the same op ran on torch's
intra-op threads, which spin for the CPU on a machine whose cores the workers keep busy (measured on
the loaded 2-core machine: 16.3 ms CPU per batch of 32 at 192 px with 2 threads, 2.3 ms with one,
as a worker runs it; the main process's CPU for a 640-image epoch went from 0.52 s to 0.09 s, with
the sampler's seeds derived a block at a time). The workers ignore the stop signals
(`dali_watchdog.worker_stop_signals`): a SIGTERM sent to the whole process group stops the trainer
after its step, with a checkpoint, instead of killing the workers under it.
"""
from __future__ import annotations

import atexit
import functools
import logging
import signal

import torch

from simmim.core.seeding import torch_generator

from .augment import normalize
from .dali_watchdog import worker_stop_signals
from .decode import checked_max_pixels
from .folder import ImageFolder
from .views import compiled_resize
from .loader import Loader
from .masking import MaskGenerator
from .options import LoaderSpec
from .rand_augment import PILRandAugment
from .scanlist import checked_samples
from .sharding import ShardedSampler
from .skips import NAMED

log = logging.getLogger(__name__)


class ReferenceLoader(Loader):
    """`Loader` over an `ImageFolder` in a torch DataLoader (spec.num_workers processes, 0: in
    this process), persistent across epochs; `set_epoch` reseeds order, augmentation and masks."""

    def __init__(self, spec: LoaderSpec, masks: MaskGenerator | None, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        super().__init__(spec, masks, device, rank, world_size, seed)
        self.max_pixels = checked_max_pixels(spec.max_pixels)
        workers = spec.num_workers
        listed = checked_samples(self.path, self.max_pixels, max(1, workers), rank, world_size, required=False,
                                 who="torch", channels=spec.channels)
        self.dataset = ImageFolder(self.path, self.aug, self.train, spec.crop_ratio, pil_transform(spec),
                                   self.max_pixels, listed, spec.channels)
        self.samples, self.classes, self.num_samples = self.dataset.samples, self.dataset.classes, len(self.dataset)
        self.bad_told = 0  # unreadable files counted in the last epoch-end line
        if self.train and workers > 0:
            compiled_resize()  # compiled here once: the forked workers inherit it
        self.sampler = ShardedSampler(self.num_samples, rank, world_size, seed, self.train, self.drop_last)
        self.require_one_batch()
        # set at interpreter exit, before multiprocessing ends the workers with SIGTERM (atexit runs
        # hooks last registered first): the one SIGTERM the workers obey
        self.exiting = torch.zeros(1, dtype=torch.uint8).share_memory_()
        atexit.register(self.exiting.fill_, 1)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", drop_last=self.drop_last,
            # workers' base seed from an explicit generator, never the global RNG (augmentation is
            # seeded per sample anyway; this keeps the process's global state out of the data path)
            generator=torch_generator("loader", seed, rank),
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=functools.partial(ignore_stop_signals, self.exiting),
            collate_fn=WorkerCollate(self.aug, self.dtype, workers > 0 and self.device.type == "cpu"))

    def read_batches(self):
        self.sampler.set_epoch(self.epoch, self.start_batch * self.batch_size)
        try:
            yield from self.loader  # (uint8 (B, 3, S, S) or, data.channels != 3, float32 (B, C, S, S), labels (B,))
        finally:  # the trainer leaves the epoch after its last step, before the DataLoader ends: counted here too
            self.tell_bad()

    def tell_bad(self) -> None:
        """The epoch-end line counting the unreadable files found so far, once they outnumber the named ones."""
        bad = self.dataset.bad_count()
        if bad > max(NAMED, self.bad_told):  # past the named ones: one line an epoch while it grows
            log.warning("torch: %d of the %d files of %s are unreadable and skipped so far (the first %d named "
                        "above); `simmim scan %s` lists each with its reason, and this loader then reads its "
                        "checked list", bad, self.num_samples, self.path, NAMED, self.path)
        self.bad_told = bad


class WorkerCollate:
    """The DataLoader's `collate_fn`: torch's default collate of (uint8 (3, S, S), label) samples,
    or with `normalize` the images stacked and normalised to `dtype` (`augment.normalize`: the
    same values as the base's) in the worker, written straight into shared memory when in one (as
    the default collate places its batches: handing the batch to the main process copies nothing).
    Returns (images (B, 3, S, S), labels (B,))."""

    def __init__(self, aug, dtype: torch.dtype, normalize: bool):
        self.mean, self.std, self.dtype, self.normalize = aug.mean, aug.std, dtype, normalize

    def __call__(self, samples):
        if not self.normalize or samples[0][0].dtype != torch.uint8:  # data.channels != 3: normalised already
            return torch.utils.data.default_collate(samples)
        images = torch.stack([s[0] for s in samples])  # (B, 3, S, S) uint8, private memory
        labels = torch.utils.data.default_collate([s[1] for s in samples])
        out = None
        if self.dtype == torch.float32 and torch.utils.data.get_worker_info() is not None:
            # the default collate's own shared allocation (torch/utils/data/_utils/collate.py)
            storage = torch.empty(0)._typed_storage()._new_shared(images.numel(), device=images.device)
            out = torch.empty(0).new(storage).resize_(images.shape)
        return normalize(images, self.mean, self.std, self.dtype, out=out), labels


def ignore_stop_signals(exiting: torch.Tensor, worker_id: int) -> None:
    """The DataLoader's `worker_init_fn` (module level: picklable under spawn); `exiting`: uint8
    (1,) in shared memory, set when the parent exits."""
    worker_stop_signals(signal.SIG_IGN, exiting)


def pil_transform(spec: LoaderSpec):
    """The per-image PIL op after crop and flip, f(img, rng) -> img, or None: `spec.transform`, or
    timm's RandAugment of `spec.rand_augment` on the training view."""
    if spec.rand_augment and spec.train:
        if spec.transform is not None:
            raise ValueError("LoaderSpec: give rand_augment or transform, not both")
        return PILRandAugment(spec.rand_augment, spec.aug.mean)
    return spec.transform
