"""`data.backend: ffcv`: SimMIM batches from an FFCV `.beton` (`simmim convert`).

The augmentation runs in FFCV's compiled pipeline: decode, crop, resize of the crop by Pillow's
antialiased bilinear filter (as the reference loader does, not FFCV's INTER_AREA) and flip in one
decoder (`view_decoder`), uint8 to torch and to the device; on a GPU the
normalisation to float/bf16 happens in torch on the device (`augment.normalize`; FFCV's own GPU
normaliser needs cupy), on the CPU in FFCV's pipeline threads. Fine-tuning's RandAugment
(`spec.rand_augment`, training view) runs on the uint8 batch on the training device before the
normalisation (`device_transform`: `rand_augment.BatchRandAugment`, keyed by (seed, epoch, batch, rank)).
Masks, batch assembly and the figure preview are the base's (`loader.Loader`).
Grey runs (data.channels=1): the .beton stores RGB (`simmim convert`), the view is decoded and
resized as RGB, then turned into one channel on the device by PIL's luma rule (`channels.luma`):
a grey source has R = G = B, so its view is the torch backend's exactly (raw .beton); a colour
source is resized before, not after, the conversion (within a level of the torch backend).

Sample order is ours, not FFCV's (`ShardedOrder`, on `sharding.ShardedSampler`):
- `random`: the reference loader's permutation of (seed, epoch), rank r taking positions
  r, r + world_size, ...: the same global batches as the reference loader at any world size.
- `quasi_random`: for datasets larger than RAM (`os_cache: false`), a page-local order that works
  with several ranks, which FFCV's own QUASI_RANDOM refuses: see `ShardedOrder`.
Both drop the remainder so every rank runs the same number of full batches, honour a mid-epoch
start (resume) and are reseeded per epoch.

The crop box and flip are the reference loader's draw (`augment.sample_views`: per sample from
`derive_seed("sample", seed, epoch, index)`, on the image size stored in the .beton), computed in
Python for the epoch's samples (11.4 us a sample on a loaded 2-core machine, most of it Python's
`random.Random` seeding: 1.8 s per rank for ImageNet on 8 ranks, 15 s on one) and read by the
compiled decoder from the .beton's metadata, which `ViewTable` extends with them. Epoch e + 1's
views are drawn on a daemon thread while epoch e trains, into a second table (`views_ahead`), so
its start only swaps the tables (0.03 ms for 100k samples, against ~1 s drawn there); the first
epoch, a mid-epoch resume and a jump draw theirs at the start. So a resumed epoch gives the
uninterrupted epoch's batches bit for bit, whatever the thread count, and FFCV crops the reference
loader's boxes wherever the .beton holds images at their file's size (a `simmim convert
--max-resolution` that shrinks an image changes the size the box is drawn on).
The evaluation view is torchvision's Resize + CenterCrop (`augment.eval_geometry`), also through
`ViewTable`.

Leaving an epoch early (a benchmark, a preemption) stops FFCV's producer thread and releases its
batch memory (`close_epoch`); a producer that dies raises here instead of hanging.
"""
from __future__ import annotations

import copy
import weakref

import numpy as np
import torch
from PIL import Image

from simmim.core.errors import DatasetError
from simmim.core.seeding import derive_seed

from .augment import Augmentation, eval_geometry, sample_views
from .channels import luma
from .convert import open_beton
from .ffcv_compat import close_epoch, install_order, keep_torch_threads, next_batch, quiet_numba_finalizer, read_image
from .folder import read_classes
from .views import center_crop, to_tensor
from .loader import Loader
from .masking import MaskGenerator
from .options import ORDERS, LoaderSpec
from .rand_augment import BatchRandAugment
from .sharding import ShardedSampler, shard_size
from .views_ahead import ViewsAhead


