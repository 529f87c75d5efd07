"""The DALI half of a loader: a batch of encoded images, each with the box to decode and its view's
geometry, in; the batch's views out. Shared by the file loader (`dali_loader.DALILoader`, whose
parallel source reads files) and the shard loader (`stream_dali.StreamDALILoader`, whose source is
the shards' DataLoader), so both decode, resize, flip and normalise alike.

The graph (`DALIGraph.pipeline`): an external source of five outputs per batch (the encoded bytes,
labels int32 (n, 1), the box's start (x, y) and shape (w, h) float32 (n, 2) in pixels, the view's
geometry int32 (n, 5): `resize_views`' (out_h, out_w, top, left, flip)), then
`fn.decoders.image_slice` of the box only (nvJPEG on `device='mixed'` with a GPU, the hardware
decoder taking `hw_decoder_load` of the images; the CPU otherwise), then either
- on the GPU (or with RandAugment, which runs in the graph): DALI's antialiased resize,
  `graph_augment`, and flip + normalisation in one `crop_mirror_normalize` (`graph_view`), or
- on the CPU: the decoded crops leave DALI as they are and torch resizes, flips and normalises
  them (`CropBatches`, `resize_views`): ~6x cheaper than DALI's antialiased CPU resize.
`batch_views` draws a batch's boxes and geometry: the training view's crop and flip from
`augment.sample_views` (the torch loader's draw, keyed by (seed, epoch, sample index)), the
evaluation view from `augment.eval_geometry`.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
from PIL import Image

from simmim.core.errors import DatasetError
from simmim.core.seeding import derive_seed

from .augment import Augmentation, eval_geometry, sample_views
from .dali_augment import dali_rand_augment
from .decode import DALI_DECODE_ARGS
from .options import DEVICES, LoaderSpec
from .rand_augment import parse_rand_augment


def resize_square(images, size: int, device: str):
    """The training view's resize of a decoded crop (HWC uint8) to size x size inside the DALI
    graph: bilinear with antialiasing, as PIL's (the reference loader's) bilinear is. Without
    antialiasing DALI samples only the 2x2 nearest source pixels when it shrinks, and aliases
    exactly the high frequencies SimMIM regresses: mean 1.9 uint8 levels from the reference on the
    same crop box, p99 15, max 69 (sample set, 192 px); with it, mean 0.15, p99 1
    (tests/test_pixels.py)."""
    from nvidia.dali import fn, types

    return fn.resize(images, device=device, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                     antialias=True)


def resize_views(crops, geometry: np.ndarray, size: int, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, dtype: torch.dtype = torch.float32,
                 channels: int = 3) -> torch.Tensor:
    """The views of decoded crops, resized on the CPU by torch: each crop (uint8 (h, w, C), C = `channels`, a numpy
    array or anything `np.asarray` reads without a copy, such as a DALI TensorCPU) resized to
    (out_h, out_w) by bilinear interpolation with antialiasing (torch's uint8 kernel on a
    channels-last view, the one torchvision's `resize` uses: Pillow's filter, within 1 uint8
    level), the size x size window at (top, left) taken, and flipped left-right when `flip`.

    geometry: int (B, 5) rows of (out_h, out_w, top, left, flip); the training view is
    (size, size, 0, 0, flip), the evaluation view (resized_h, resized_w, top, left, 0)
    (`augment.eval_geometry`). Returns uint8 (B, C, size, size), contiguous; with `mean` and
    `std`, `augment.normalize`'s result instead, in `dtype`, each view normalised while it is in
    the cache (one pass over the batch fewer)."""
    out = torch.empty((len(geometry), channels, size, size), dtype=torch.uint8 if mean is None else dtype)
    if mean is not None:  # augment.normalize's (x / 255 - mean) / std as one multiply-add
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(-1, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DALI's output buffers are read-only: only read here
        for i, (h, w, top, left, flip) in enumerate(np.asarray(geometry).tolist()):
            crop = torch.from_numpy(np.asarray(crops[i])).permute(2, 0, 1)[None]  # (1, C, h0, w0) channels-last
            view = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", antialias=True,
                                                   align_corners=False)[0, :, top:top + size, left:left + size]
            view = view.flip(-1) if flip else view
            if mean is None:
                out[i] = view
            else:
                torch.addcmul(shift, view, scale, out=out[i])
    return out


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op threads set to one for the block, then put back. For the loader's own
    torch work on the CPU while DALI's threads decode beside it: a crop is too small to split, and
    idle OpenMP threads spin for their share (measured on 2 cores: the resize cost 15x its
    single-thread CPU time, the batch's normalisation ~0.5 ms an image)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batch_views(idx: np.ndarray, wh: np.ndarray, epoch: int, aug: Augmentation, seed: int, train: bool,
                crop_ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source's (start, shape, geometry) for samples `idx` (int64 (n,), their index in the data
    set) of sizes `wh` (int64 (n, 2): width, height in pixels) in `epoch`: float32 (n, 2) box
    start (x, y) and shape (w, h), int32 (n, 5) geometry (out_h, out_w, top, left, flip). Training
    view: the box and flip of `augment.sample_views` of (seed, epoch, index), resized to size x
    size; evaluation view: the whole image, resized and centre-cropped by `augment.eval_geometry`."""
    n, s = len(idx), aug.size
    geometry = np.zeros((n, 5), np.int32)
    if train:
        v = sample_views(wh[:, 0], wh[:, 1], idx, aug, seed, epoch)  # (left, top, w, h, flip)
        geometry[:, 0], geometry[:, 1], geometry[:, 4] = s, s, v[:, 4]
        return v[:, :2].astype(np.float32), v[:, 2:4].astype(np.float32), geometry
    g = np.array([eval_geometry(w, h, s, crop_ratio) for w, h in wh.tolist()], np.int32).reshape(-1, 4)
    geometry[:, :4] = g[:, [1, 0, 3, 2]]  # (rw, rh, left, top) -> (out_h, out_w, top, left)
    return np.zeros((n, 2), np.float32), wh.astype(np.float32), geometry


