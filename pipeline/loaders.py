"""Picks the loader for `data.backend`; every backend yields the same (images, masks) contract.

    torch  the reference: PIL decoding in DataLoader workers, from a class-folder tree or list
    ffcv   an FFCV .beton (`simmim convert`), augmentation in FFCV's compiled pipeline
    dali   NVIDIA DALI from the JPEG folder, decoding on the GPU ('mixed') or CPU
    stream MosaicML streaming shards (`simmim shard`), local or s3://, decoded in DataLoader workers
           (PIL) or by DALI (`data.stream.decode`: `stream_decoder`)

Each backend reads its own options from the spec (`spec.ffcv`, `spec.dali`, `spec.stream`) and ignores the
others', so one recipe can switch backends.
"""
from __future__ import annotations

import importlib.util

import torch

from simmim.core.errors import ConfigError, DatasetError

from .dali_loader import DALILoader
from .ffcv_loader import FFCVLoader
from .loader import Loader
from .masking import MaskGenerator
from .options import BACKENDS, STREAM_DECODERS, LoaderSpec
from .reference import ReferenceLoader
from .stream_dali import StreamDALILoader
from .stream_loader import StreamLoader

INSTALL = {"ffcv": ("ffcv", "pip install -e '.[ffcv]' (needs apt: libopencv-dev libturbojpeg0-dev pkg-config)"),
           "dali": ("nvidia.dali", "pip install -e '.[dali]'"),
           "stream": ("streaming", "pip install -e '.[stream]'")}


def available(backend: str) -> bool:
    if backend == "torch":
        return True
    module = INSTALL[backend][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def validate_data_args(backend: str, path: str, key: str = "data.path") -> None:
    """The data paths checked before anything is built or written: DatasetError (one line naming
    the key) for an empty path or a .beton given to a backend that does not read one (or the
    reverse). `key` names the option that holds `path` (data.path, data.val_path, finetune.val_path).
    data.backend and data.max_pixels are checked at load (their rules in options.DataConfig)."""
    if not str(path):
        raise DatasetError(f"{key} is empty: set it to the training images (a class folder, a `path label` list "
                           f"or, for data.backend=ffcv, a .beton)")
    if backend == "ffcv" and not str(path).endswith(".beton"):
        raise DatasetError(f"data.backend ffcv reads a .beton file, got {key} '{path}' "
                           f"(write one with `simmim convert {path} OUT.beton`)")
    if backend != "ffcv" and str(path).endswith(".beton"):
        raise DatasetError(f"{key} '{path}' is an FFCV .beton: use data.backend=ffcv")
    if backend != "stream" and "://" in str(path):
        raise DatasetError(f"{key} '{path}' is a URL: only data.backend=stream reads from an object store "
                           f"(shards written by `simmim shard`)")


def stream_decoder(decode: str, device: torch.device) -> str:
    """What decodes the stream backend's images for `data.stream.decode`: 'pil' (the DataLoader
    workers, the torch backend's pixels) or 'dali'; `auto` is DALI when training on a GPU and DALI
    is installed. ConfigError for another value, DatasetError (install hint) for dali without DALI."""
    if decode not in STREAM_DECODERS:
        raise ConfigError(f"data.stream.decode must be one of {', '.join(STREAM_DECODERS)}, got '{decode}'")
    if decode == "auto":
        return "dali" if device.type == "cuda" and available("dali") else "pil"
    if decode == "dali" and not available("dali"):
        raise DatasetError(f"data.stream.decode=dali needs DALI, which is not installed: {INSTALL['dali'][1]}")
    return decode


def build_loader(spec: LoaderSpec, masks: MaskGenerator | None, device: torch.device | str, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> Loader:
    """The `spec.backend` loader of `spec` for this process (see `loader.Loader`). DatasetError
    (one line) for an unknown or missing backend or a path it cannot read; ConfigError for an
    unknown backend name."""
    if spec.backend not in BACKENDS:
        raise ConfigError(f"unknown data.backend '{spec.backend}' (one of: {', '.join(BACKENDS)})")
    if not available(spec.backend):
        raise DatasetError(f"data.backend {spec.backend} is not installed: {INSTALL[spec.backend][1]}")
    validate_data_args(spec.backend, spec.path)
    if spec.backend == "ffcv":
        backend = FFCVLoader
    elif spec.backend == "dali":
        backend = DALILoader
    elif spec.backend == "stream":
        backend = StreamDALILoader if stream_decoder(spec.stream.decode, torch.device(device)) == "dali" else StreamLoader
    else:
        backend = ReferenceLoader
    return backend(spec, masks, device, rank, world_size, seed)
