"""The shards of `simmim shard` as a MosaicML `StreamingDataset` that yields training views:
what the stream backend's DataLoader workers run (pipeline/stream_loader.py holds the loader).

Each sample is decoded from its stored file bytes by the loaders' one decode rule
(`decode.decode_rgb_bytes`) and cropped by the torch backend's own code (`views.train_view`),
with its generator keyed by (seed, epoch, the sample's index in the data set), the index stored
in the shard: the same pixels as the torch backend for that sample and epoch, wherever the sample
sits in the shards or the epoch's order.

Streaming chooses the epoch's order (shuffle, partition over nodes, ranks and workers); the epoch
and the sample to start from are set by the loader before each epoch (`StreamShards.start`), so
the order is a function of (shuffle seed, epoch, canonical nodes), not of how the run got there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import threading
from typing import NamedTuple

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.dataset import _ShardState  # its shard states: a failed download's is reset
from streaming.base.storage.download import CloudDownloader

from .augment import Augmentation
from .dali_graph import header_size
from .decode import DecodeError, decode_rgb_bytes
from simmim.core.errors import DatasetError, ShardError
from .views import center_crop, to_tensor, train_view
from simmim.core.seeding import derive_seed
from .shards import INDEX, META, is_remote

log = logging.getLogger(__name__)


def cache_dir(path: str, configured: str = "") -> str | None:
    """The folder under which the shards of `path` are cached on this node (`read_meta` picks the
    set's own subfolder): `configured` if set, else <tmp>/simmim-stream-<uid>/<12 hex digits of the
    URL>; None for a local shard folder (read in place)."""
    if not is_remote(path):
        return None
    if configured:
        return configured
    digest = hashlib.sha1(path.rstrip("/").encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"simmim-stream-{os.getuid()}", digest)


def read_meta(path: str, cache: str | None) -> tuple[dict, str | None]:
    """(DEST/simmim.json of a complete shard set, the folder this node caches it in): samples,
    classes, fingerprint (`shards.py`). For an object store the index and metadata are downloaded
    afresh every time into `cache`/<12 hex digits of their bytes>, the folder streaming then caches
    the shards in: a set written again (`--overwrite`) gets a folder of its own, so shards of an
    older version are never read for it (streaming keeps any file it finds). A local set is read in
    place (folder None). DatasetError (one line) for a path that is not a complete set."""
    local = None
    if is_remote(path):
        local = _fetch_index(path, cache)
    elif not os.path.isfile(os.path.join(path, INDEX)) or not os.path.isfile(os.path.join(path, META)):
        raise DatasetError(f"data.path {path} is not a complete shard set (no {INDEX} or {META}; an interrupted "
                           f"`simmim shard` leaves none): write it with `simmim shard SRC {path}`")
    try:
        with open(os.path.join(local or path, META)) as f:
            meta = json.load(f)
        int(meta["samples"]), list(meta["classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: {META} is unreadable ({e}); write the shards again with `simmim shard`") from None
    return meta, local


def _fetch_index(url: str, cache: str) -> str:
    """The index and metadata of the set at `url` downloaded into cache/<digest of both> (returned)."""
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache, prefix=".fetch-")
    try:
        try:  # the index decides completeness: it is written last
            for name in (INDEX, META):
                CloudDownloader.direct_download(f"{url.rstrip('/')}/{name}", os.path.join(tmp, name))
        except Exception as e:  # noqa: BLE001 - no such prefix, bucket, endpoint or key: one line
            raise DatasetError(f"data.path {url} is not a complete shard set ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]}); write it with `simmim shard SRC {url}`") from None
        digest = hashlib.sha1()
        for name in (INDEX, META):
            with open(os.path.join(tmp, name), "rb") as f:
                digest.update(f.read())
        local = os.path.join(cache, digest.hexdigest()[:12])
        os.makedirs(local, exist_ok=True)
        for name in (INDEX, META):  # the same bytes if another rank of this node got there first
            os.replace(os.path.join(tmp, name), os.path.join(local, name))
        return local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_block_size(canonical_nodes: int) -> int:
    """Streaming's `shuffle_block_size` when none is given (`StreamingDataset._set_shuffle_block_size`)."""
    return max(4_000_000 // canonical_nodes, 1 << 18)


def shards_in_use(index: dict, *, canonical_nodes: int, nodes: int, ranks_per_node: int, workers: int,
                  batch_size: int, predownload: int, block_size: int, shuffle_algo: str, prefetch: int) -> int:
    """How many shards of the set (`index`: streaming's index.json) a node can need at once, from
    streaming 0.13.0's reading loop (`StreamingDataset._prepare_thread` / `_ready_thread` /
    `_each_sample_id`): each worker (DataLoader worker, or the rank itself with none) holds the shards
    of the samples between the one it yields and the one it downloads, at most `predownload` + 2
    samples of its sequence; if least-recently-used eviction drops one of them before the worker's
    ready thread sees it arrive, that thread waits forever (it never downloads it again).

    The bound is the smallest of three: every shard of the set; `predownload` + 2 shards per worker
    of the node; and the shards the node's stretch of the epoch order can draw on. That stretch
    (`partition/orig.py`: the order deals canonical rows round robin to nodes, ranks, then workers'
    batches) covers ranks_per_node x workers x batch_size x (batches per window + 1 + `prefetch`,
    the DataLoader's lead of one worker over another) positions, i.e. L positions of each of the
    node's max(1, canonical_nodes / nodes) rows; the `py1*`/`py2s` shuffles move a sample at most
    1.25 x `block_size` from its shard's place in the row (a block drawn in [0.75, 1.25] x the size),
    so a row's stretch draws on shards covering at most L + 2.5 x block_size samples, plus one
    partial shard at each end (`naive` shuffles the whole set: no such bound). Units: samples."""
    sizes = [int(shard["samples"]) for shard in index["shards"]]
    per_shard = max(sum(sizes) / len(sizes), 1.0)
    per_worker = max(1, workers)
    bound = min(len(sizes), ranks_per_node * per_worker * (predownload + 2))
    if shuffle_algo == "naive":
        return bound
    window = -(-(predownload + 2) // batch_size) + 1 + (prefetch if workers > 0 else 0)
    stretch = ranks_per_node * per_worker * batch_size * window
    row = -(-stretch * nodes // canonical_nodes)  # a node holds a share of a row when nodes > canonical_nodes
    row_shards = math.ceil(sum(sizes) / canonical_nodes / per_shard) + 2  # split shards at both ends
    per_row = min(math.ceil((row + 2.5 * block_size) / per_shard) + 2, row_shards)
    return min(bound, max(1, canonical_nodes // nodes) * per_row)


def shard_bytes(shard: dict) -> int:
    """The most a shard of streaming's index takes in the cache (its file, and its zip if compressed)."""
    return sum(int((shard.get(key) or {}).get("bytes", 0)) for key in ("raw_data", "zip_data"))


class StreamShards(StreamingDataset):
    """A `StreamingDataset` over `simmim shard`'s shards whose samples are (uint8 (3, S, S) view,
    label int): the training view (`train`) keyed by (seed, epoch, index), or the evaluation view
    (torchvision's Resize + CenterCrop, `views.center_crop`). `epoch`: an int64 (1,) tensor in
    shared memory that the loader sets before each epoch (DataLoader workers, persistent or not,
    read it when the epoch starts). The rest of `streaming` are StreamingDataset's own arguments.

    With `encoded`, a sample is instead its stored file for a decoder in the main process
    (`stream_dali.py`): `EncodedSample` (the bytes as uint8 (n,), label, index, (width, height)
    from the file's header), no pixel decoded here.

    A shard that cannot be read ends the epoch with a `ShardError` naming it; an image that does
    not decode (the shards hold checked files, so only a damaged shard) is replaced by the next
    sample, with a warning naming it, as the torch backend does (encoded: one whose header does
    not read)."""

    def __init__(self, *, aug: Augmentation, seed: int, train: bool, crop_ratio: float, transform, max_pixels: int,
                 epoch: torch.Tensor, encoded: bool = False, **streaming):
        self.aug, self.seed, self.train, self.crop_ratio, self.encoded = aug, seed, train, crop_ratio, encoded
        self.transform, self.max_pixels, self.shared_epoch, self.epoch = transform, max_pixels, epoch, 0
        self.where = streaming.get("remote") or streaming.get("local")
        self.failed: str | None = None
        # the shard a process of this loader failed on (-1: none), shared with the DataLoader workers
        self.shard_failed = torch.full((1,), -1, dtype=torch.int64).share_memory_()
        try:
            super().__init__(**streaming)
        except (OSError, ValueError, RuntimeError) as e:  # an index it cannot read, a cache it cannot use
            text = " ".join(str(e).split())
            if "cache limit" in text.lower() or "cache usage" in text.lower():
                largest = max(shard.get_max_size() for shard in self.shards) if getattr(self, "shards", None) else None
                raise DatasetError(f"data.stream.cache_limit={streaming.get('cache_limit')} bytes is too small for "
                                   f"{self.where}: streaming needs at least 4 shards"
                                   f"{f' (4 x {largest} bytes)' if largest else ''}; raise it") from None
            raise DatasetError(f"data.path {self.where}: {text[:300]}") from None

    def __iter__(self):
        self.epoch = int(self.shared_epoch[0])
        if getattr(self, "_event", None) is not None:
            self._event.clear()  # set by a failed epoch before: streaming would refuse every later one
        self.failed = None
        stop = threading.Event()
        threading.Thread(target=self.watch_failures, args=(stop,), daemon=True).start()
        try:
            yield from super().__iter__()
        finally:
            stop.set()
        if getattr(self, "_event", None) is not None and self._event.is_set():  # streaming's threads stopped
            raise ShardError(self.failed or f"a shard of {self.where} could not be read")

    def watch_failures(self, stop: threading.Event) -> None:
        """Until `stop`: ends this process's epoch (streaming's stop event) once another process of
        the loader has failed on a shard. Streaming leaves a shard that failed to download marked
        as being downloaded, and a worker whose samples wait on it would wait forever, while the
        DataLoader waits for that worker's batch, in order, before the failed worker's error."""
        while not stop.wait(0.05):
            shard = int(self.shard_failed[0])
            if shard >= 0 and getattr(self, "_event", None) is not None:
                self.failed = self.failed or self.shard_message(shard)
                self._event.set()
                return

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """StreamingDataset's download (or check) of a shard; a failure is kept, naming the shard,
        for the error that ends the epoch (streaming's own ends it silently in a background thread),
        told to the loader's other processes (`watch_failures`), and the shard marked as not
        downloaded again, so that a later epoch tries it anew (a run stops at this error; a later
        epoch of the same loader with workers can still wait: not relied on, not tested)."""
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:  # noqa: BLE001 - a missing object, a timeout, a damaged file: named below
            self.failed = self.shard_message(shard_id, e)
            self.shard_failed[0] = shard_id
            if self._shard_states[shard_id] == _ShardState.PREPARING:
                self._shard_states[shard_id] = _ShardState.REMOTE
            raise ShardError(self.failed) from None

    def on_exception(self, future) -> None:
        """StreamingDataset's callback for its download threads: stop the epoch (the error is
        raised, once, by `__iter__` or `read`), without its re-raise inside the callback, which
        only prints a second traceback."""
        if future.exception() is not None:
            self._event.set()

    def shard_message(self, shard_id: int, e: BaseException | None = None) -> str:
        name = self.shards[shard_id].file_pairs[0][0].basename
        local = self.streams[0].remote is None
        why = "in another worker" if e is None else " ".join(f"{type(e).__name__}: {e}".split())[:200]
        what = "is missing" if local and not os.path.exists(os.path.join(self.where, name)) else \
            f"cannot be read ({why})"
        return f"shard {name} of {self.where} {what}; write the set again with `simmim shard SRC {self.where} --overwrite`"

    def __getitem__(self, sample_id: int) -> tuple[torch.Tensor, int] | EncodedSample:
        for k in range(self.num_samples):
            i = (sample_id + k) % self.num_samples
            obj = self.read(i)
            label = int(obj.get("label", 0))
            try:
                if self.encoded:
                    return self.encoded_sample(obj, label)
                img = decode_rgb_bytes(obj["image"], self.max_pixels)
            except DecodeError as e:
                log.warning("skipping unreadable image %s (sample %d of %s: %s)", obj.get("path"), i, self.where, e)
                continue
            if not self.train:
                return to_tensor(center_crop(img, self.aug.size, self.crop_ratio)), label
            rng = random.Random(derive_seed("sample", self.seed, self.epoch, int(obj["index"])))
            return train_view(img, self.aug, rng, self.transform), label
        raise DatasetError(f"no image of {self.where} could be read")

    @staticmethod
    def encoded_sample(obj: dict, label: int) -> EncodedSample:
        """The stored sample `obj` as its file; DecodeError for a header PIL cannot read."""
        data = np.frombuffer(obj["image"], np.uint8)
        try:
            size = header_size(data)
        except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise DecodeError(f"no image header ({e})") from None
        return EncodedSample(data, label, int(obj["index"]), size, obj.get("path", ""))

    def read(self, sample_id: int) -> dict:
        """The stored sample (image bytes, index, path[, label]); ShardError naming its shard."""
        try:
            return self.get_item(sample_id)
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001 - streaming's RuntimeError after its retries, a damaged file
            raise ShardError(self.failed or self.shard_message(self.spanner[sample_id][0], e)) from None

    def start(self, epoch: int, sample_in_epoch: int, canonical_nodes: int) -> None:
        """The next iteration is epoch `epoch` from global sample `sample_in_epoch` on (a multiple
        of the global batch): streaming's resume state, set for every epoch so that the order never
        depends on the epochs this process happened to run. Called in the main process."""
        self.shared_epoch[0] = epoch
        self.shard_failed[0] = -1
        if self.next_epoch > epoch:  # an epoch run again (the validation loader's epoch 0)
            self.next_epoch = epoch
        self.load_state_dict({"epoch": epoch, "sample_in_epoch": sample_in_epoch, "num_canonical_nodes": canonical_nodes,
                              "shuffle_seed": self.shuffle_seed, "initial_physical_nodes": None})


class EncodedSample(NamedTuple):
    """A stored sample as its file: `data` uint8 (n,) the file's bytes, `label`, `index` (its
    place in the data set, which keys its training view), `size` (width, height) in pixels from
    the header (EXIF orientation not applied, as `decode.py` decodes), `path` as shard wrote it."""
    data: np.ndarray
    label: int
    index: int
    size: tuple[int, int]
    path: str


class IndexedShards(torch.utils.data.Dataset):
    """Map-style access to a `StreamShards` by sample index (the evaluation loader's sampler picks
    the indices, as the torch backend's does): every sample once, no padding."""

    def __init__(self, shards: StreamShards):
        self.shards = shards

    def __len__(self) -> int:
        return self.shards.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.shards[i]
