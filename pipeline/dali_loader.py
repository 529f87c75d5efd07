"""`data.backend: dali`: SimMIM batches decoded and augmented by NVIDIA DALI, straight from JPEGs.

One DALI pipeline, built at the first epoch and kept: a parallel external source (`EpochSource`,
run per sample by DALI's Python worker processes) reads each sample's file bytes in the order of
the epoch and draws its training view as the reference loader does (`augment.sample_view`: the
crop box and flip from `derive_seed("sample", seed, epoch, index)`, on the image size read from
the file's header), then JPEG decoding of that box only (`fn.decoders.image_slice`, absolute
pixel coordinates) on `device='mixed'` when a GPU is present (nvJPEG, with `hw_decoder_load` of
the images sent to the hardware JPEG decoder of A100/H100) or on the CPU otherwise
(`device_id=None`), antialiased bilinear resize of the decoded crop to the input size (the
reference loader's crop-then-resize), the flip, and normalisation to CHW float/bf16 in one
crop_mirror_normalize. So DALI crops the reference loader's boxes and flips its samples (the
pixels differ only by decoder and resampler, tests/test_pixels.py), whatever the number of
workers, and a resumed epoch gives the uninterrupted epoch's batches bit for bit. The evaluation
view decodes the whole image, resizes it to the source's size and slices the crop there
(`augment.eval_geometry`: torchvision's Resize + CenterCrop). Masks, batch assembly and the
figure preview are the base's (`loader.Loader`); `graph_augment` is where a training-view
augmentation joins the graph: fine-tuning's RandAugment (`spec.rand_augment`) is DALI's own, on
the resized uint8 crop (`dali_augment.py`; the pipeline is then built with conditionals), drawn
from the pipeline's seed: reproducible from a given start, but after a mid-run resume its draws
differ from the uninterrupted run's (the crops and flips do not).

Sharding: the rank's samples for an epoch are the reference loader's (`sharding.ShardedSampler`: a
permutation of (seed, epoch), rank r taking positions r, r + world, ..., remainder dropped), in
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
"""
from __future__ import annotations

import io
import logging
import os
import signal
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import Augmentation, eval_geometry, sample_view
from .dali_augment import dali_rand_augment
from .dali_watchdog import WorkerWatchdog, remove_orphans, worker_pids, worker_stop_signals
from .decode import DALI_DECODE_ARGS, check_image, checked_max_pixels
from .errors import DatasetError
from .folder import SampleList
from .loader import Loader
from .masking import MaskGenerator
from .options import LoaderSpec
from .rand_augment import parse_rand_augment
from .scanlist import checked_samples
from .seeding import derive_seed
from .sharding import ShardedSampler, shard_size

log = logging.getLogger(__name__)

DEVICES = ("auto", "mixed", "cpu")


def resize_square(images, size: int, device: str):
    """The training view's resize of a decoded crop (HWC uint8) to size x size: bilinear with
    antialiasing, as PIL's (the reference loader's) bilinear is. Without antialiasing DALI samples
    only the 2x2 nearest source pixels when it shrinks, and aliases exactly the high frequencies
    SimMIM regresses: mean 1.9 uint8 levels from the reference on the same crop box, p99 15, max 69
    (sample set, 192 px); with it, mean 0.15, p99 1 (tests/test_pixels.py)."""
    from nvidia.dali import fn, types

    return fn.resize(images, device=device, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                     antialias=True)


class EpochSchedule:
    """What each DALI epoch reads, shared with the source's worker processes: row `e % SLOTS` holds
    (epoch, first sample, samples) for the pipeline's e-th epoch. A file-backed memmap (under
    /dev/shm where there is one), so forked and spawned workers alike open it by name."""

    SLOTS = 4

    def __init__(self):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        if base:
            remove_orphans(base, "simmim-dali-epochs-")  # left by processes killed with SIGKILL
        fd, self.path = tempfile.mkstemp(prefix=f"simmim-dali-epochs-{os.getpid()}-", dir=base)
        os.close(fd)
        self.table = np.memmap(self.path, dtype=np.int64, mode="w+", shape=(self.SLOTS, 3))
        self._cleanup = weakref.finalize(self, os.unlink, self.path)

    def set(self, dali_epoch: int, epoch: int, start: int, length: int) -> None:
        self.table[dali_epoch % self.SLOTS] = (epoch, start, length)
        self.table.flush()

    def stop(self, dali_epoch: int) -> None:
        """End DALI epoch `dali_epoch` early: every sample not yet asked for raises StopIteration."""
        self.table[dali_epoch % self.SLOTS, 2] = 0


