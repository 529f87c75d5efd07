"""The data pipeline's own options: the `data` section of a run config, and the frozen `LoaderSpec`
a loader is built from.

`DataConfig` is what a user sets (YAML `data:` / `data.x=y` overrides, filled by OmegaConf in
`trainer/config.py`); the backend-only options sit in their own sub-sections, `data.ffcv.*` and
`data.dali.*`, `data.stream.*`, so one recipe can switch `data.backend` and every key has one owner. A task (pre-training,
fine-tuning, evaluation) turns it into a `LoaderSpec` with what it alone knows (training or evaluation
view, labels, the per-image transform) via `LoaderSpec.from_config`.

Each options class states its ranges in `rules()` (field -> (test, what the value must be)), beside
the fields, in the vocabulary of core/rules.py; `trainer/validate.py` walks a whole config and checks
every section by its own rules.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from simmim.core.errors import ConfigError
from simmim.core.rules import NON_NEGATIVE, OPEN_UNIT, POSITIVE, UNIT, Rule, one_of

from .augment import Augmentation
from .decode import MAX_PIXELS
from .masking import MASK_STRATEGIES

BACKENDS = ("torch", "ffcv", "dali", "stream")  # data.backend
ORDERS = ("random", "quasi_random", "sequential")  # data.ffcv.order
DEVICES = ("auto", "mixed", "cpu")  # data.dali.device
SHUFFLE_ALGOS = ("py1e", "py1br", "py1s", "py2s", "naive")  # data.stream.shuffle_algo (MosaicML streaming's)
STREAM_DECODERS = ("auto", "pil", "dali")  # data.stream.decode

__all__ = ["BACKENDS", "CHANNELS_SUPPORTED", "DEVICES", "ORDERS", "SHUFFLE_ALGOS", "DALIOptions", "DataConfig",
           "FFCVOptions", "LoaderSpec", "StreamOptions", "byte_size", "check_channels"]

_BYTES = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)


def byte_size(value) -> int | None:
    """A size in bytes from an int or a string such as '64mb', '1.5GB', '200k' (powers of 1024, as
    MosaicML streaming reads them); None if `value` is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _BYTES.fullmatch(str(value).strip())
    if m is None:
        return None
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


BYTE_SIZE: Rule = (lambda v: v in ("", 0) or (byte_size(v) or 0) > 0,
                   "a size such as 20gb or 512mb (empty: no limit)")


@dataclass
class FFCVOptions:
    """`data.ffcv.*`: how the FFCV backend reads its .beton."""
    order: str = "random"  # random | quasi_random (page-local, for a .beton larger than RAM) | sequential
    os_cache: bool = True  # memory-map the .beton; false: read pages per epoch (with quasi_random)
    buffer_pages: int = 8  # quasi_random: pages shuffled together
    batches_ahead: int = 3  # batches FFCV prepares ahead of the trainer

    @staticmethod
    def rules() -> dict[str, Rule]:
        return {"order": one_of(*ORDERS), "buffer_pages": POSITIVE, "batches_ahead": POSITIVE}


@dataclass
class DALIOptions:
    """`data.dali.*`: the DALI backend's speed knobs."""
    device: str = "auto"  # auto (mixed with a GPU, else cpu) | mixed | cpu
    hw_decoder_load: float = 0.65  # share of JPEGs sent to the hardware decoder (A100/H100)
    prefetch: int = 2  # batches prepared ahead
    threads: int = 0  # CPU threads; 0: data.num_workers
    preallocate: int = 0  # bytes per image to preallocate for decoding; 0: DALI's default

    @staticmethod
    def rules() -> dict[str, Rule]:
        return {"device": one_of(*DEVICES), "hw_decoder_load": UNIT, "prefetch": POSITIVE, "threads": NON_NEGATIVE,
                "preallocate": NON_NEGATIVE}


@dataclass
class StreamOptions:
    """`data.stream.*`: how the stream backend reads MosaicML streaming shards (`simmim shard`).
    The sample order of an epoch is a function of (train.seed, epoch, canonical_nodes,
    shuffle_algo, shuffle_block_size), whatever the number of nodes, ranks and workers
    (pipeline/stream_loader.py); the number of nodes must divide canonical_nodes or be a multiple of it."""
    cache_dir: str = ""  # where shards from s3:// are cached on each node; empty: <tmp>/simmim-stream-<uid>/<hash of the URL>
    cache_limit: str = ""  # e.g. 20gb: least recently used shards are evicted beyond it; empty: keep every shard
    canonical_nodes: int = 16  # streaming's num_canonical_nodes: fixes the order for any number of nodes
    shuffle_algo: str = "py1e"  # streaming's shard-aware shuffles; py1e: each shard's samples spread over a block
    shuffle_block_size: int = 0  # samples shuffled together (fewer: fewer shards resident); 0: streaming's default
    predownload: int = 0  # samples each worker downloads ahead; 0: 8 x data.batch_size (streaming's default)
    decode: str = "auto"  # pil: in the DataLoader workers | dali: DALI (data.dali.*) | auto: dali on a GPU if installed

    @staticmethod
    def rules() -> dict[str, Rule]:
        return {"cache_limit": BYTE_SIZE, "canonical_nodes": POSITIVE, "shuffle_algo": one_of(*SHUFFLE_ALGOS),
                "shuffle_block_size": NON_NEGATIVE, "predownload": NON_NEGATIVE, "decode": one_of(*STREAM_DECODERS)}