def header_size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) of the image whose file bytes are `data`, from its header (PIL's lazy open:
    nothing is decoded). As stored: the EXIF orientation is not applied (decode.py)."""
    with warnings.catch_warnings():
        # the scan held the image to data.max_pixels; PIL would warn between its limit and twice it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data.tobytes())) as img:
            return img.size


class CropBatches:
    """The batches of a pipeline that ends with the decoded crops (`DALILoader.resize_in_torch`),
    as DALIGenericIterator hands out uniform ones: `next()` gives [{"images", "labels": int32
    (B, 1)}] and raises StopIteration at the epoch's end; `reset()` starts the next epoch (DALI's
    scheduling calls, in DALIGenericIterator's order). The images are `resize_views` of the crops
    (read from DALI's buffers before they are released), uint8 (B, 3, S, S), or normalised when
    `normalize` gives (mean, std, dtype) (training on the CPU: on one thread with the resize)."""

    def __init__(self, pipe, size: int, normalize: tuple = (), channels: int = 3):
        self.pipe, self.size, self.normalize, self.channels = pipe, size, normalize, channels
        pipe.schedule_run()

    def __next__(self):
        crops, labels, geometry = self.pipe.share_outputs()
        try:
            with one_torch_thread():
                images = resize_views(crops, geometry.as_array(), self.size, *self.normalize, channels=self.channels)
            labels = torch.from_numpy(labels.as_array())
        finally:
            self.pipe.release_outputs()
        self.pipe.schedule_run()
        return [{"images": images, "labels": labels}]

    def reset(self) -> None:
        self.pipe.reset()
        if self.pipe.empty():
            self.pipe.schedule_run()


class DALIGraph:
    """A loader's DALI pipeline (module docstring), configured from the spec: `spec.dali` holds the
    speed knobs: `device` (auto | mixed | cpu), `hw_decoder_load` (share of JPEGs for the hardware
    decoder), `prefetch` (batches queued ahead), `threads` (CPU threads; 0: spec.num_workers),
    `preallocate` (bytes per image preallocated for nvJPEG's host and device buffers; 0: DALI's
    default); the attribute `preallocate_hw` (width, height) hints the hardware decoder's buffer
    size. `train`: the training view (else the evaluation view); `rank`, `seed`: the pipeline's
    own seed's keys. DatasetError (one line) for a device the machine cannot give."""

    preallocate_hw: tuple[int, int] = (0, 0)

    def __init__(self, spec: LoaderSpec, device: torch.device, train: bool, rank: int = 0, seed: int = 0):
        o = spec.dali
        if o.device not in DEVICES:
            raise DatasetError(f"data.dali.device must be one of {', '.join(DEVICES)}, got '{o.device}'")
        if o.device == "mixed" and device.type != "cuda":
            raise DatasetError("data.dali.device mixed decodes on the GPU, but training runs on the CPU")
        self.aug, self.dtype, self.channels, self.batch_size = spec.aug, spec.dtype, spec.channels, spec.batch_size
        self.device, self.train, self.rank, self.seed = device, train, rank, seed
        self.threads = max(1, o.threads or spec.num_workers)
        self.hw_decoder_load, self.prefetch, self.preallocate = o.hw_decoder_load, max(1, o.prefetch), o.preallocate
        self.decode = "cpu" if o.device == "cpu" or device.type != "cuda" else "mixed"
        self.device_id = (device.index or 0) if device.type == "cuda" else None
        # parsed here: an error while DALI traces the graph would lose its one-line form
        self.rand_augment = parse_rand_augment(spec.rand_augment) if train and spec.rand_augment else None

    @property
    def resize_in_torch(self) -> bool:
        """Whether the view is resized by torch after DALI decodes it (`resize_views`): on the
        CPU, unless an augmentation must run in the graph on the resized crop (RandAugment)."""
        return self.decode == "cpu" and self.rand_augment is None

    def graph_augment(self, images):
        """Hook for an augmentation of the training view inside the DALI graph: `images` are the
        resized crops, uint8 HWC on the pipeline's device ('gpu' with mixed decoding, else 'cpu');
        returns the same: DALI's RandAugment when `spec.rand_augment` is set, else unchanged."""
        if self.rand_augment is None:
            return images
        return dali_rand_augment(images, self.rand_augment, (self.aug.size, self.aug.size),
                                 tuple(round(255 * m) for m in self.aug.mean))

    def decoder_options(self) -> dict:
        """Arguments of the JPEG decoder: the device, RGB (GRAY for data.channels=1), our decode
        rules and the GPU knobs."""
        from nvidia.dali import types

        output = types.GRAY if self.channels == 1 else types.RGB
        opts = {"device": self.decode, "output_type": output, **DALI_DECODE_ARGS}
        if self.decode == "mixed":
            opts["hw_decoder_load"] = self.hw_decoder_load
            if self.preallocate:
                opts["device_memory_padding"] = self.preallocate
                opts["host_memory_padding"] = self.preallocate
            if self.preallocate_hw[0]:
                opts["preallocate_width_hint"], opts["preallocate_height_hint"] = self.preallocate_hw
        return opts

    def pipeline(self, source, epoch: int, start_batch: int, py_workers: int = 0):
        """The (unbuilt) pipeline over `source`, DALI's per-batch callback (`batch_info=True`)
        returning the five outputs of the module docstring; with `py_workers` > 0 it runs in
        that many DALI worker processes (parallel external source: it must pickle), else in this
        process as DALI schedules batches. The pipeline's seed, which only `graph_augment`'s
        operators draw from, is keyed by (seed, epoch, rank, start_batch) of the epoch it is
        built at. Outputs: the crops, labels and geometry when `resize_in_torch`, else the
        views (`graph_view`) and labels."""
        from nvidia.dali import fn, pipeline_def, types

        decoder_opts = self.decoder_options()
        workers = {"py_num_workers": py_workers,
                   "py_start_method": "spawn" if self.device.type == "cuda" else "fork"} if py_workers else {}

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, prefetch_queue_depth=self.prefetch,
                      device_id=self.device_id,
                      seed=derive_seed("dali", self.seed, epoch, self.rank, start_batch, bits=31),
                      exec_dynamic=True, enable_conditionals=self.rand_augment is not None,  # auto_aug picks ops per sample
                      **workers)
        def pipe():
            # in workers: one batch per worker call, so as many batches ahead as workers keep them all busy
            parallel = {"parallel": True, "prefetch_queue_depth": max(2, py_workers)} if py_workers else {}
            jpegs, label, start, shape, geometry = fn.external_source(
                source=source, num_outputs=5, batch=True, batch_info=True, **parallel,
                dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32])
            images = fn.decoders.image_slice(jpegs, start, shape, axis_names="WH", normalized_anchor=False,
                                             normalized_shape=False, **decoder_opts)
            if self.resize_in_torch:  # the crops as decoded: `CropBatches` resizes them
                return images, label, geometry
            images = self.graph_view(images, geometry)
            return images, (label.gpu() if self.decode == "mixed" else label)

        return pipe()

    def graph_view(self, images, geometry):
        """The view resized, augmented, flipped and normalised inside the DALI graph (the GPU
        path): `images` the decoded regions, `geometry` the source's (out_h, out_w, top, left,
        flip) rows. Returns CHW float (float16 for that dtype; DALI has no bf16: the base casts)."""
        from nvidia.dali import fn, types

        a, size, ops = self.aug, self.aug.size, "gpu" if self.decode == "mixed" else "cpu"
        out_dtype = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT}[self.dtype]
        if self.train:
            images, mirror = self.graph_augment(resize_square(images, size, ops)), geometry[4]
        else:  # the evaluation view (`augment.eval_geometry`): resize to the source's size, crop there
            images = fn.resize(images, device=ops, size=fn.cast(geometry[0:2], dtype=types.FLOAT),
                               interp_type=types.INTERP_LINEAR, antialias=True)
            images, mirror = fn.slice(images, start=geometry[2:4], shape=[size, size], axis_names="HW", device=ops), 0
        return fn.crop_mirror_normalize(images, device=ops, dtype=out_dtype, output_layout="CHW",
                                        mean=[255 * m for m in a.mean], std=[255 * s for s in a.std], mirror=mirror)

    def iterator(self, pipe):
        """The batches of the built `pipe` as [{"images", "labels"}] per `next()` (DALI's
        framework-iterator form; `reset()` starts the next epoch): `CropBatches` when
        `resize_in_torch` (normalised there on a CPU; uint8 for the base to normalise on a GPU,
        a quarter of the bytes to copy), else DALI's own iterator over the graph's views."""
        if self.resize_in_torch:
            norm = (self.aug.mean, self.aug.std, self.dtype) if self.device.type == "cpu" else ()
            return CropBatches(pipe, self.aug.size, norm, self.channels)
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        return DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)


