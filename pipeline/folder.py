r"""Image folders and lists: ImageNet-style class folders `root/<class>/<image>` (labels = sorted
class names), or unlabeled data for pre-training: a folder with images directly in it (any nesting
of folders below), or a list of bare paths. Unlabeled data has `classes == []` and every label 0;
fine-tuning refuses it. `scan_folder` says in one line what it found (images, folders, classes).

The walk follows symbolic links but enters each real directory once (a link back up the tree, a
second link to a folder already walked, a link into another class folder or out of the data path
is skipped and reported in one warning line), lists regular files only, and no file twice through
symbolic links (hard links are names of their own).

Also reads a file list. The list format (what `simmim scan` writes, what every loader reads):
UTF-8 text, one sample per line, `<path> <label>`: the path, one or more spaces or tabs, a
non-negative integer label; or, for unlabeled data, `<path>` alone. Every line of a list has a
label or none does (the first line decides); a bare path whose last space-separated part looks
like a number is refused, so a path ending in white space and a number is written with that white
space escaped. Blank lines and lines starting with `#` are ignored. A relative path
is relative to the list's folder. In a path a backslash starts an escape: `\\` (backslash),
`\n`, `\r`, `\t`, and `\xHH` or `\uHHHH` (a character by its code: we write it for other
control characters, a leading `#` and leading or trailing white space); bytes that are not UTF-8 are
written as they are (Python's surrogateescape), so any name the file system allows round-trips.
Every user-facing failure is a `DatasetError` with a one-line message.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
from array import array
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simmim.core.errors import DatasetError

from .augment import Augmentation
from .channels import extensions, read_pixels
from .decode import MAX_PIXELS, DecodeError, decode_rgb, file_kind
from .skips import NAMED
from .views import center_crop, channel_view, to_tensor, train_view

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
                              ".pnm", ".jp2", ".j2k"})  # the formats of `decode.FORMATS`


class SampleList:
    """`(path, label)` samples held in three flat arrays, so that N entries are three objects.

    A Python list of N `(path, label)` tuples is ~3N objects whose reference counts change when
    they are read; forked DataLoader workers reading them turn the parent's shared pages into
    private copies (~200 MiB per worker at 1.28M images, ~2.4 GB at 14M). Reading a numpy array
    touches no per-sample object, so the pages stay shared.

    names:   uint8 (total bytes,): every path's file-system bytes after `root`, end to end
    offsets: int64 (N + 1,): path i is root + names[offsets[i]:offsets[i + 1]]
    labels:  int32 (N,)
    root:    str prefix shared by every path ('' if none): ImageNet's 1.28M paths share the tree's
             root, so ~30 bytes a path are kept instead of ~70

    Reads like the list it replaces: `len`, `samples[i] -> (path, label)`, iteration, and
    `samples[a:b]` / `samples.take(indices)` for subsets (new arrays, in the same order).
    """

    def __init__(self, root: str, names: np.ndarray, offsets: np.ndarray, labels: np.ndarray):
        if len(offsets) != len(labels) + 1:
            raise ValueError(f"{len(offsets)} offsets for {len(labels)} labels (expected one more)")
        self.root, self.names, self.offsets, self.labels = root, names, offsets, labels
        self._root_bytes = os.fsencode(root)

    def fingerprint(self) -> str:
        """12 hex digits of SHA-1 over the relative paths (in order) and labels: another file, name,
        label or order gives another value (a resume tells a changed list by it); ~0.1 s a million."""
        digest = hashlib.sha1(np.ascontiguousarray(self.offsets).tobytes())
        digest.update(np.ascontiguousarray(self.names).tobytes())
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()[:12]

    @classmethod
    def from_pairs(cls, pairs, root: str = "") -> "SampleList":
        """From an iterable of (path, label); `root` is stripped from every path (all must start
        with it). A path is stored as its file-system bytes (`os.fsencode`), so any name survives."""
        prefix = os.fsencode(root)
        names, labels = [], []
        for path, label in pairs:
            b = os.fsencode(path)
            if not b.startswith(prefix):
                raise ValueError(f"{path} is not under {root}")
            names.append(b[len(prefix):])
            labels.append(label)
        return cls.from_names(root, names, np.asarray(labels, dtype=np.int32))

    @classmethod
    def from_names(cls, root: str, names: list[bytes], labels: np.ndarray) -> "SampleList":
        offsets = np.zeros(len(names) + 1, np.int64)
        np.cumsum([len(b) for b in names], out=offsets[1:])
        buf = np.frombuffer(b"".join(names), dtype=np.uint8)  # read-only, over one bytes object
        return cls(root, buf, offsets, np.asarray(labels, dtype=np.int32).reshape(-1))

    @classmethod
    def concat(cls, root: str, parts: list[tuple[bytes, np.ndarray, np.ndarray]]) -> "SampleList":
        """From (names joined, name lengths, labels) parts, in order."""
        offsets = np.zeros(sum(len(p[1]) for p in parts) + 1, np.int64)
        if parts:
            np.cumsum(np.concatenate([p[1] for p in parts]), out=offsets[1:])
        names = np.frombuffer(b"".join(p[0] for p in parts), dtype=np.uint8)
        labels = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int32)
        return cls(root, names, offsets, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        a, b = self.offsets[i], self.offsets[i + 1]
        return os.fsdecode(self._root_bytes + self.names[a:b].tobytes())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        return self.path(i), int(self.labels[i])

    def __iter__(self):
        for i in range(len(self)):
            yield self.path(i), int(self.labels[i])

    def __eq__(self, other) -> bool:
        """Equal to another SampleList or a sequence of (path, label) with the same samples in order."""
        if isinstance(other, SampleList):
            return self.root == other.root and np.array_equal(self.names, other.names) and \
                np.array_equal(self.offsets, other.offsets) and np.array_equal(self.labels, other.labels)
        try:
            return len(self) == len(other) and list(self) == [tuple(x) for x in other]
        except TypeError:
            return NotImplemented

    __hash__ = None

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The paths of samples start..stop-1 as a list (a chunk's worth, not the whole list)."""
        return [self.path(i) for i in range(start, len(self) if stop is None else min(stop, len(self)))]

    def take(self, indices) -> "SampleList":
        """The samples at `indices` (int array), in that order, as a new SampleList."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lengths = ends - starts
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # gather every selected byte: position p of the output comes from starts[k] + (p - offsets[k])
        owner = np.repeat(np.arange(len(idx)), lengths)
        src = starts[owner] + (np.arange(offsets[-1]) - offsets[:-1][owner])
        return SampleList(self.root, self.names[src], offsets, self.labels[idx].copy())

    @property
    def nbytes(self) -> int:
        return self.names.nbytes + self.offsets.nbytes + self.labels.nbytes

    def __repr__(self) -> str:
        return f"SampleList({len(self)} samples under '{self.root}', {self.nbytes / 2**20:.1f} MiB)"


def scan_folder(root: str | os.PathLike, announce=log.info, channels: int = 3) -> tuple[SampleList, list[str]]:
    """Returns (samples, class_names) for a class-folder tree, an unlabeled folder or a list (see the
    module docstring); labels index the sorted class folder names (all 0 and no class names for
    unlabeled data); within a folder, paths are in sorted order. `announce(line)` gets one line
    saying what was found. `channels` (data.channels) picks the file extensions a folder walk
    lists (`channels.extensions`: .npy and .tif arrays for 1 or N). DatasetError (one line) for a
    missing, empty or binary path."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data path '{root}' does not exist (build the sample set with "
                           f"`simmim sample-data`, or set data.path)")
    if root.is_file():
        if root.suffix == ".beton" or root.open("rb").read(4096).count(b"\0"):
            raise DatasetError(f"data path '{root}' is a binary file, not a class folder or a `path label` list"
                               f"{' (an FFCV .beton: use data.backend=ffcv)' if root.suffix == '.beton' else ''}")
        samples, classes = read_file_list(root)
        announce(f"{root}: a list of {len(samples)} images, "
                 + (f"{len(classes)} classes" if classes else "unlabeled (bare paths)"))
        return samples, classes
    suffixes = extensions(channels, IMAGE_EXTENSIONS)
    classes = folder_classes(root, suffixes)
    walk = _Walk(root, classes if classes is not None else [""], suffixes)
    for label, name in enumerate(classes if classes is not None else [""]):
        walk.walk_class(label, name)
    samples = walk.result()
    if not len(samples):
        found = f"{len(classes)} class folders but no images" if classes else "no images and no class folders"
        arrays = sum(1 for _ in root.rglob("*.npy")) if channels == 3 else 0  # the error path only
        hint = f"; found {arrays} .npy files: .npy arrays are read with data.channels=1 or N (the number of " \
            f"channels they hold), not 3" if arrays else ""
        raise DatasetError(f"data path '{root}' has {found} ({', '.join(sorted(suffixes))}"
                           f"{'' if channels == 3 else f' for data.channels={channels}'}){hint}")
    kind = (f"{len(classes)} class folders (fine-tuning's labels; pre-training ignores them)" if classes is not None
            else "unlabeled (images in the top folder itself: one set, for pre-training)")
    announce(f"{root}: {len(samples)} images in {walk.folders} folder{'s' * (walk.folders != 1)}, {kind}")
    return samples, classes if classes is not None else []


