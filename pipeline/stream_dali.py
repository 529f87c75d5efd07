"""`data.backend: stream` decoded by DALI (`data.stream.decode: dali`, or `auto` on a GPU).

The stream loader's DataLoader workers read the shards as before (streaming's order, partition,
cache and resume: `stream_loader.py`), but hand over each sample's stored file with its index and
size (`stream_dataset.EncodedSample`: the bytes and a header read, nothing decoded). This process
draws the batch's boxes (`dali_graph.batch_views`, keyed by (seed, epoch, index): the crops and
flips of the torch backend and of the stream backend's PIL path) and gives them to the file
loader's DALI graph (`dali_graph.DALIGraph`: the box alone decoded, by nvJPEG and the hardware
decoder on a GPU, by DALI's threads on the CPU; resize, flip, normalisation) through a callback
DALI calls as it schedules batches (`ShardFeed`). So the views are the PIL path's but for the JPEG
decoder, whatever the number of workers, and a resumed epoch continues the same batches; masks are
the stream loader's (`mask_slot`). The `data.dali.*` knobs apply (device, threads, prefetch,
hw_decoder_load, preallocate).

Failures: a shard that cannot be read, or a stream that ends early, ends the epoch after the
batches before it with the stream loader's one-line `ShardError` (the trainer saves those steps); a
file DALI cannot decode is a one-line `DatasetError` naming it (found among the batches in flight:
PIL's decode rules first, then DALI's own decoder) and the command that writes the set again.
"""
from __future__ import annotations

import collections

import numpy as np
import torch

from simmim.core.errors import DatasetError

from .augment import Augmentation
from .dali_graph import DALIGraph, batch_views, dali_batches, dali_decodes
from .decode import DecodeError, decode_rgb_bytes
from .masking import MaskGenerator
from .options import LoaderSpec
from .stream_dataset import EncodedSample
from .stream_loader import StreamLoader


class ShardFeed:
    """DALI's per-batch callback (`batch_info=True`, run in this process as DALI schedules
    batches): batch `info.iteration` of the epoch given to `begin` is the next batch of
    `EncodedSample`s from the DataLoader, returned as the graph's five inputs: the files (n arrays
    of uint8), labels int32 (n, 1), the box start and shape float32 (n, 2) and the view's geometry
    int32 (n, 5) (`dali_graph.batch_views`). Past the epoch's `wanted` batches, after `stop()`, or
    when the DataLoader fails, it raises StopIteration (DALI ends the epoch there, after the
    batches already made); the DataLoader's exception is kept in `error`. The last `keep` batches
    fed stay in `recent` (to name a file DALI fails on)."""

    def __init__(self, aug: Augmentation, seed: int, train: bool, crop_ratio: float, keep: int):
        self.aug, self.seed, self.train, self.crop_ratio = aug, seed, train, crop_ratio
        self.recent: collections.deque[list[EncodedSample]] = collections.deque(maxlen=keep)
        self.batches, self.wanted, self.epoch, self.stopped = iter(()), 0, 0, False
        self.ended_early = None
        self.error: BaseException | None = None

    def begin(self, batches, wanted: int, epoch: int, ended_early) -> None:
        """The next DALI epoch reads `wanted` batches of `batches` (an iterable), views of `epoch`;
        `ended_early(got, wanted)` is the error when `batches` ends first."""
        self.batches, self.wanted, self.epoch, self.ended_early = iter(batches), wanted, epoch, ended_early
        self.stopped, self.error = False, None
        self.recent.clear()

    def stop(self) -> None:
        """No batch is fed after this one (the consumer left the epoch)."""
        self.stopped = True

    def release(self) -> None:
        """Drops the epoch's DataLoader iterator (the epoch is drained). DALI keeps this callback
        alive until its own exit handler, which runs after multiprocessing's has closed the queues
        to the workers: an iterator still held here then shut its workers down only by timing out
        on each (5 s a worker, at every exit). Dropped here, it goes with the loader."""
        self.stopped, self.batches, self.ended_early = True, iter(()), None  # both hold the loader

    def __call__(self, info):
        if self.stopped or info.iteration >= self.wanted:
            raise StopIteration
        try:
            samples = next(self.batches)
        except StopIteration:
            self.error = self.ended_early(info.iteration, self.wanted)
            raise
        except Exception as e:  # noqa: BLE001 - kept, traceback and all, for read_batches to raise
            self.error = e
            raise StopIteration from None
        self.recent.append(samples)
        idx = np.array([s.index for s in samples], np.int64)
        wh = np.array([s.size for s in samples], np.int64).reshape(-1, 2)
        labels = np.array([s.label for s in samples], np.int32)[:, None]
        return ([s.data for s in samples], labels,
                *batch_views(idx, wh, self.epoch, self.aug, self.seed, self.train, self.crop_ratio))