def dali_batches(iterator, count: int, explain, guard=contextlib.nullcontext):
    """Up to `count` batches (images, labels) of a DALI framework iterator (`DALIGraph.iterator`):
    images normalised float (DALI has no bf16: the base casts), or uint8 (B, C, S, S) from
    `CropBatches` on a GPU (the base normalises them there); labels int32 (B, 1). Ends early at the
    iterator's StopIteration. DALI's error at the k-th batch (names no file) is replaced by
    `explain(k)`'s one-line exception, or re-raised when that is None (an internal bug keeps its
    traceback); `guard()` is entered around each wait (a watchdog for the source's workers)."""
    for k in range(count):
        try:
            with guard():
                out = next(iterator)
        except StopIteration:
            return
        except Exception:  # noqa: BLE001 - DALI's error, or the source's: explained, or re-raised
            error = explain(k)
            if error is None:
                raise
            raise error from None
        yield out[0]["images"], out[0]["labels"]


def dali_decodes(data: np.ndarray) -> bool:
    """Whether DALI's CPU decoder, with our decode arguments, reads the encoded image `data`
    (uint8 (n,), a file's bytes)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def one():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, **DALI_DECODE_ARGS)

    try:
        p = one()
        p.build()
        p.feed_input("encoded", [data])
        p.run()
        return True
    except Exception:  # noqa: BLE001 - any DALI error: it does not decode
        return False
