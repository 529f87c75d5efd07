"""ImageNet-style class-folder datasets: `root/<class>/<image>`, labels = sorted class names.

Also reads a file list (`path label` per line, paths relative to the list's folder or absolute).
Every user-facing failure is a `DatasetError` with a one-line message.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import Augmentation, sample_crop
from .errors import DatasetError
from .seeding import derive_seed, torch_generator

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def scan_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """Returns ([(path, label)], class_names) for a class-folder tree or a `path label` list."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data path '{root}' does not exist (build the sample set with "
                           f"`simmim sample-data`, or set data.path)")
    if root.is_file():
        return read_file_list(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"data path '{root}' has no class folders: expected {root}/<class>/<image>")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                        if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise DatasetError(f"data path '{root}' has {len(classes)} class folders but no images "
                           f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples, classes


def read_file_list(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    samples = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DatasetError(f"{path}:{lineno}: expected '<path> <integer label>', got '{line}'")
            file = parts[0] if os.path.isabs(parts[0]) else str(path.parent / parts[0])
            samples.append((file, int(parts[1])))
    if not samples:
        raise DatasetError(f"file list '{path}' lists no images")
    num_classes = max(label for _, label in samples) + 1
    classes = read_classes(path)  # written beside a list by `simmim scan`
    if isinstance(classes, list) and len(classes) >= num_classes:
        return samples, [str(c) for c in classes]
    return samples, [str(i) for i in range(num_classes)]


def sidecar(path: str | os.PathLike, suffix: str) -> Path:
    """`train.beton` -> `train.<suffix>`: the files stored beside an output (a list, a .beton)."""
    path = Path(path)
    return path.with_name(path.stem + "." + suffix)


def read_classes(path: str | os.PathLike) -> list[str] | None:
    """The class names stored beside a list or .beton (`<stem>.classes.json`), if any."""
    import json

    names = sidecar(path, "classes.json")
    return json.loads(names.read_text()) if names.is_file() else None


def load_rgb(path: str) -> Image.Image:
    """Any PIL-readable image (CMYK, grayscale, palette, RGBA, a PNG named .JPEG) as RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img.copy()


class ImageFolder(torch.utils.data.Dataset):
    """Indexed by (index, seed): returns (uint8 (3, S, S) tensor, label) augmented per `aug`.

    A file that cannot be read is logged once and replaced by the next readable sample, so one
    bad JPEG never stops an epoch.
    """

    def __init__(self, root: str | os.PathLike, aug: Augmentation, train: bool = True,
                 crop_ratio: float = 0.875, transform=None):
        self.samples, self.classes = scan_folder(root)
        self.aug, self.train, self.crop_ratio = aug, train, crop_ratio
        self.transform = transform  # optional extra per-sample op on the PIL crop: f(img, rng) -> img
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                img = load_rgb(path)
            except Exception as e:  # noqa: BLE001 - any decoder failure is a skipped file
                self._bad.add(i)
                log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                continue
            if not self.train:
                return self.center_crop(img), label
            return self.augment(img, random.Random(seed)), label
        raise DatasetError("no image in the dataset could be read")

    def augment(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        a = self.aug
        left, top, w, h = sample_crop(img.width, img.height, a.scale, a.ratio, rng)
        img = resized_crop(img, left, top, w, h, a.size)
        if rng.random() < a.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.transform is not None:
            img = self.transform(img, rng)
        return to_tensor(img)

    def center_crop(self, img: Image.Image) -> torch.Tensor:
        """The evaluation view: shorter side resized to size / crop_ratio, centre size x size."""
        return to_tensor(center_crop(img, self.aug.size, self.crop_ratio))


def resized_crop(img: Image.Image, left: int, top: int, width: int, height: int, size: int) -> Image.Image:
    """torchvision's RandomResizedCrop given its box: crop first, then a bilinear (antialiased, as
    PIL always is) resize of the crop to size x size. Pixels at the crop's border see only pixels
    inside it; resizing the full image with `box=` would borrow from outside it (up to 15 levels).
    Equal to `torchvision.transforms.v2.functional.resized_crop(img, top, left, height, width,
    [size, size])` on a PIL image (tests/test_data.py)."""
    return img.crop((left, top, left + width, top + height)).resize((size, size), Image.BILINEAR)


def center_crop(img: Image.Image, size: int, crop_ratio: float) -> Image.Image:
    """The centre square of side crop_ratio * shorter side, resized to size x size (bilinear):
    the same pixels as resizing the shorter side to size / crop_ratio and cropping the centre."""
    side = crop_ratio * min(img.width, img.height)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, S, S) uint8


class ShardedSampler(torch.utils.data.Sampler):
    """Yields (index, sample seed) for this rank's share of one epoch.

    The permutation depends on (seed, epoch) only, so every rank agrees on it; rank r takes
    positions r, r + world, ... of the first `len // world * world` (drop_last) entries. So the
    j-th global batch of world x b samples is the same whatever the world size, and rank r holds
    its positions r, r + world, ... (drop_last=False: all positions, for evaluation). `start`
    skips this rank's first samples (mid-epoch resume).
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if size < world and drop_last:
            raise DatasetError(f"dataset of {size} images is smaller than the {world} ranks sharing it")
        self.size, self.rank, self.world, self.drop_last = size, rank, world, drop_last
        self.seed, self.shuffle, self.epoch, self.start = seed, shuffle, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return shard_size(self.size, self.rank, self.world, self.drop_last) - self.start

    def indices(self) -> list[int]:
        """This rank's dataset indices for the epoch, from `start` on."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch_generator("order", self.seed, self.epoch)).tolist()
        else:
            order = list(range(self.size))
        per_rank = self.size // self.world if self.drop_last else -(-self.size // self.world)
        return order[self.rank + self.start * self.world:per_rank * self.world:self.world]

    def __iter__(self):
        for i in self.indices():
            yield i, derive_seed("sample", self.seed, self.epoch, i)


def shard_size(size: int, rank: int, world: int, drop_last: bool = True) -> int:
    """Samples a rank gets per epoch: size // world (drop_last: the same on every rank), else its
    share of all of them (evaluation: ranks differ by at most one)."""
    return size // world if drop_last else len(range(rank, size, world))


def num_batches(samples: int, batch_size: int, drop_last: bool = True) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)