def folder_classes(root: Path, suffixes: frozenset[str] = IMAGE_EXTENSIONS) -> list[str] | None:
    """The sorted class folder names under root (hidden folders left out), or None when root is
    unlabeled: it holds image files itself (hidden ones aside), or no folders at all."""
    classes, images = [], False
    with os.scandir(root) as entries:
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                classes.append(e.name)
            elif os.path.splitext(e.name)[1].lower() in suffixes:
                images = True
    return None if images or not classes else sorted(classes)


def walk_tree(root: Path, classes: list[str], quota: dict[int, int] | None = None) -> SampleList:
    """The images of class folders `classes` under root (`_Walk`'s rules), label = index in
    `classes` (`[""]`: root itself, unlabeled). `quota` {label: k}: only those classes, the first k
    images each (reading each folder only until it has them: a few images per class never list an
    ImageNet class folder)."""
    walk = _Walk(root, classes)
    for label, name in enumerate(classes):
        if quota is None:
            walk.walk_class(label, name)
        elif label in quota:
            walk.walk_class(label, name, limit=quota[label])
    return walk.result()


class _Walk:
    """The walk of `scan_folder` (and of `convert --limit`), in file-system bytes, into flat arrays.

    Every class folder's real directory is marked as seen before any is walked, so a link from one
    class into another, a link leading outside the data root (and outside the class folder's own
    real place), and a link back up the tree are all skipped, each link named in one warning line.
    Files: regular files only (a FIFO, socket or device, or a link to one, is skipped in one line:
    opening a FIFO blocks forever), each file once through symbolic links (a link to a file already
    listed by its real name or an earlier link is left out; hard links are names of their own and
    are all listed: the scale benchmark builds ImageNet-sized trees from them). Order: within a
    folder its files sorted by name, then its sub-folders in sorted order (depth first).

    Memory: a class's names are joined into one bytes object as the class ends; per file only the
    (st_dev, st_ino) and a link flag are kept, in arrays, until `result` drops second names.
    """

    def __init__(self, root: Path, classes: list[str], suffixes: frozenset[str] = IMAGE_EXTENSIONS):
        self.root = root
        self.suffixes = {e.encode() for e in suffixes}
        self.prefix = os.fsencode(os.path.join(root, ""))
        self.root_real = os.fsencode(os.path.realpath(root))
        self.classes = {}  # (st_dev, st_ino) -> class name
        for name in classes:
            st = os.stat(root / name if name else root)
            self.classes.setdefault((st.st_dev, st.st_ino), name)
        self.seen, self.walked = set(self.classes), set()
        self.parts: list[tuple[bytes, np.ndarray, np.ndarray]] = []  # (names joined, lengths, labels) per class
        self.devs, self.inos, self.links = array("Q"), array("Q"), array("b")  # per file found
        self.loops: list[str] = []
        self.folders = 0  # folders listed

    def walk_class(self, label: int, name: str, limit: int | None = None) -> None:
        """Adds the files of class folder `name` with `label`. With `limit`: stops after that many,
        reading each folder only until it has them (the first ones in the file system's directory
        order, then sorted), so a few images per class never list a whole ImageNet class folder."""
        top = self.prefix + os.fsencode(name) if name else self.prefix[:-1]  # "": root itself (unlabeled)
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in self.walked:  # two class folders, one real folder
            self.loops.append(os.fsdecode(top))
            return
        self.walked.add((st.st_dev, st.st_ino))
        allowed = (self.root_real, os.fsencode(os.path.realpath(top)))
        cut = len(self.prefix)
        names: list[bytes] = []
        stack = [top]
        while stack and (limit is None or len(names) < limit):
            folder = stack.pop()
            files, subdirs = [], []
            try:
                dev = os.stat(folder).st_dev
                with os.scandir(folder) as entries:
                    for e in entries:
                        try:
                            is_dir, is_link = e.is_dir(), e.is_symlink()
                        except OSError:
                            is_dir, is_link = False, False
                        if is_dir:
                            subdirs.append((e.name, is_link))
                            continue
                        if os.path.splitext(e.name)[1].lower() not in self.suffixes:
                            continue
                        try:
                            st = e.stat() if is_link else None
                            regular = e.is_file()
                        except OSError:  # a dangling link
                            log.warning("skipping %r (a link to nothing)", os.fsdecode(e.path))
                            continue
                        if not regular:
                            log.warning("skipping %r (not a regular file: %s)", os.fsdecode(e.path), file_kind(e.path))
                            continue
                        key = (st.st_dev, st.st_ino) if st is not None else (dev, e.inode())
                        files.append((e.name, key, is_link))
                        if limit is not None and len(names) + len(files) >= limit:
                            break
            except OSError as e:  # unreadable or vanished: skipped, as os.walk does
                log.warning("skipping folder %r (%s)", os.fsdecode(folder), e.strerror or e)
                continue
            self.folders += 1
            base = folder + b"/"
            for f, (d, i), link in sorted(files):
                names.append((base + f)[cut:])
                self.devs.append(d)
                self.inos.append(i)
                self.links.append(link)
            entered = [base + d for d, link in sorted(subdirs) if self.enter(base + d, link, name, allowed)]
            stack.extend(reversed(entered))
        self.parts.append((b"".join(names), np.fromiter(map(len, names), np.int64, len(names)),
                           np.full(len(names), label, np.int32)))

    def enter(self, path: bytes, is_link: bool, name: str, allowed: tuple[bytes, bytes]) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.classes:
            if self.classes[key] != name:
                log.warning("skipping link %r: it leads into class folder '%s'", os.fsdecode(path), self.classes[key])
            else:
                self.loops.append(os.fsdecode(path))
            return False
        if key in self.seen:
            self.loops.append(os.fsdecode(path))
            return False
        if is_link:
            real = os.path.realpath(path)
            if not any(real == a or real.startswith(a.rstrip(b"/") + b"/") for a in allowed):
                log.warning("skipping link %r: it leads outside the data path (to %s)", os.fsdecode(path),
                            os.fsdecode(real))
                return False
        self.seen.add(key)
        return True

    def result(self) -> SampleList:
        """Every class's files in walk order, second names of a real file left out."""
        if self.loops:
            log.warning("%s: skipped %d linked folder(s) already walked (symlink loops or repeated links), e.g. %s",
                        self.root, len(self.loops), self.loops[0])
        samples = SampleList.concat(os.fsdecode(self.prefix), self.parts)
        n = len(samples)
        dev, ino = np.frombuffer(self.devs, np.uint64), np.frombuffer(self.inos, np.uint64)
        link = np.frombuffer(self.links, np.int8)
        # per real file (st_dev, st_ino): every real name (hard links are names of their own), and a
        # symbolic link only when no real name and no earlier link reached that file
        order = np.lexsort((np.arange(n), link, ino, dev))
        first = np.ones(n, dtype=bool)
        first[1:] = (dev[order][1:] != dev[order][:-1]) | (ino[order][1:] != ino[order][:-1])
        keep = np.sort(order[first | (link[order] == 0)])
        if len(keep) == n:
            return samples
        dup = int(np.flatnonzero(np.isin(np.arange(n), keep, invert=True))[0])
        log.warning("%s: left out %d symbolic link(s) to files already listed, e.g. %r",
                    self.root, n - len(keep), samples.path(dup))
        return samples.take(keep)


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


