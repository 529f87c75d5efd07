"""`data.backend: dali`: SimMIM batches decoded and augmented by NVIDIA DALI, straight from JPEGs.

One DALI pipeline, built at the first epoch and kept (the graph, shared with the stream backend's
DALI path: `dali_graph.py`). Per batch:
- a parallel external source (`EpochSource`, run per batch by DALI's Python worker processes)
  reads the batch's file bytes in the order of the epoch and draws the batch's training views at
  once (`augment.sample_views`: each sample's crop box and flip from `derive_seed("sample", seed,
  epoch, index)`, the torch loader's draw) on the image sizes, which a worker reads from a file's
  header the first time the file comes by and keeps in a table shared by the workers
  (`EpochSchedule.sizes`): no header is read twice in a run;
- JPEG decoding of that box only (`fn.decoders.image_slice`, absolute pixel coordinates, as
  `image_random_crop` decodes its own box) on `device='mixed'` when a GPU is present (nvJPEG,
  with `hw_decoder_load` of the images sent to the hardware JPEG decoder of A100/H100) or on the
  CPU otherwise (`device_id=None`);
- the antialiased bilinear resize of the decoded crop to the input size (the reference loader's
  crop-then-resize, Pillow's filter) and the flip. On the GPU: DALI's `fn.resize` (antialias on),
  `graph_augment` and the normalisation in one `crop_mirror_normalize`. On the CPU
  (`resize_in_torch`): the decoded crops leave DALI as they are and torch resizes them
  (`resize_views`: `interpolate(..., antialias=True)` on uint8 channels-last, Pillow's filter
  within 1 uint8 level, ~6x cheaper than DALI's antialiased CPU resize), flips them into
  one uint8 batch, and the base normalises it. Fine-tuning's RandAugment on the CPU keeps DALI's
  resize (it runs in the graph on the resized crop).
So DALI crops the reference loader's boxes and flips its samples (the pixels differ only by the
JPEG decoder, tests/test_pixels.py), whatever the number of workers, and a resumed epoch gives
the uninterrupted epoch's batches bit for bit. The evaluation view decodes the whole image,
resizes it to the source's size and takes the centre crop there (`augment.eval_geometry`:
torchvision's Resize + CenterCrop). Masks, batch assembly and the figure preview are the base's
(`loader.Loader`); `graph_augment` is where a training-view augmentation joins the graph:
fine-tuning's RandAugment (`spec.rand_augment`) is DALI's own, on the resized uint8 crop
(`dali_augment.py`; the pipeline is then built with conditionals), drawn from the pipeline's
seed: reproducible from a given start, but after a mid-run resume its draws differ from the
uninterrupted run's (the crops and flips do not).

Where the CPU time goes (2,000 ImageNet-like JPEGs, 192 px, batch 32, one thread, process CPU per
image, docs/data.md): ROI decode 0.75 ms, DALI's antialiased resize 0.84 ms (0.48 without
antialiasing) against torch's 0.13 alone (0.33 in the loader with the flip and normalisation),
crop_mirror_normalize 0.20, reading the bytes 0.07, a file's header by PIL 0.03 (now once per
run), the batch's views 0.007. The whole loader: 1.13 ms per image against 1.66 for a plain DALI
pipeline, 1.44 at d837e5f and 1.96 before this path.

Sharding: the rank's samples for an epoch are the reference loader's (`sharding.ShardedSampler`: a
permutation of (seed, epoch), rank r taking positions r, r + world_size, ..., remainder dropped), in
that order. So every backend sees the same global batches, ranks are disjoint and cover the
dataset each epoch, every rank runs `len()` full batches, and a mid-epoch resume starts at the
right sample. Each epoch's (epoch, start, length) goes to the workers through a small shared
table (`EpochSchedule`); every worker derives the order itself from it (an array, tens of ms at
1.28M), so nothing is rebuilt or re-sent per epoch, and no rank holds more than the sample list.
The pipeline's own seed (`derive_seed("dali", seed, epoch, rank, start batch)` of the epoch it is
built at) drives only operators that `graph_augment` adds; the training view's crop and flip do
not use it. Files reach DALI as bytes read in Python, so any name the file system allows works.

Decoding follows `decode.decode_rgb`'s rules (`DALI_DECODE_ARGS`: EXIF orientation not applied, so
the header's width x height, as PIL reads it, is the decoded image's and the box is in its pixels).
DALI stops at the first file it cannot decode, so the files are checked before the first epoch:
`simmim scan SRC` writes a clean list (`SRC.clean.txt`) and its record; with data.path at SRC the
list beside it is brought up to date (`scanlist.checked_samples`: a stat per file, only new or
changed files decoded again, data.max_pixels applied), and without one the loader runs the same
scan itself and keeps its result there (rank 0 scans when torch.distributed is initialised; the
others wait for the list). A file that fails anyway (changed during the run) raises
`DatasetError` naming it and the command that fixes the list.

Grey runs (data.channels=1): the decoder's `output_type=types.GRAY`, one channel through the same
graph (the base normalises with one mean / std). A grey file decodes to its stored values, as in
the torch backend; a colour file is converted by DALI's decoder (a JPEG's own luma plane, not PIL's
luma of the decoded RGB: within a level or two of the torch backend's). `.npy` arrays, which a grey
torch run also reads, are refused in one line.
"""
from __future__ import annotations