@dataclass
class DataConfig:
    """`data.*`: what to read and how to batch it (shared by pre-training and fine-tuning)."""
    backend: str = "torch"  # torch | ffcv | dali | stream
    path: str = "data/imagenet/train"
    img_size: int = 192
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    mask_strategy: str = "random"  # random | square | block (pipeline/masking.py)
    batch_size: int = 128  # per process, per micro-step
    val_path: str = ""  # held-out images for the pre-training validation loss (run.val_every); empty: none
    num_workers: int = 8  # loader workers (torch: processes; ffcv, dali: threads)
    max_pixels: int = MAX_PIXELS  # torch, dali (and simmim scan/convert --max-pixels): larger images are refused
    channels: int = 3  # 3: RGB | 1: grey (one-channel encoder) | N: N-channel .tif/.npy (torch backend); docs/data.md
    mean: list[float] = field(default_factory=list)  # per channel, of values in [0, 1]; empty: see `stats.normalization`
    std: list[float] = field(default_factory=list)  # per channel, > 0; empty: as mean
    ffcv: FFCVOptions = field(default_factory=FFCVOptions)
    dali: DALIOptions = field(default_factory=DALIOptions)
    stream: StreamOptions = field(default_factory=StreamOptions)

    @staticmethod
    def rules() -> dict[str, Rule]:
        """max_pixels has its own check (decode.check_max_pixels), shared with scan / convert; the
        relation of channels, mean, std and backend: `check_channels`."""
        return {"backend": one_of(*BACKENDS), "img_size": POSITIVE, "mask_patch_size": POSITIVE,
                "mask_ratio": OPEN_UNIT, "mask_strategy": one_of(*MASK_STRATEGIES), "batch_size": POSITIVE,
                "num_workers": NON_NEGATIVE, "channels": POSITIVE,
                "mean": (lambda v: all(math.isfinite(x) for x in v), "finite numbers"),
                "std": (lambda v: all(0 < x < math.inf for x in v), "> 0 (and finite) for every channel")}


# what each backend decodes (data.channels): FFCV and DALI store / decode 8-bit RGB or grey images only
CHANNELS_SUPPORTED = {"ffcv": (1, 3), "dali": (1, 3), "stream": (3,)}


def check_channels(channels: int, mean, std, backend: str) -> None:
    """ConfigError (one line) unless data.mean / data.std are empty or hold one value per channel,
    and `backend` reads `channels`-channel images (the torch backend reads any count)."""
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) not in (0, channels):
            raise ConfigError(f"{key} has {len(values)} values for data.channels={channels}: give one per channel "
                              f"(or none: `simmim scan --stats` measures them)")
    if (len(mean) == 0) != (len(std) == 0):
        raise ConfigError("data.mean and data.std are set together (one value per channel each), or both left empty")
    supported = CHANNELS_SUPPORTED.get(backend)
    if supported is not None and channels not in supported:
        reads = "RGB images only (a grey file is read as RGB)" if supported == (3,) else \
            "8-bit RGB or grey images (data.channels=3 or 1)"
        other = "grey (data.channels=1): data.backend=torch, ffcv or dali" if channels == 1 else \
            "N-channel .tif / .npy data: data.backend=torch"
        raise ConfigError(f"data.backend={backend} reads {reads}, not data.channels={channels}; for {other}")


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a loader is asked to produce, fixed for its life.

    backend / path / batch_size (per process) / num_workers / max_pixels / channels: as in `DataConfig`;
    aug: the training view (`Augmentation`: size, crop scale and ratio, flip, mean/std, one per channel);
    train: the training view (random resized crop + flip) or the evaluation view (torchvision's
    Resize(int(size / crop_ratio)) + CenterCrop(size), `augment.eval_geometry`); labels: batches end with the labels (int64, (B,));
    drop_last: every batch full (training) or the remainder kept (evaluation);
    dtype: the image dtype on the device (float32 | float16 | bfloat16);
    rand_augment: fine-tuning's RandAugment as timm's spec string (e.g. 'rand-m9-mstd0.5-inc1'; empty:
    off), applied by each backend in its own way on the training view;
    transform: the torch backend's per-image PIL transform after the crop;
    ffcv / dali / stream: the backend-only options.
    """
    backend: str
    path: str
    aug: Augmentation
    batch_size: int
    num_workers: int = 4
    max_pixels: int = MAX_PIXELS
    channels: int = 3
    train: bool = True
    labels: bool = False
    drop_last: bool = True
    crop_ratio: float = 0.875
    dtype: torch.dtype = torch.float32
    rand_augment: str = ""
    transform: Callable[..., Any] | None = None
    ffcv: FFCVOptions = field(default_factory=FFCVOptions)
    dali: DALIOptions = field(default_factory=DALIOptions)
    stream: StreamOptions = field(default_factory=StreamOptions)

    @classmethod
    def from_config(cls, data: DataConfig, aug: Augmentation, path: str | None = None, **task) -> LoaderSpec:
        """The spec of `data` (a `DataConfig`, or an OmegaConf node of one) for `path` (default
        `data.path`); `task` sets the task-only fields (train, labels, drop_last, crop_ratio, dtype,
        rand_augment, transform). TypeError for an unknown field name (an internal bug, not a user error)."""
        return cls(backend=data.backend, path=str(data.path if path is None else path), aug=aug,
                   batch_size=data.batch_size, num_workers=data.num_workers, max_pixels=data.max_pixels,
                   channels=data.channels,
                   ffcv=FFCVOptions(**_plain(data.ffcv)), dali=DALIOptions(**_plain(data.dali)),
                   stream=StreamOptions(**_plain(getattr(data, "stream", None) or StreamOptions())), **task)


def _plain(section) -> dict:
    """A dataclass instance or an OmegaConf node -> {field: value}."""
    if dataclasses.is_dataclass(section):
        return dataclasses.asdict(section)
    return dict(section)