def read_file_list(path: Path) -> tuple[SampleList, list[str]]:
    """A list file (the format of the module docstring), read line by line as bytes into a
    SampleList (paths keep their common folder once). A list of bare paths is unlabeled: labels 0,
    no class names."""
    names: list[bytes] = []
    labels = array("i")
    labeled = None  # decided by the first line
    base = os.fsencode(os.path.join(path.parent, ""))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            parts = line.rsplit(maxsplit=1)
            has_label = len(parts) == 2 and parts[1].isdigit()  # bytes.isdigit: ASCII digits 0-9 only
            if labeled is None:
                labeled = has_label or len(parts) == 2 and _NUMBER_LIKE.fullmatch(os.fsdecode(parts[1])) is not None
            if labeled != has_label:
                text = os.fsdecode(line)[:200]
                raise DatasetError(f"{path}:{lineno}: expected '<path> <label>' (a label of ASCII digits 0-9), "
                                   f"got '{text}'" if labeled else
                                   f"{path}:{lineno}: a `path label` line in a list of bare paths (line 1 has no "
                                   f"label): every line has a label or none does (a path ending in a space and a "
                                   f"number: write that space as \\x20), got '{text}'")
            file = parts[0] if labeled else line
            if b"\\" in file:
                file = os.fsencode(unquote_path(os.fsdecode(file)))
            names.append(file if file.startswith(b"/") else base + file)
            labels.append(int(parts[1]) if labeled else 0)
    if not names:
        raise DatasetError(f"file list '{path}' lists no images")
    root = common_root(names)
    cut = len(root)
    samples = SampleList.from_names(os.fsdecode(root), [n[cut:] for n in names] if cut else names,
                                    np.frombuffer(labels, np.int32))
    if not labeled:
        return samples, []
    num_classes = int(samples.labels.max()) + 1
    classes = read_classes(path)  # written beside a list by `simmim scan`
    if isinstance(classes, list) and len(classes) >= num_classes:
        return samples, [str(c) for c in classes]
    return samples, [str(i) for i in range(num_classes)]


