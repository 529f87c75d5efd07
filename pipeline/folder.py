r"""ImageNet-style class-folder datasets: `root/<class>/<image>`, labels = sorted class names.

The walk follows symbolic links but enters each real directory once (a link back up the tree, a
second link to a folder already walked, a link into another class folder or out of the data path
is skipped and reported in one warning line), lists regular files only, and each real file once.

Also reads a file list. The list format (what `simmim scan` writes, what every loader reads):
UTF-8 text, one sample per line, `<path> <label>`: the path, one or more spaces or tabs, a
non-negative integer label. Blank lines and lines starting with `#` are ignored. A relative path
is relative to the list's folder. In a path a backslash starts an escape: `\\` (backslash),
`\n`, `\r`, `\t`, and `\xHH` or `\uHHHH` (a character by its code: we write it for other
control characters, a leading `#` and leading or trailing white space); bytes that are not UTF-8 are
written as they are (Python's surrogateescape), so any name the file system allows round-trips.
Every user-facing failure is a `DatasetError` with a one-line message.
"""
from __future__ import annotations

import logging
import os
import random
import re
import stat
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import Augmentation, sample_crop
from .decode import MAX_PIXELS, DecodeError, decode_rgb
from .errors import DatasetError
from .seeding import derive_seed, torch_generator

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
                    ".jp2", ".j2k"}  # the formats of `decode.FORMATS`


