"""Per-channel mean and std of a data set: measured by `simmim scan --stats`, stored beside the list,
and the `data.mean` / `data.std` a run normalises with.

Where a run's normalisation comes from (`normalization`), first match wins:
1. `data.mean` / `data.std`, one value per channel (`data.channels`);
2. the statistics file beside the data: `<list stem>.stats.json` beside a list or `.beton`
   (`train.clean.txt` -> `train.clean.stats.json`; `simmim convert` copies or measures a .beton's),
   and for a folder `F` the one beside its scan list, `F.clean.stats.json` (what `simmim scan F
   --stats` writes);
3. ImageNet's (`augment.IMAGENET_MEAN` / `IMAGENET_STD`), for 3 channels only;
otherwise a one-line ConfigError: run `simmim scan --stats` or set data.mean / data.std.

The statistic (`ChannelMoments`): every pixel of every image weighs the same (a large image counts
more than a small one); for channel c, over all N pixels x_c of the data set, in the units the loader
scales values to (decode.py, docs/data.md: 8 bits / 255, 16 bits / 65535, floats as stored),
    mean_c = sum(x_c) / N,   std_c = sqrt(sum((x_c - mean_c)^2) / N)   (population std, ddof = 0),
measured on whole decoded images (before any crop). Per image the mean and the sum of squared
deviations are taken in float64 (for 8-bit images from a 256-level histogram per channel, exactly)
and merged with Chan, Golub & LeVeque's pairwise update ("Updating
formulae and a pairwise algorithm for computing sample variances", 1979), which stays exact where
sum(x^2) / N - mean^2 would cancel.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from simmim.core.errors import ConfigError
from simmim.core.io import write_json

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .folder import clean_list_path, sidecar

STATS_SUFFIX = "stats.json"


class ChannelMoments:
    """Running per-channel count, mean and sum of squared deviations (float64) of pixel values."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def add_image(self, pixels: np.ndarray, scale: float = 1.0) -> None:
        """pixels: (H, W, C) or (H, W) (one channel) of any numeric dtype; each value is divided
        by `scale` (255 for 8-bit images) before it is counted."""
        pixels = np.asarray(pixels)
        channels = len(self.mean)
        if pixels.dtype == np.uint8:  # from a histogram per channel: exact, and ~10x less work than in floats
            flat = pixels.reshape(-1, channels)
            levels = np.arange(256, dtype=np.float64) / scale
            hist = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(channels)])  # (C, 256)
            mean = hist @ levels / len(flat)
            self.merge(len(flat), mean, (hist * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1))
            return
        x = pixels.reshape(-1, channels).astype(np.float64) / scale
        mean = x.mean(axis=0)
        self.merge(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Adds a group of `count` pixels with per-channel `mean` and sum of squared deviations `m2`."""
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    def add(self, other: ChannelMoments) -> None:
        self.merge(other.count, other.mean, other.m2)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


def stats_path(data_path: str | os.PathLike) -> Path:
    """The statistics file of a data path (module docstring): beside a list or .beton, and for a
    folder beside its scan list."""
    path = Path(data_path)
    return sidecar(clean_list_path(path) if path.is_dir() else path, STATS_SUFFIX)


def write_stats(list_path: str | os.PathLike, moments: ChannelMoments, images: int) -> Path:
    """The statistics of a scan beside its list `list_path`, atomically; returns the file's path."""
    return write_json(sidecar(list_path, STATS_SUFFIX), {
        "channels": len(moments.mean), "mean": [round(float(v), 6) for v in moments.mean],
        "std": [round(float(v), 6) for v in moments.std], "images": images, "pixels": moments.count,
        "statistic": "per channel, over every pixel of every image; values scaled to [0, 1] as the loader does "
                     "(8 bits / 255, 16 bits / 65535, floats as stored); population std (ddof 0)"})


def read_stats(path: Path, channels: int, source: str | os.PathLike = ""
               ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from a statistics file; ConfigError (one line) for a file that does not hold
    `channels` values of each, with every std > 0. `source`: the data path the suggested
    `simmim scan` command reads (empty: none named)."""
    scan = f"simmim scan {source} --stats".replace("  ", " ")
    try:
        stats = json.loads(path.read_text())
        mean, std = tuple(float(v) for v in stats["mean"]), tuple(float(v) for v in stats["std"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"statistics file {path} is unreadable ({type(e).__name__}: {e}); run "
                          f"`{scan}` again, or set data.mean / data.std".splitlines()[0]) from None
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"statistics file {path} holds {len(mean)} channels, data.channels is {channels}: run "
                          f"`{scan} --channels {channels}` again, or set data.mean / data.std")
    if not all(s > 0 for s in std):
        raise ConfigError(f"statistics file {path} has a std of 0 (a constant channel): set data.mean / data.std")
    return mean, std


def normalization(channels: int, mean, std, data_path: str | os.PathLike
                  ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where from) for a run (the order of the module docstring). `mean` / `std`:
    data.mean / data.std (checked at config load: empty, or one value per channel). ConfigError
    (one line) for 1 or N channels with neither set nor a statistics file."""
    if len(mean):
        return tuple(float(v) for v in mean), tuple(float(v) for v in std), "data.mean / data.std"
    found = stats_path(data_path)
    if found.is_file():
        return (*read_stats(found, channels, data_path), str(found))
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD, "ImageNet's"
    if Path(data_path).suffix == ".beton":  # `simmim scan` reads the source, not the .beton
        raise ConfigError(f"data.channels={channels} needs per-channel mean and std: convert again with `simmim "
                          f"convert SRC {data_path} --channels {channels} --stats` (writes {found}), "
                          f"or set data.mean / data.std")
    raise ConfigError(f"data.channels={channels} needs per-channel mean and std: run `simmim scan {data_path} "
                      f"--stats --channels {channels}` (writes {found}), or set data.mean / data.std")