# the last part of a bare path that would read as a label (superscripts, other scripts' digits, signs,
# decimals): refused, so that a `path label` line with a bad label is never taken for a path
_NUMBER_LIKE = re.compile(r"(?=.*[\d\u00b2\u00b3\u00b9\u2070-\u2079])[-+]?[\d.\u00b2\u00b3\u00b9\u2070-\u2079]+")


def quote_bare_path(path: str) -> str:
    """A path as a list of bare paths writes it: `quote_path`, and the white space before a last
    part that reads as a number escaped, so the line never reads as `path label`."""
    out = quote_path(path)
    cut = out.rfind(" ")  # the only white space quote_path leaves as it is (the reader splits on ASCII's)
    if cut > 0 and _NUMBER_LIKE.fullmatch(out[cut + 1:]):
        out = out[:cut] + "\\x20" + out[cut + 1:]
    return out


def common_root(names: list[bytes]) -> bytes:
    """The folder (ending in '/') that every path starts with: the first path's grandparent (an
    ImageNet list's root) if all share it, else b''."""
    first = names[0]
    parent = first[:first.rfind(b"/")] if b"/" in first else b""
    grand = parent[:parent.rfind(b"/") + 1] if b"/" in parent else b""
    if grand and all(n.startswith(grand) for n in names):
        return grand
    return b""