def scan_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """Returns ([(path, label)], class_names) for a class-folder tree or a `path label` list."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data path '{root}' does not exist (build the sample set with "
                           f"`simmim sample-data`, or set data.path)")
    if root.is_file():
        if root.suffix == ".beton" or root.open("rb").read(4096).count(b"\0"):
            raise DatasetError(f"data path '{root}' is a binary file, not a class folder or a `path label` list"
                               f"{' (an FFCV .beton: use data.backend=ffcv)' if root.suffix == '.beton' else ''}")
        return read_file_list(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"data path '{root}' has no class folders: expected {root}/<class>/<image>")
    walk = _Walk(root, classes)
    for label, name in enumerate(classes):
        walk.walk_class(label, name)
    samples = walk.result()
    if not samples:
        raise DatasetError(f"data path '{root}' has {len(classes)} class folders but no images "
                           f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples, classes


class _Walk:
    """The walk of `scan_folder`: every class folder's real directory is marked as seen before
    any is walked, so a link from one class into another, a link leading outside the data root
    (and outside the class folder's own real place), and a link back up the tree are all skipped,
    each link named in one warning line. Files: regular files only (a FIFO, socket or device, or a
    link to one, is skipped in one line: opening a FIFO blocks forever), each real file once
    (a second name for it -- a symbolic or hard link -- is left out; a real name is preferred
    over a symbolic link)."""

    def __init__(self, root: Path, classes: list[str]):
        self.root_real = os.path.realpath(root)
        self.classes = {}  # (st_dev, st_ino) -> class name
        for name in classes:
            st = os.stat(root / name)
            self.classes.setdefault((st.st_dev, st.st_ino), name)
        self.root, self.seen, self.walked = root, set(self.classes), set()
        self.found: list[tuple[str, int, tuple[int, int], bool]] = []  # path, label, file id, via a link
        self.loops: list[str] = []

    def walk_class(self, label: int, name: str) -> None:
        top = os.path.join(self.root, name)
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in self.walked:  # two class folders, one real folder
            self.loops.append(top)
            return
        self.walked.add((st.st_dev, st.st_ino))
        allowed = (self.root_real, os.path.realpath(top))
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
                dev = os.stat(folder).st_dev
            except OSError as e:
                log.warning("skipping folder %r (%s)", folder, e.strerror or e)
                continue
            subdirs = []
            for e in entries:
                try:
                    is_dir, is_link = e.is_dir(), e.is_symlink()
                except OSError:
                    is_dir, is_link = False, False
                if is_dir:
                    if self.enter(e.path, is_link, name, allowed):
                        subdirs.append(e.path)
                    continue
                if os.path.splitext(e.name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    st = e.stat() if is_link else None
                    regular = e.is_file()
                except OSError:  # a dangling link
                    log.warning("skipping %r (a link to nothing)", e.path)
                    continue
                if not regular:
                    log.warning("skipping %r (not a regular file: %s)", e.path, _kind(e.path))
                    continue
                key = (st.st_dev, st.st_ino) if st is not None else (dev, e.inode())
                self.found.append((e.path, label, key, is_link))
            stack.extend(reversed(subdirs))

    def enter(self, path: str, is_link: bool, name: str, allowed: tuple[str, str]) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.classes:
            if self.classes[key] != name:
                log.warning("skipping link %r: it leads into class folder '%s'", path, self.classes[key])
            else:
                self.loops.append(path)
            return False
        if key in self.seen:
            self.loops.append(path)
            return False
        if is_link:
            real = os.path.realpath(path)
            if not any(real == a or real.startswith(a.rstrip(os.sep) + os.sep) for a in allowed):
                log.warning("skipping link %r: it leads outside the data path (to %s)", path, real)
                return False
        self.seen.add(key)
        return True

    def result(self) -> list[tuple[str, int]]:
        if self.loops:
            log.warning("%s: skipped %d linked folder(s) already walked (symlink loops or repeated links), e.g. %s",
                        self.root, len(self.loops), self.loops[0])
        first: dict[tuple[int, int], int] = {}
        for i, (_, _, key, link) in enumerate(self.found):
            if key not in first or (self.found[first[key]][3] and not link):
                first[key] = i
        keep = sorted(first.values())
        if len(keep) < len(self.found):
            dup = next(p for i, (p, *_) in enumerate(self.found) if first[self.found[i][2]] != i)
            log.warning("%s: left out %d second name(s) of files already listed (symbolic or hard links), e.g. %r",
                        self.root, len(self.found) - len(keep), dup)
        return [(self.found[i][0], self.found[i][1]) for i in keep]


def _kind(path: str) -> str:
    mode = os.stat(path).st_mode
    return next((what for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                                         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                                         (stat.S_ISDIR, "a folder")) if test(mode)), "not a regular file")


def quote_path(path: str) -> str:
    """A path as the list format writes it (see the module docstring)."""
    out = []
    for i, c in enumerate(path):
        if c == "\\":
            out.append("\\\\")
        elif c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F or (c == "#" and i == 0) or (c.isspace() and i in (0, len(path) - 1)):
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPE = re.compile(r"\\(\\|n|r|t|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")


def unquote_path(text: str) -> str:
    """Inverse of `quote_path`; a backslash not starting one of its escapes is kept as it is."""
    def one(m: re.Match) -> str:
        e = m.group(1)
        return {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}.get(e) or chr(int(e[1:], 16))

    return _UNESCAPE.sub(one, text) if "\\" in text else text


def write_list_text(samples: list[tuple[str, int]]) -> str:
    """The list file's text for (absolute path, label) samples."""
    return "".join(f"{quote_path(os.path.abspath(p))} {label}\n" for p, label in samples)


def read_file_list(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    samples = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
                raise DatasetError(f"{path}:{lineno}: expected '<path> <label>' (a label of ASCII digits 0-9), "
                                   f"got '{line[:200]}'")
            file = unquote_path(parts[0])
            file = file if os.path.isabs(file) else str(path.parent / file)
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


class ImageFolder(torch.utils.data.Dataset):
    """Indexed by (index, seed): returns (uint8 (3, S, S) tensor, label) augmented per `aug`.

    Images decode by `decode.decode_rgb`'s rules (`max_pixels`: the pixel limit). `listed`: the
    (samples, classes) to serve instead of walking `root` (a checked scan list). A file that
    breaks the rules is logged once and replaced by the next readable sample (the epoch keeps its
    length), so one bad JPEG never stops an epoch.
    """

    def __init__(self, root: str | os.PathLike, aug: Augmentation, train: bool = True,
                 crop_ratio: float = 0.875, transform=None, max_pixels: int = MAX_PIXELS,
                 listed: tuple[list[tuple[str, int]], list[str]] | None = None):
        self.samples, self.classes = listed if listed is not None else scan_folder(root)
        self.max_pixels = max_pixels
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
                img = decode_rgb(path, self.max_pixels)
            except DecodeError as e:
                self._bad.add(i)
                log.warning("skipping unreadable image %s (%s)", path, e)
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
    [size, size])` on a PIL image (tests/test_pixels.py)."""
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