import logging
import os
import signal
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from simmim.core.errors import DatasetError

from .augment import Augmentation
from .dali_graph import DALIGraph, batch_views, dali_batches, dali_decodes, header_size
from .dali_watchdog import WorkerWatchdog, remove_orphans, worker_pids, worker_stop_signals
from .channels import is_array_file
from .decode import check_image, checked_max_pixels
from .folder import SampleList
from .loader import Loader
from .masking import MaskGenerator
from .options import LoaderSpec
from .scanlist import checked_samples
from .sharding import ShardedSampler, shard_size

log = logging.getLogger(__name__)


def open_schedule(path: str, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The two tables of an `EpochSchedule` file: the epochs, int64 (SLOTS, 3), and the image
    sizes, int32 (num_samples, 2), both memory-mapped read-write."""
    table = np.memmap(path, dtype=np.int64, mode="r+", shape=(EpochSchedule.SLOTS, 3))
    sizes = np.memmap(path, dtype=np.int32, mode="r+", offset=table.nbytes, shape=(num_samples, 2))
    return table, sizes


class EpochSchedule:
    """What each DALI epoch reads, shared with the source's worker processes: row `e % SLOTS` of
    `table` holds (epoch, first sample, samples) for the pipeline's e-th epoch; `sizes` holds each
    sample's (width, height), (0, 0) until a worker has read its header. A file-backed memmap
    (under /dev/shm where there is one), so forked and spawned workers alike open it by name."""

    SLOTS = 4

    def __init__(self, num_samples: int):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        if base:
            remove_orphans(base, "simmim-dali-epochs-")  # left by processes killed with SIGKILL
        fd, self.path = tempfile.mkstemp(prefix=f"simmim-dali-epochs-{os.getpid()}-", dir=base)
        try:
            os.ftruncate(fd, self.SLOTS * 3 * 8 + num_samples * 2 * 4)  # zeros: no size known yet
        finally:
            os.close(fd)
        self._cleanup = weakref.finalize(self, os.unlink, self.path)
        self.table, self.sizes = open_schedule(self.path, num_samples)

    def set(self, dali_epoch: int, epoch: int, start: int, length: int) -> None:
        self.table[dali_epoch % self.SLOTS] = (epoch, start, length)
        self.table.flush()

    def stop(self, dali_epoch: int) -> None:
        """End DALI epoch `dali_epoch` early: every batch not yet asked for raises StopIteration."""
        self.table[dali_epoch % self.SLOTS, 2] = 0


class EpochSource:
    """DALI's per-batch callback (parallel external source, `batch_info=True`): for batch
    `info.iteration` of the epoch the schedule names for `info.epoch_idx`, with n its samples
    (batch_size, fewer in a short last batch): their file bytes (n arrays of uint8), labels int32
    (n, 1), the region to decode, start (x, y) and shape (w, h) as float32 (n, 2) each in pixels,
    and the view's geometry int32 (n, 5) (`resize_views`' (out_h, out_w, top, left, flip)).
    Training view: the crop box and flip of `augment.sample_views` of (seed, epoch, index);
    evaluation view: the whole image, resized and cropped by `augment.eval_geometry`. Batches past
    the epoch's length raise StopIteration (DALI ends the epoch there). Image sizes come from the
    schedule's shared table, a file's header read (and stored there) the first time it comes by.
    Pickled to spawned workers as the sample arrays plus the schedule's file name."""

    def __init__(self, samples: SampleList, schedule_path: str, size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, drop_last: bool, batch_size: int, aug: Augmentation, train: bool,
                 crop_ratio: float):
        self.samples, self.schedule_path, self.num_samples = samples, schedule_path, size
        self.sampler = ShardedSampler(size, rank, world_size, seed, shuffle, drop_last)
        self.batch_size, self.aug, self.seed, self.train, self.crop_ratio = batch_size, aug, seed, train, crop_ratio
        self._table, self._sizes, self._key, self._order = None, None, None, None

    def __getstate__(self):
        return {**self.__dict__, "_table": None, "_sizes": None, "_key": None, "_order": None}

    def order(self, epoch: int, start: int) -> np.ndarray:
        if self._key != (epoch, start):
            self.sampler.set_epoch(epoch, start)
            self._order, self._key = self.sampler.indices(), (epoch, start)
        return self._order

    def __call__(self, info):
        if self._table is None:  # the first call in this worker process
            self._table, self._sizes = open_schedule(self.schedule_path, self.num_samples)
            worker_stop_signals(signal.SIG_DFL)  # DALI's pool ends its workers with SIGTERM
        epoch, start, length = (int(x) for x in self._table[info.epoch_idx % EpochSchedule.SLOTS])
        first = info.iteration * self.batch_size
        if first >= length:
            raise StopIteration
        idx = self.order(epoch, start)[first:min(first + self.batch_size, length)]
        data = [np.fromfile(self.samples.path(i), dtype=np.uint8) for i in idx.tolist()]
        labels = np.asarray(self.samples.labels)[idx].astype(np.int32)[:, None]
        return (data, labels, *self.views(idx, self.image_sizes(idx, data), epoch))

    def image_sizes(self, idx: np.ndarray, data: list[np.ndarray]) -> np.ndarray:
        """(width, height) int64 (n, 2) of samples `idx` (file bytes `data`), from the shared table;
        the header of a file not seen yet is read and stored there."""
        wh = np.array(self._sizes[idx], np.int64)
        for k in np.flatnonzero((wh == 0).any(axis=1)).tolist():
            wh[k] = header_size(data[k])
            self._sizes[idx[k]] = wh[k]
        return wh

    def views(self, idx: np.ndarray, wh: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, shape, geometry) of samples `idx` of `epoch` with sizes `wh` (`dali_graph.batch_views`)."""
        return batch_views(idx, wh, epoch, self.aug, self.seed, self.train, self.crop_ratio)


class DALILoader(Loader):
    """`Loader` over image files decoded by DALI (the module docstring; the graph and its
    `spec.dali` knobs: `dali_graph.DALIGraph`, `self.graph`)."""

    def __init__(self, spec: LoaderSpec, masks: MaskGenerator | None, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        import nvidia.dali  # noqa: F401 - fail here, with the install hint from build_loader

        super().__init__(spec, masks, device, rank, world_size, seed)
        self.graph = DALIGraph(spec, self.device, self.train, rank, seed)
        self.max_pixels = checked_max_pixels(spec.max_pixels)
        # a folder: its checked list (scanned first when there is none); a list: stat-checked
        self.samples, self.classes = checked_samples(self.path, self.max_pixels, max(1, spec.num_workers), rank,
                                                     world_size, required=True, who="dali", channels=spec.channels)
        self.num_samples = len(self.samples)
        if spec.channels != 3:
            arrays = [p for p, _ in self.samples if is_array_file(p, spec.channels)][:1]
            if arrays:
                raise DatasetError(f"data.backend=dali decodes image files, not arrays such as {arrays[0]}: "
                                   f"use data.backend=torch for .npy data")
        self.require_one_batch()
        self.py_workers = max(1, min(self.graph.threads, 8))  # file reads and views only: decoding is DALI's threads
        self.schedule = EpochSchedule(self.num_samples)
        self.source = EpochSource(self.samples, self.schedule.path, self.num_samples, rank, world_size, seed,
                                  self.train, self.drop_last, self.batch_size, self.aug, self.train,
                                  spec.crop_ratio)
        self.pipe = self.iterator = None
        self.watchdog = WorkerWatchdog()  # a dead worker ends the wait for it (dali_watchdog.py)
        self.dali_epoch = 0  # epochs the pipeline has run: the schedule's row

    def describe(self) -> str:
        return f"dali (decoding on the {'GPU' if self.graph.decode == 'mixed' else 'CPU'})"

    def epoch_length(self) -> int:
        """Samples this rank reads from `start_batch` on in the current epoch."""
        start = self.start_batch * self.batch_size
        if self.drop_last:
            return max(0, (len(self) - self.start_batch) * self.batch_size)
        return max(0, shard_size(self.num_samples, self.rank, self.world_size, False) - start)

    def build_pipeline(self):
        """The graph over the files' parallel source (`EpochSource` in DALI worker processes)."""
        return self.graph.pipeline(self.source, self.epoch, self.start_batch, self.py_workers)

    def start_epoch(self) -> None:
        """Builds the pipeline and its iterator at the first epoch (the first batch is scheduled
        as the iterator is made), else resets them for the next."""
        if self.iterator is not None:
            with self.watchdog.guard():
                self.iterator.reset()
            return
        self.pipe = self.build_pipeline()
        self.pipe.build()
        self.watchdog.watch(worker_pids(self.pipe))
        with self.watchdog.guard():
            self.iterator = self.graph.iterator(self.pipe)

    def read_batches(self):
        length = self.epoch_length()
        if length == 0:
            return
        self.schedule.set(self.dali_epoch, self.epoch, self.start_batch * self.batch_size, length)
        try:
            self.start_epoch()
        except Exception:  # noqa: BLE001 - a file that fails in the first batches
            error = self.failure_in_flight(self.start_batch)
            self.watchdog.watch([])
            self.pipe = self.iterator = None
            self.dali_epoch = 0
            if error is None:  # no file and no worker at fault: an internal bug keeps its traceback
                raise
            raise error from None
        finished = False
        try:
            # DALI's error, or our source's from its worker: explained by the files in flight
            yield from dali_batches(self.iterator, -(-length // self.batch_size),
                                    lambda k: self.failure_in_flight(self.start_batch + k), self.watchdog.guard)
            finished = True
        finally:
            self.end_epoch(finished)

    def end_epoch(self, finished: bool) -> None:
        """Drains the epoch's batches still in flight (none are made once `schedule.stop`)."""
        if not finished:  # left early: nothing more is read, the batches already made are dropped
            self.schedule.stop(self.dali_epoch)
        try:  # next(), not a for loop: iter() on a DALI iterator resets it
            while True:
                with self.watchdog.guard():  # a dead worker's pipeline is dropped, not drained
                    next(self.iterator)
        except StopIteration:
            self.dali_epoch += 1
        except Exception:  # noqa: BLE001 - the pipeline failed (a decode error, raised above): rebuild next epoch
            self.watchdog.watch([])
            self.pipe = self.iterator = None
            self.dali_epoch = 0

    def failure_in_flight(self, batch: int) -> DatasetError | None:
        """`decode_failure` for an error at `batch` of this epoch: DALI's message names no file, so
        the files of the batches in flight around it are checked. A worker that died explains it instead.
        None when neither explains it (the caller re-raises: an internal bug keeps its traceback)."""
        if self.watchdog.scan() is not None:
            return self.watchdog.error()
        first = (batch - self.start_batch) * self.batch_size
        order = self.source.order(self.epoch, self.start_batch * self.batch_size)
        window = order[max(0, first - self.batch_size):first + (self.graph.prefetch + 2) * self.batch_size]
        return self.decode_failure([self.samples.path(int(i)) for i in window], batch)

    def decode_failure(self, files: list[str], batch: int) -> DatasetError | None:
        """A one-line DatasetError for a DALI failure at `batch`, naming the bad files among `files`
        (by the decode rules, then by DALI itself) and the command that rebuilds the list; None when
        every file of `files` reads and decodes (the failure is not the data's)."""
        bad = [(f, r) for f in files for r in [check_image(f, self.max_pixels)[0]] if r is not None]
        if not bad:
            bad = [(f, "DALI cannot decode it") for f in files if not dali_decodes(np.fromfile(f, np.uint8))]
        if not bad:
            return None
        src = Path(self.path)
        folder = Path(str(src).removesuffix(".clean.txt"))  # the list `simmim scan FOLDER` writes
        if src.is_dir() or (folder != src and folder.is_dir()):
            fix = f"`simmim scan {folder if folder.is_dir() else src}`"
        else:
            fix = f"`simmim scan {src} --out {src}`"
        where = f"epoch {self.epoch}, batch {batch}"
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return DatasetError(f"cannot decode {bad[0][0]!r} ({bad[0][1]}){more} in {where}; "
                            f"changed since the scan? rebuild the list with {fix}")