def page_of_samples(reader) -> np.ndarray:
    """For each sample, the page (of `reader.page_size` bytes) that holds its first byte."""
    table = reader.alloc_table
    first = np.full(reader.num_samples, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.minimum.at(first, table["sample_id"].astype(np.int64), table["ptr"])
    return (first // np.uint64(reader.page_size)).astype(np.int64)


class ShardedOrder:
    """This rank's samples for one epoch (see the module docstring), from batch `start` on.

    quasi_random: pages are shuffled per (seed, epoch) and laid end to end; the stream is cut into
    `world_size` contiguous blocks of `size // world_size` samples, one per rank, so ranks read disjoint
    pages (a page that straddles two blocks is shared by those two ranks only), every sample is
    read once per epoch across ranks (less the remainder, which moves with the shuffle), and a
    rank's block is shuffled within windows of `buffer_pages` consecutive pages, so at most that
    many pages need to be in memory at a time.
    """

    def __init__(self, size: int, rank: int, world_size: int, seed: int, mode: str = "random",
                 pages: np.ndarray | None = None, buffer_pages: int = 8, drop_last: bool = True):
        if mode not in ORDERS:
            raise DatasetError(f"data.ffcv.order must be one of {', '.join(ORDERS)}, got '{mode}'")
        self.drop_last = drop_last or mode == "quasi_random"
        if size < world_size and self.drop_last:  # as ShardedSampler: evaluation may leave a rank empty
            raise DatasetError(f"dataset of {size} images is smaller than the {world_size} ranks sharing it")
        self.size, self.rank, self.world_size, self.seed, self.mode = size, rank, world_size, seed, mode
        self.pages, self.buffer_pages, self.start = pages, max(1, buffer_pages), 0
        if mode == "quasi_random" and pages is None:
            raise ValueError("quasi_random needs the page of every sample")

    def __len__(self) -> int:
        return shard_size(self.size, self.rank, self.world_size, self.drop_last)

    def sample_order(self, epoch: int) -> np.ndarray:
        if self.mode == "quasi_random":
            order = self.quasi_random(epoch)
        else:
            sampler = ShardedSampler(self.size, self.rank, self.world_size, self.seed, self.mode == "random",
                                     self.drop_last)
            sampler.set_epoch(epoch)
            order = sampler.indices()
        return order[self.start:].astype(np.uint64)

    def ahead(self, epoch: int, start: int) -> np.ndarray:
        """`sample_order(epoch)` from position `start`, without touching `self.start` (FFCV's): for
        `ViewsAhead`'s thread. int64."""
        other = copy.copy(self)
        other.start = start
        return other.sample_order(epoch).astype(np.int64)

    def quasi_random(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(derive_seed("pages", self.seed, epoch))
        unique_pages = np.unique(self.pages)
        page_rank = np.empty(unique_pages.max() + 1, np.int64)
        page_rank[rng.permutation(unique_pages)] = np.arange(len(unique_pages))
        # stream: samples sorted by their page's shuffled position (page contents stay together)
        stream = np.lexsort((np.arange(self.size), page_rank[self.pages]))
        per_rank = self.size // self.world_size
        block = stream[self.rank * per_rank:(self.rank + 1) * per_rank]
        page_pos = page_rank[self.pages[block]]
        window = (page_pos - page_pos.min()) // self.buffer_pages
        key = rng.random(len(block))  # shuffle inside each window of buffer_pages pages
        return block[np.lexsort((key, window))]


VIEW_FIELDS = ("view_x", "view_y", "view_w", "view_h", "view_flip")


class ViewTable:
    """Each sample's view, where FFCV's compiled decoder can read it: `reader`'s metadata (FFCV
    passes it to the decoder on every batch) is replaced by a copy whose image field also holds
    int32 `VIEW_FIELDS` per sample: for the training view the crop box (x, y, w, h) and the flip
    (`fill`: `augment.sample_views` of the epoch's samples); for the evaluation view the resized
    size (w, h) and the crop's origin (x, y) in it (`fill_eval`: `augment.eval_geometry`)."""

    def __init__(self, reader):
        meta = reader.metadata
        self.field = f"f{reader.field_names.index('image')}"
        image = meta.dtype[self.field]
        image_view = np.dtype([(n, image.fields[n][0]) for n in image.names] + [(n, np.int32) for n in VIEW_FIELDS],
                              align=True)
        table = np.zeros(len(meta), np.dtype([(n, image_view if n == self.field else meta.dtype[n])
                                              for n in meta.dtype.names], align=True))
        for name in meta.dtype.names:
            if name == self.field:
                for sub in image.names:
                    table[name][sub] = meta[name][sub]
            else:
                table[name] = meta[name]
        self.table, self.images = table, table[self.field]
        self.install(reader)
        self.widths, self.heights = self.images["width"].astype(np.int64), self.images["height"].astype(np.int64)

    def install(self, reader) -> None:
        """Makes FFCV's epochs started from now on read this table (an epoch keeps the one it
        started with: `EpochIterator` takes `reader.metadata` when it is created)."""
        reader.metadata = self.table

    def spare(self) -> ViewTable:
        """A second table of the same samples, not installed: written while FFCV reads this one."""
        other = copy.copy(self)
        other.table = self.table.copy()
        other.images = other.table[self.field]
        return other

    def fill(self, indices: np.ndarray, aug: Augmentation, seed: int, epoch: int) -> None:
        """The training views of samples `indices` in `epoch`."""
        indices = np.asarray(indices, np.int64)
        views = sample_views(self.widths[indices], self.heights[indices], indices, aug, seed, epoch)
        for k, name in enumerate(VIEW_FIELDS):
            self.images[name][indices] = views[:, k]

    def fill_eval(self, size: int, crop_ratio: float) -> None:
        """The evaluation view of every sample."""
        geometry = np.array([eval_geometry(w, h, size, crop_ratio)
                             for w, h in zip(self.widths.tolist(), self.heights.tolist())], np.int32).reshape(-1, 4)
        for k, name in enumerate(("view_w", "view_h", "view_x", "view_y")):
            self.images[name] = geometry[:, k]


def view_decoder(size: int, train: bool):
    """FFCV's image decoder with the sample's view read from the metadata (`ViewTable`) and every
    resize done by Pillow's antialiased bilinear filter (`resample.resize_bilinear`), so FFCV's
    pixels follow the reference loader's (torchvision's): the remaining difference is turbojpeg's
    decode against Pillow's (tests/test_pixels.py).
    train: crop the box, resize it to size x size, flip (torchvision's RandomResizedCrop + flip;
    FFCV's own decoder draws the box with numba's generators and resizes with OpenCV's INTER_AREA);
    else: resize the whole image to the row's (w, h), crop size x size at its (x, y)
    (torchvision's Resize + CenterCrop; FFCV's own crops a fractional centre square first)."""
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.compiler import Compiler

    from .resample import flip_in_place, resize_bilinear  # numba (the ffcv extra)


    class ViewDecoder(ResizedCropRGBImageDecoder):
        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            side = size

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    x, y, w, h = field["view_x"], field["view_y"], field["view_w"], field["view_h"]
                    out = destination[dst_ix]
                    if train:
                        resize_bilinear(temp_buffer[y:y + h, x:x + w], out)
                        if field["view_flip"]:
                            flip_in_place(out)
                    else:
                        resized = np.empty((h, w, 3), np.uint8)
                        resize_bilinear(temp_buffer, resized)
                        out[:] = resized[y:y + side, x:x + side]
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

        def get_crop_generator(self):
            """FFCV declares it abstract; never called: `generate_code` above reads each sample's
            view from the metadata instead of generating a crop."""
            raise TypeError("ViewDecoder takes its crops from the ViewTable metadata, not a crop generator")

    return ViewDecoder((size, size))


class FFCVLoader(Loader):
    """`Loader` over an FFCV .beton: `spec.ffcv` sets the order, the page cache and the batches
    prepared ahead; `spec.num_workers` FFCV's pipeline threads."""

    def __init__(self, spec: LoaderSpec, masks: MaskGenerator | None, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        super().__init__(spec, masks, device, rank, world_size, seed)
        keep_torch_threads()  # before FFCV's first import: it sets torch's thread count
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader as FFCVPipeline, OrderOption
        from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

        o, aug = spec.ffcv, self.aug
        self.reader = open_beton(self.path)
        self.num_samples, self.classes = int(self.reader.num_samples), read_classes(self.path)
        order = o.order if self.train else "sequential"
        pages = page_of_samples(self.reader) if order == "quasi_random" else None
        self.order = ShardedOrder(self.num_samples, rank, world_size, seed, order, pages, o.buffer_pages, self.drop_last)
        self.require_one_batch()
        image = [view_decoder(aug.size, self.train)]  # the view: ViewTable's
        # On the CPU, FFCV's numba normaliser runs in the pipeline's threads, beside decoding, and
        # leaves the consumer free (~20% more images/sec on 2 cores). The batch is then FFCV's own
        # buffer, reused batches_ahead + 2 batches later: the trainer consumes it at once. A device
        # transform needs the uint8 images: then the base normalises.
        self.normalize_in_pipeline = (self.device.type == "cpu" and self.dtype in (torch.float32, torch.float16)
                                      and self.batch_transform is None and spec.channels == 3)
        if self.normalize_in_pipeline:
            image.append(NormalizeImage(255 * np.array(aug.mean), 255 * np.array(aug.std),
                                        np.float32 if self.dtype == torch.float32 else np.float16))
        image.append(ToTensor())
        if self.device.type != "cpu":
            image.append(ToDevice(self.device, non_blocking=True))
        image.append(ToTorchImage(channels_last=True))
        label = [IntDecoder(), ToTensor(), Squeeze()] if self.labels else None
        if self.labels and self.device.type != "cpu":
            label.append(ToDevice(self.device, non_blocking=True))
        self.loader = FFCVPipeline(self.path, batch_size=self.batch_size, num_workers=max(1, spec.num_workers),
                                   os_cache=o.os_cache, order=OrderOption.SEQUENTIAL, drop_last=self.drop_last,
                                   batches_ahead=o.batches_ahead, pipelines={"image": image, "label": label})
        install_order(self.loader, self.order)
        self.views = ViewTable(self.loader.reader)
        if not self.train:
            self.views.fill_eval(aug.size, spec.crop_ratio)
        # training: epoch e + 1's views drawn while e trains (the thread holds no reference to self)
        self.ahead = ViewsAhead((self.views, self.views.spare()), self.order.ahead, aug, seed) if self.train else None
        self.finalizer = weakref.finalize(self, self.ahead.close) if self.ahead is not None else None
        quiet_numba_finalizer()  # collecting this loader later makes numba print a harmless KeyError

    def device_transform(self):
        """Fine-tuning's RandAugment on the uint8 training batch, batched on the device."""
        if not self.spec.rand_augment:
            return None
        return BatchRandAugment(self.spec.rand_augment, tuple(round(255 * m) for m in self.aug.mean))

    def shard_samples(self) -> int:
        return len(self.order)  # quasi_random drops the remainder even for drop_last=False

    def read_batches(self):
        self.order.start = self.start_batch * self.batch_size
        self.loader.next_epoch = self.epoch
        if self.train:
            self.views = self.ahead.activate(self.epoch, self.order.start)
            self.views.install(self.loader.reader)
        epoch = iter(self.loader)
        if self.train:
            self.ahead.prepare(self.epoch + 1)
        try:
            for _ in range(self.start_batch, len(self)):
                out = next_batch(epoch)
                if out is None:
                    break
                yield luma(out[0]) if self.spec.channels == 1 else out[0], out[1] if self.labels else None
        finally:
            close_epoch(epoch)

    def close(self) -> None:
        """Stops the thread drawing the next epoch's views (~0.1 s; also run when the loader is
        collected). An epoch started afterwards draws its views itself."""
        if self.finalizer is not None:
            self.finalizer()

    def preview_images(self, indices: list[int]) -> list[torch.Tensor]:
        """The evaluation view of the stored images (`simmim convert` checked they decode); grey
        (data.channels=1): of their luma, as the torch backend's view of a grey file, (1, S, S)."""
        views = []
        for i in indices:
            img = Image.fromarray(read_image(self.path, self.reader, i))
            if self.spec.channels == 1:
                views.append(to_tensor(center_crop(img.convert("L").convert("RGB"), self.aug.size,
                                                   self.spec.crop_ratio))[:1])
            else:
                views.append(to_tensor(center_crop(img, self.aug.size, self.spec.crop_ratio)))
        return views
