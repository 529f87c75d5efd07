"""Picks the loader for `data.backend`; every backend yields the same (images, masks) contract.

    torch  the reference: PIL decoding in DataLoader workers, from a class-folder tree or list
    ffcv   an FFCV .beton (`simmim convert`), augmentation in FFCV's compiled pipeline
    dali   NVIDIA DALI from the JPEG folder, decoding on the GPU ('mixed') or CPU

Backend-specific options (`data.order`, `data.dali_*`, ...) are passed through `options`; an
option another backend does not use is ignored, so one recipe can switch backends.
"""
from __future__ import annotations

import importlib.util

import torch

from .augment import Augmentation
from .decode import MAX_PIXELS
from .errors import ConfigError, DatasetError
from .masking import MaskGenerator
from .reference import ReferenceLoader

BACKENDS = ("torch", "ffcv", "dali")
INSTALL = {"ffcv": ("ffcv", "pip install -e '.[ffcv]' (needs apt: libopencv-dev libturbojpeg0-dev pkg-config)"),
           "dali": ("nvidia.dali", "pip install -e '.[dali]'")}
COMMON = ("train", "labels", "dtype", "crop_ratio", "drop_last", "rand_augment")
FFCV_OPTIONS = ("order", "os_cache", "buffer_pages", "batches_ahead") + COMMON
DALI_OPTIONS = ("dali_device", "dali_hw_decoder_load", "dali_prefetch", "dali_threads", "dali_preallocate",
                "max_pixels") + COMMON
TORCH_OPTIONS = ("transform", "max_pixels") + COMMON
# the backend-only `data.*` keys (ffcv decodes what `simmim convert` checked: no max_pixels)
BACKEND_OPTIONS = frozenset(FFCV_OPTIONS + DALI_OPTIONS + TORCH_OPTIONS) - set(COMMON)


def available(backend: str) -> bool:
    if backend == "torch":
        return True
    module = INSTALL[backend][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def validate_data_args(backend: str, path: str, max_pixels: int, key: str = "data") -> None:
    """The data options checked at config time, before anything is built or written: DatasetError
    (one line naming the key) for an unknown backend, a .beton given to a backend that does not read
    one (or the reverse), or an unusable pixel limit."""
    from .decode import check_max_pixels

    if backend not in BACKENDS:
        raise DatasetError(f"unknown {key}.backend '{backend}' (one of: {', '.join(BACKENDS)})")
    if backend == "ffcv" and not str(path).endswith(".beton"):
        raise DatasetError(f"{key}.backend ffcv reads a .beton file, got {key}.path '{path}' "
                           f"(write one with `simmim convert {path} OUT.beton`)")
    if backend != "ffcv" and str(path).endswith(".beton"):
        raise DatasetError(f"{key}.path '{path}' is an FFCV .beton: use {key}.backend=ffcv")
    if backend != "ffcv":
        try:
            check_max_pixels(max_pixels, f"{key}.max_pixels")
        except ValueError as e:
            raise DatasetError(str(e)) from None


def build_loader(backend: str, path: str, aug: Augmentation, masks: MaskGenerator | None, batch_size: int,
                 num_workers: int, device: torch.device, rank: int = 0, world: int = 1, seed: int = 0,
                 **options):
    if backend not in BACKENDS:
        raise ConfigError(f"unknown data.backend '{backend}' (one of: {', '.join(BACKENDS)})")
    if not available(backend):
        raise DatasetError(f"data.backend {backend} is not installed: {INSTALL[backend][1]}")
    args = (path, aug, masks, batch_size, num_workers, device, rank, world, seed)
    validate_data_args(backend, path, options.get("max_pixels", MAX_PIXELS))
    if backend == "ffcv":
        from .ffcv_loader import FFCVLoader

        return FFCVLoader(*args, **_pick(options, FFCV_OPTIONS))
    if backend == "dali":
        from .dali_loader import DALILoader

        picked = _pick(options, DALI_OPTIONS)
        renamed = {"dali_device": "decode_device"}
        return DALILoader(*args, **{renamed.get(k, k.removeprefix("dali_")): v for k, v in picked.items()})
    return ReferenceLoader(*args, **_pick(options, TORCH_OPTIONS))


def _pick(options: dict, names: tuple[str, ...]) -> dict:
    return {k: v for k, v in options.items() if k in names}
