"""`data.backend: stream`: training from MosaicML streaming shards (`simmim shard`), in a local
folder or an object store (`data.path: s3://bucket/prefix`), for multi-node runs without a shared
file system.

Why MosaicML streaming (docs/data.md has the comparison): its epoch order is a function of (shuffle
seed, epoch, `num_canonical_nodes`), the same for any number of nodes, ranks and DataLoader workers;
it resumes mid-epoch from a sample count; its per-node cache is bounded (`cache_limit`, least
recently used shards evicted); it reads shard by shard (py1e & co. shuffle within blocks of shards).

What this loader adds on top (the contract of `loader.Loader`):
- The training view and the masks of every other backend: each sample's crop and flip are keyed by
  its index in the data set (stored in the shard), decoded and resized by the torch backend's code
  in the DataLoader workers on the CPU (`stream_dataset.StreamShards`): the same pixels as the torch
  backend for the same sample and epoch. Masks are the base's `GlobalBatchMasks`, by the position
  of a sample in the step's global batch (streaming's layout of ranks in a batch, `mask_slot`).
  With `data.stream.decode: dali` (`auto` on a GPU) the workers hand over the stored files instead
  and DALI decodes the same boxes (`stream_dali.py`; the pixels differ only by the JPEG decoder).
- Resume: `set_epoch(epoch, start_batch)` becomes streaming's resume state (epoch, sample
  start_batch x batch_size x world_size), written before every epoch, so a resume on another number
  of ranks or workers continues the same global sample sequence (global batch kept by the trainer).
- Evaluation (`spec.train` false): every sample once, rank r taking indices r, r + world_size, ...
  (`sharding.ShardedSampler`, as the torch backend), read by index from the shards.
- A shard that is missing or unreadable ends the epoch with a one-line `ShardError` naming it (the
  trainer saves the steps before it).
"""
from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os

import torch

from .decode import checked_max_pixels, decode_rgb_bytes
from simmim.core.errors import ConfigError, ShardError
from .views import center_crop, compiled_resize, to_tensor
from .loader import Loader
from .masking import MaskGenerator
from .options import LoaderSpec, byte_size
from .reference import WorkerCollate, ignore_stop_signals, pil_transform
from simmim.core.seeding import derive_seed, torch_generator
from .sharding import ShardedSampler


PREFETCH = 4  # batches each DataLoader worker may hold ready


def human_bytes(n: int) -> str:
    """`n` bytes rounded up to a size `byte_size` reads back as at least `n` (e.g. '1.2mb')."""
    for k, unit in ((4, "tb"), (3, "gb"), (2, "mb"), (1, "kb")):
        if n >= 1024 ** k:
            return f"{math.ceil(n / 1024 ** k * 10) / 10:g}{unit}"
    return f"{n}b"