def sidecar(path: str | os.PathLike, suffix: str) -> Path:
    """`train.beton` -> `train.<suffix>`: the files stored beside an output (a list, a .beton)."""
    path = Path(path)
    return path.with_name(path.stem + "." + suffix)


def clean_list_path(src: str | os.PathLike) -> Path:
    """Where `simmim scan SRC` writes its clean list by default: `SRC.clean.txt` beside SRC."""
    return Path(str(Path(src).resolve()).rstrip("/") + ".clean.txt")


def read_classes(path: str | os.PathLike) -> list[str] | None:
    """The class names stored beside a list or .beton (`<stem>.classes.json`), if any."""
    names = sidecar(path, "classes.json")
    return json.loads(names.read_text()) if names.is_file() else None


class ImageFolder(torch.utils.data.Dataset):
    """Indexed by (index, seed): returns (uint8 (3, S, S) tensor, label) augmented per `aug`; for
    `channels` 1 or N (data.channels), (float32 (C, S, S) normalised by aug.mean / aug.std, label)
    (`channel_view`).

    Images decode by `decode.decode_rgb`'s rules (`max_pixels`: the pixel limit); other channel
    counts by `channels.read_pixels`'. `listed`: the
    (samples, classes) to serve instead of walking `root` (a checked scan list). A file that
    breaks the rules is replaced by the next readable sample (the epoch keeps its length), so one
    bad JPEG never stops an epoch, and is logged once per process that built the dataset (a rank):
    the set of known bad files is a shared-memory flag per sample, set under a lock, which the
    DataLoader's forked workers inherit, so a file found bad by one worker is neither reported nor
    decoded again by another, in this epoch or later ones (persistent workers). Only the first
    `skips.NAMED` are named; the rest are counted (`bad_count`, told by the loader at epoch end).
    """

    def __init__(self, root: str | os.PathLike, aug: Augmentation, train: bool = True,
                 crop_ratio: float = 0.875, transform=None, max_pixels: int = MAX_PIXELS,
                 listed: tuple[SampleList, list[str]] | None = None, channels: int = 3):
        # a SampleList: flat arrays, shared by forked workers
        self.samples, self.classes = listed if listed is not None else scan_folder(root, channels=channels)
        self.max_pixels, self.channels = max_pixels, channels
        self.aug, self.train, self.crop_ratio = aug, train, crop_ratio
        self.transform = transform  # optional extra per-sample op on the PIL crop: f(img, rng) -> img
        self._bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()  # (N,) True: unreadable
        self._bad_lock = multiprocessing.Lock()
        self._bad_count = torch.zeros(1, dtype=torch.int64).share_memory_()  # flags set so far, all workers

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if self._bad[i]:
                continue
            path, label = self.samples[i]
            try:
                img = decode_rgb(path, self.max_pixels) if self.channels == 3 else \
                    read_pixels(path, self.channels, self.max_pixels)
            except DecodeError as e:
                found = self._mark_bad(i)
                if 0 < found <= NAMED:
                    log.warning("skipping unreadable image %s (%s)%s", path, e, "; the next ones are counted, "
                                "not named (`simmim scan` lists each with its reason)" if found == NAMED else "")
                continue
            if self.channels != 3:
                return channel_view(img, self.aug, self.train, self.crop_ratio, random.Random(seed), self.transform), label
            if not self.train:
                return self.center_crop(img), label
            return self.augment(img, random.Random(seed)), label
        raise DatasetError("no image in the dataset could be read")

    def _mark_bad(self, i: int) -> int:
        """Flags sample i unreadable; for the first worker to do so (the one that reports it) the
        number of files flagged so far, this one included; 0 for the others."""
        with self._bad_lock:
            if bool(self._bad[i]):
                return 0
            self._bad[i] = True
            self._bad_count += 1
            return int(self._bad_count)

    def bad_count(self) -> int:
        """Samples found unreadable so far, by every worker."""
        return int(self._bad_count)

    def augment(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        return train_view(img, self.aug, rng, self.transform)

    def center_crop(self, img: Image.Image) -> torch.Tensor:
        """The evaluation view: shorter side resized to size / crop_ratio, centre size x size."""
        return to_tensor(center_crop(img, self.aug.size, self.crop_ratio))