class StreamDALILoader(StreamLoader):
    """`StreamLoader` whose workers read the stored files and DALI decodes them (module docstring)."""

    decodes_in_workers = False

    def __init__(self, spec: LoaderSpec, masks: MaskGenerator | None, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        import nvidia.dali  # noqa: F401 - fail here, with the install hint from build_loader

        super().__init__(spec, masks, device, rank, world_size, seed)
        self.graph = DALIGraph(spec, self.device, self.train, rank, seed)
        self.feed = ShardFeed(self.aug, seed, self.train, spec.crop_ratio, keep=self.graph.prefetch + 2)
        self.pipe = self.iterator = None

    def describe(self) -> str:
        return f"stream (DALI decoding on the {'GPU' if self.graph.decode == 'mixed' else 'CPU'})"

    def start_epoch(self) -> None:
        """Builds the pipeline and its iterator at the first epoch (the first batches are fed as
        the iterator is made), else resets them for the next."""
        if self.iterator is not None:
            self.iterator.reset()
            return
        self.pipe = self.graph.pipeline(self.feed, self.epoch, self.start_batch)
        self.pipe.build()
        self.iterator = self.graph.iterator(self.pipe)

    def read_batches(self):
        wanted = self.start_reading()
        if wanted <= 0:
            return
        self.feed.begin(self.loader, wanted, self.epoch, self.ended_early)
        finished = False
        try:
            self.start_epoch()
            yield from dali_batches(self.iterator, wanted, lambda k: self.decode_failure())
            finished = True
        finally:
            self.end_epoch(finished)
        if self.feed.error is not None:
            raise self.feed.error

    def end_epoch(self, finished: bool) -> None:
        """Drains the batches still in flight (none are fed once `feed.stop`); a pipeline that
        failed is dropped and built again at the next epoch."""
        if not finished:
            self.feed.stop()
        try:  # next(), not a for loop: iter() on a DALI iterator resets it
            while True:
                next(self.iterator)
        except StopIteration:
            pass
        except Exception:  # noqa: BLE001 - the pipeline failed (raised above): rebuild it next epoch
            self.pipe = self.iterator = None
        finally:
            self.feed.release()

    def decode_failure(self) -> DatasetError | None:
        """A one-line DatasetError naming a file of the batches in flight that PIL's decode rules
        refuse or DALI cannot decode; None when every one decodes (the failure is not the data's)."""
        samples = [s for batch in self.feed.recent for s in batch]
        bad = []
        for s in samples:
            try:
                decode_rgb_bytes(s.data.tobytes(), self.max_pixels)
            except DecodeError as e:
                bad.append((s.path, str(e)))
        if not bad:
            bad = [(s.path, "DALI cannot decode it") for s in samples if not dali_decodes(s.data)]
        if not bad:
            return None
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return DatasetError(f"cannot decode {bad[0][0]!r} ({bad[0][1]}){more} from the shards of {self.path} "
                            f"(epoch {self.epoch}); write the set again with `simmim shard SRC {self.path} --overwrite`")