class EpochSource:
    """DALI's per-sample callback (parallel external source): file bytes uint8 (n,) and label int32
    (1,) of position `idx_in_epoch` of the epoch the schedule names for `epoch_idx`, then, from the
    image size in the file's header: for the training view the sample's crop box, start (x, y)
    and shape (w, h) as float32 (2,) each in pixels, and its flip, int32 () 0 or 1
    (`augment.sample_view` of (seed, epoch, index)); for the evaluation view the resized size
    (h, w) (the order of fn.resize's size for HWC images), float32 (2,), and the crop's start (x, y)
    in it, int32 (2,) (`augment.eval_geometry`). Positions past the epoch's padded length raise
    StopIteration (DALI ends the epoch there). Pickled to spawned workers as the sample arrays plus
    the schedule's file name."""

    def __init__(self, samples: SampleList, schedule_path: str, size: int, rank: int, world: int, seed: int,
                 shuffle: bool, drop_last: bool, batch_size: int, aug: Augmentation, train: bool,
                 crop_ratio: float):
        self.samples, self.schedule_path = samples, schedule_path
        self.sampler = ShardedSampler(size, rank, world, seed, shuffle, drop_last)
        self.batch_size, self.aug, self.seed, self.train, self.crop_ratio = batch_size, aug, seed, train, crop_ratio
        self._table, self._key, self._order = None, None, None

    def __getstate__(self):
        return {**self.__dict__, "_table": None, "_key": None, "_order": None}

    def order(self, epoch: int, start: int) -> np.ndarray:
        if self._key != (epoch, start):
            self.sampler.set_epoch(epoch, start)
            self._order, self._key = self.sampler.indices(), (epoch, start)
        return self._order

    def __call__(self, info):
        if self._table is None:  # the first call in this worker process
            self._table = np.memmap(self.schedule_path, dtype=np.int64, mode="r", shape=(EpochSchedule.SLOTS, 3))
            worker_stop_signals(signal.SIG_DFL)  # DALI's pool ends its workers with SIGTERM
        epoch, start, length = (int(x) for x in self._table[info.epoch_idx % EpochSchedule.SLOTS])
        j = info.idx_in_epoch
        if j >= -(-length // self.batch_size) * self.batch_size:
            raise StopIteration
        order = self.order(epoch, start)
        i = int(order[min(j, length - 1)])  # a partial last batch is padded with its last sample
        data = np.fromfile(self.samples.path(i), dtype=np.uint8)
        label = np.array([self.samples.labels[i]], np.int32)
        width, height = header_size(data)
        if not self.train:
            rw, rh, left, top = eval_geometry(width, height, self.aug.size, self.crop_ratio)
            return data, label, np.array([rh, rw], np.float32), np.array([left, top], np.int32)
        left, top, w, h, flip = sample_view(width, height, self.aug, self.seed, epoch, i)
        return (data, label, np.array([left, top], np.float32), np.array([w, h], np.float32),
                np.array(flip, np.int32))


def header_size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) of the image whose file bytes are `data`, from its header (PIL's lazy open:
    nothing is decoded). As stored: the EXIF orientation is not applied (decode.py)."""
    with warnings.catch_warnings():
        # the scan held the image to data.max_pixels; PIL would warn between its limit and twice it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data.tobytes())) as img:
            return img.size


class DALILoader(Loader):
    """`Loader` over image files decoded by DALI. `spec.dali` holds the speed knobs: `device`
    (auto | mixed | cpu), `hw_decoder_load` (share of JPEGs for the hardware decoder), `prefetch`
    (batches queued ahead), `threads` (CPU threads; 0: spec.num_workers), `preallocate` (bytes per
    image preallocated for nvJPEG's host and device buffers; 0: DALI's default);
    the attribute `preallocate_hw` (width, height) hints the hardware decoder's buffer size."""

    preallocate_hw: tuple[int, int] = (0, 0)

    def __init__(self, spec: LoaderSpec, masks: MaskGenerator | None, device: torch.device | str,
                 rank: int = 0, world: int = 1, seed: int = 0):
        import nvidia.dali  # noqa: F401 - fail here, with the install hint from build_loader

        super().__init__(spec, masks, device, rank, world, seed)
        o = spec.dali
        if o.device not in DEVICES:
            raise DatasetError(f"data.dali.device must be one of {', '.join(DEVICES)}, got '{o.device}'")
        if o.device == "mixed" and self.device.type != "cuda":
            raise DatasetError("data.dali.device mixed decodes on the GPU, but training runs on the CPU")
        self.max_pixels = checked_max_pixels(spec.max_pixels)
        # a folder: its checked list (scanned first when there is none); a list: stat-checked
        self.samples, self.classes = checked_samples(self.path, self.max_pixels, max(1, spec.num_workers), rank,
                                                     world, required=True, who="dali")
        self.num_samples = len(self.samples)
        self.threads = max(1, o.threads or spec.num_workers)
        self.hw_decoder_load, self.prefetch, self.preallocate = o.hw_decoder_load, max(1, o.prefetch), o.preallocate
        self.decode = "cpu" if o.device == "cpu" or self.device.type != "cuda" else "mixed"
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        # parsed here: an error while DALI traces the graph would lose its one-line form
        self.rand_augment = parse_rand_augment(spec.rand_augment) if self.train and spec.rand_augment else None
        self.require_one_batch()
        self.py_workers = max(1, min(self.threads, 8))  # file reads only: decoding is DALI's threads
        self.schedule = EpochSchedule()
        self.source = EpochSource(self.samples, self.schedule.path, self.num_samples, rank, world, seed,
                                  self.train, self.drop_last, self.batch_size, self.aug, self.train,
                                  spec.crop_ratio)
        self.pipe = self.iterator = None
        self.watchdog = WorkerWatchdog()  # a dead worker ends the wait for it (dali_watchdog.py)
        self.dali_epoch = 0  # epochs the pipeline has run: the schedule's row

    def epoch_length(self) -> int:
        """Samples this rank reads from `start_batch` on in the current epoch."""
        start = self.start_batch * self.batch_size
        if self.drop_last:
            return max(0, (len(self) - self.start_batch) * self.batch_size)
        return max(0, shard_size(self.num_samples, self.rank, self.world, False) - start)

    def graph_augment(self, images):
        """Hook for an augmentation of the training view inside the DALI graph: `images` are the
        resized crops, uint8 HWC on the pipeline's device ('gpu' with mixed decoding, else 'cpu');
        returns the same: DALI's RandAugment when `spec.rand_augment` is set, else unchanged."""
        if self.rand_augment is None:
            return images
        return dali_rand_augment(images, self.rand_augment, (self.aug.size, self.aug.size),
                                 tuple(round(255 * m) for m in self.aug.mean))

    def build_pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        a, size = self.aug, self.aug.size
        decode, ops = self.decode, "gpu" if self.decode == "mixed" else "cpu"
        out_dtype = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16,
                     torch.bfloat16: types.FLOAT}[self.dtype]  # DALI has no bf16 output: cast in torch
        decoder_opts = {"device": decode, "output_type": types.RGB, **DALI_DECODE_ARGS}
        if decode == "mixed":
            decoder_opts["hw_decoder_load"] = self.hw_decoder_load
            if self.preallocate:
                decoder_opts["device_memory_padding"] = self.preallocate
                decoder_opts["host_memory_padding"] = self.preallocate
            if self.preallocate_hw[0]:
                decoder_opts["preallocate_width_hint"], decoder_opts["preallocate_height_hint"] = self.preallocate_hw
        mean = [255 * m for m in a.mean]
        std = [255 * s for s in a.std]

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, prefetch_queue_depth=self.prefetch,
                      device_id=self.device_id,
                      seed=derive_seed("dali", self.seed, self.epoch, self.rank, self.start_batch, bits=31),
                      exec_dynamic=True, py_num_workers=self.py_workers,
                      enable_conditionals=self.rand_augment is not None,  # auto_aug picks ops per sample
                      py_start_method="spawn" if self.device.type == "cuda" else "fork")
        def pipe():
            if self.train:  # the box and flip of `augment.sample_view`, from the source
                jpegs, label, start, shape, mirror = fn.external_source(
                    source=self.source, num_outputs=5, batch=False, parallel=True,
                    dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32])
                images = fn.decoders.image_slice(jpegs, start, shape, axis_names="WH", normalized_anchor=False,
                                                 normalized_shape=False, **decoder_opts)
                images = self.graph_augment(resize_square(images, size, ops))
            else:  # the evaluation view (`augment.eval_geometry`): resize to the source's size, crop there
                jpegs, label, resized, start = fn.external_source(
                    source=self.source, num_outputs=4, batch=False, parallel=True,
                    dtype=[types.UINT8, types.INT32, types.FLOAT, types.INT32])
                images = fn.decoders.image(jpegs, **decoder_opts)
                images = fn.resize(images, device=ops, size=resized, interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.slice(images, start=start, shape=[size, size], axis_names="WH", device=ops)
                mirror = 0
            images = fn.crop_mirror_normalize(images, device=ops, dtype=out_dtype, output_layout="CHW",
                                              mean=mean, std=std, mirror=mirror)
            if ops == "gpu":
                label = label.gpu()
            return images, label

        return pipe()

    def read_batches(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        length = self.epoch_length()
        if length == 0:
            return
        self.schedule.set(self.dali_epoch, self.epoch, self.start_batch * self.batch_size, length)
        try:
            if self.iterator is None:  # the first batch is scheduled as the iterator is made
                self.pipe = self.build_pipeline()
                self.pipe.build()
                self.watchdog.watch(worker_pids(self.pipe))
                with self.watchdog.guard():
                    self.iterator = DALIGenericIterator(self.pipe, ["images", "labels"], auto_reset=False)
            else:
                with self.watchdog.guard():
                    self.iterator.reset()
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
            batches = -(-length // self.batch_size)
            for k in range(self.start_batch, self.start_batch + batches):
                try:
                    with self.watchdog.guard():
                        out = next(self.iterator)
                except StopIteration:
                    break
                except Exception:  # noqa: BLE001 - DALI's error, or our source's from its worker
                    error = self.failure_in_flight(k)
                    if error is None:  # no file and no worker at fault: an internal bug keeps its traceback
                        raise
                    raise error from None
                real = min(self.batch_size, length - (k - self.start_batch) * self.batch_size)
                # normalised float (B, 3, S, S) (DALI has no bf16: the base casts), labels int32 (B, 1);
                # the padded last batch of an evaluation epoch is cut to its real samples
                yield out[0]["images"][:real], out[0]["labels"][:real]
            finished = True
        finally:
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
        window = order[max(0, first - self.batch_size):first + (self.prefetch + 2) * self.batch_size]
        return self.decode_failure([self.samples.path(int(i)) for i in window], batch)

    def decode_failure(self, files: list[str], batch: int) -> DatasetError | None:
        """A one-line DatasetError for a DALI failure at `batch`, naming the bad files among `files`
        (by the decode rules, then by DALI itself) and the command that rebuilds the list; None when
        every file of `files` reads and decodes (the failure is not the data's)."""
        bad = [(f, r) for f in files for r in [check_image(f, self.max_pixels)[0]] if r is not None]
        if not bad:
            bad = [(f, "DALI cannot decode it") for f in files if not dali_decodes(f)]
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


def dali_decodes(path: str) -> bool:
    """Whether DALI's CPU decoder, with our decode arguments, reads `path`."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def one():
        data, _ = fn.readers.file(files=[path])
        return fn.decoders.image(data, device="cpu", output_type=types.RGB, **DALI_DECODE_ARGS)

    try:
        p = one()
        p.build()
        p.run()
        return True
    except Exception:  # noqa: BLE001 - any DALI error: it does not decode
        return False