def streaming_world(rank: int, world_size: int) -> tuple[int, int]:
    """(nodes, ranks per node) as streaming sees the job: it reads WORLD_SIZE / LOCAL_WORLD_SIZE
    from the environment (torchrun sets them; a process started otherwise sets them itself)."""
    if world_size > 1 and os.environ.get("WORLD_SIZE") != str(world_size):
        raise RuntimeError(f"data.backend stream: rank {rank} of {world_size}, but WORLD_SIZE is "
                           f"{os.environ.get('WORLD_SIZE')} (streaming reads RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if world_size > 1 else 1
    return world_size // local, local


def mask_slot(rank: int, nodes: int, per_node: int) -> int:
    """The offset within each global batch of rank `rank`'s samples (j-th at slot + world_size * j):
    streaming deals the global sample sequence to nodes round robin, then each node's to its ranks
    round robin (`streaming.base.partition.orig`), so node n's local rank r holds n + nodes * r."""
    node, local = divmod(rank, per_node)
    return node + nodes * local


class StreamLoader(Loader):
    """`Loader` over `StreamShards` in a torch DataLoader (see the module docstring)."""

    decodes_in_workers = True  # False: the workers hand over the stored files (`stream_dali.StreamDALILoader`)

    def __init__(self, spec: LoaderSpec, masks: MaskGenerator | None, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        super().__init__(spec, masks, device, rank, world_size, seed)
        from .stream_dataset import IndexedShards, StreamShards, cache_dir, read_meta  # the stream extra

        self.max_pixels = checked_max_pixels(spec.max_pixels)
        logging.getLogger("streaming").setLevel(logging.WARNING)  # its INFO lines restate defaults it picked
        o = spec.stream
        self.nodes, self.per_node = streaming_world(rank, world_size)
        if self.train and max(self.nodes, o.canonical_nodes) % min(self.nodes, o.canonical_nodes):
            raise ConfigError(f"data.stream.canonical_nodes={o.canonical_nodes} and the {self.nodes} nodes of this "
                              f"job: one must divide the other; set data.stream.canonical_nodes to a multiple of "
                              f"{self.nodes} (it fixes the order: keep it for the whole run)")
        self.meta, local = read_meta(self.path, cache_dir(self.path, o.cache_dir))
        self.num_samples, self.classes = int(self.meta["samples"]), list(self.meta["classes"])
        self.canonical_nodes = o.canonical_nodes
        self.shared_epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        remote = self.path if local is not None else None  # an object store: cached on this node; else read in place
        if self.train and byte_size(o.cache_limit):
            self.check_cache(o, local or self.path, spec.num_workers)
        self.shards = StreamShards(
            aug=self.aug, seed=seed, train=self.train, crop_ratio=spec.crop_ratio, transform=pil_transform(spec),
            max_pixels=self.max_pixels, epoch=self.shared_epoch, encoded=not self.decodes_in_workers,
            remote=remote, local=local or self.path,
            batch_size=self.batch_size, shuffle=self.train, shuffle_algo=o.shuffle_algo,
            shuffle_seed=derive_seed("order", seed, bits=31), shuffle_block_size=o.shuffle_block_size or None,
            num_canonical_nodes=o.canonical_nodes, partition_algo="orig", predownload=o.predownload or None,
            cache_limit=byte_size(o.cache_limit) or None)
        self.samples = None  # no image files: the preview reads the shards (`preview_images`)
        self.require_one_batch()
        if self.train and spec.num_workers > 0 and self.decodes_in_workers:
            compiled_resize()  # compiled here once: the forked workers inherit it
        self.loader = self.data_loader(self.shards if self.train else IndexedShards(self.shards), spec.num_workers)

    def check_cache(self, o, folder: str, workers: int) -> None:
        """ConfigError (one line) for a `data.stream.cache_limit` below the shards this node can
        need at once (`stream_dataset.shards_in_use`), plus the index streaming keeps beside them:
        a cache that small can evict a shard a worker still waits for, and streaming then waits
        forever (docs/data.md). At least 4 shards, streaming's own floor."""
        from .shards import INDEX
        from .stream_dataset import default_block_size, shard_bytes, shards_in_use

        with open(os.path.join(folder, INDEX)) as f:
            index = json.load(f)
        block = o.shuffle_block_size or default_block_size(o.canonical_nodes)
        pre = o.predownload or 8 * self.batch_size  # streaming's default
        need = max(4, shards_in_use(index, canonical_nodes=o.canonical_nodes, nodes=self.nodes,
                                    ranks_per_node=self.per_node, workers=workers, batch_size=self.batch_size,
                                    predownload=pre, block_size=block,
                                    shuffle_algo=o.shuffle_algo, prefetch=PREFETCH))
        floor = need * max(shard_bytes(s) for s in index["shards"]) + os.path.getsize(os.path.join(folder, INDEX))
        if byte_size(o.cache_limit) < floor:
            raise ConfigError(
                f"data.stream.cache_limit={o.cache_limit} is too small for {self.path}: this node can need {need} "
                f"shards at once (shuffle blocks of {block} samples, predownload {pre}, {self.per_node} rank(s) x "
                f"{max(1, workers)} worker(s)), and streaming stalls when it evicts one still in use; raise it to at "
                f"least {human_bytes(floor)}, or lower data.stream.shuffle_block_size (or data.stream.predownload)")

    def data_loader(self, dataset, workers: int) -> torch.utils.data.DataLoader:
        sampler = None if self.train else ShardedSampler(self.num_samples, self.rank, self.world_size, self.seed,
                                                         shuffle=False, drop_last=self.drop_last)
        # set at interpreter exit, before multiprocessing ends the workers with SIGTERM: the one they obey
        self.exiting = torch.zeros(1, dtype=torch.uint8).share_memory_()
        atexit.register(self.exiting.fill_, 1)
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, sampler=None if sampler is None else _Indices(sampler),
            num_workers=workers, pin_memory=self.device.type == "cuda", drop_last=self.drop_last,
            generator=torch_generator("loader", self.seed, self.rank), persistent_workers=workers > 0,
            prefetch_factor=PREFETCH if workers > 0 else None,
            worker_init_fn=functools.partial(ignore_stop_signals, self.exiting),
            collate_fn=WorkerCollate(self.aug, self.dtype, workers > 0 and self.device.type == "cpu")
            if self.decodes_in_workers else list)  # EncodedSample's as they are

    def describe(self) -> str:
        return "stream (PIL decoding in the DataLoader workers)"

    def fingerprint(self) -> str:
        """The shard set's: its sample list's fingerprint, as `simmim shard` recorded it (the same
        as the torch backend's over the same checked list)."""
        return self.meta.get("fingerprint") or super().fingerprint()

    def epoch_masks(self):
        masks = super().epoch_masks()
        if masks is not None and self.train:
            masks.rank = mask_slot(self.rank, self.nodes, self.per_node)
        return masks

    def start_reading(self) -> int:
        """Points the shards (training) or the sampler (evaluation) at `self.epoch` from
        `self.start_batch` on; returns the batches this rank reads from there."""
        if self.train:
            self.shards.start(self.epoch, self.start_batch * self.batch_size * self.world_size, self.canonical_nodes)
        else:
            self.loader.sampler.sampler.set_epoch(self.epoch, self.start_batch * self.batch_size)
        return len(self) - self.start_batch

    def ended_early(self, got: int, wanted: int) -> ShardError:
        """The one-line error for an epoch whose shards gave `got` of its `wanted` batches."""
        return ShardError(f"the shards of {self.path} ended after {got} of {wanted} batches of this epoch "
                          f"(a shard missing or unreadable); write them again with `simmim shard`")

    def read_batches(self):
        wanted, got = self.start_reading(), 0
        if wanted <= 0:
            return
        for images, labels in self.loader:
            yield images, labels
            got += 1
            if got == wanted:  # streaming pads the last batches (repeats, short ones): the epoch's share ends here
                return
        raise self.ended_early(got, wanted)

    def preview_images(self, indices: list[int]) -> list[torch.Tensor]:
        """The evaluation view of the samples at `indices`, read from the shards in this process."""
        out = []
        for i in indices:
            img = self.shards.read(i)["image"]
            out.append(to_tensor(center_crop(decode_rgb_bytes(img, self.max_pixels), self.aug.size,
                                             self.spec.crop_ratio)))
        return out


class _Indices(torch.utils.data.Sampler):
    """A `ShardedSampler`'s indices alone (it yields (index, seed) pairs for the torch backend)."""

    def __init__(self, sampler: ShardedSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return iter(self.sampler.indices().tolist())
