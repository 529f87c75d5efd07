"""Checks every image of a dataset once, in parallel: which decode, which do not, and why.

Real ImageNet holds CMYK and grayscale JPEGs, a PNG named `.JPEG`, huge and tiny images; all of
those decode. Truncated files, zero-byte files, non-images, formats DALI does not read and images
over the pixel limit do not. The check is the loaders' own decode (`decode.check_image`, by
`decode.decode_rgb`'s rules), so a file the scan keeps decodes in every loader, and to the same
pixels. `scan_images` sorts them; `simmim scan SRC` (`scanlist.scan_command`) writes the clean list (`folder`'s list format;
every loader accepts it as data.path) and a JSON report of the bad files; `simmim convert` uses
the same check before writing a `.beton`.

Linear in the number of files: the samples are flat arrays (`folder.SampleList`), chunks are cut
as they are submitted, a bounded number are in flight, only the bad files are kept, and the clean
list is streamed to disk.

A JPEG is checked by decoding its whole entropy-coded stream at a reduced DCT scale (PIL's draft
mode), which finds truncation and corruption for a fraction of a full decode's cost.
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from simmim.core.errors import DatasetError
from simmim.core.io import atomic_write, write_json

from .channels import check_file, pixels_of
from .decode import MAX_PIXELS, DecodeError, check_image, check_max_pixels
from .folder import SampleList, clean_list_path, quote_bare_path, quote_path, scan_folder, sidecar
from .stats import ChannelMoments


def _check_chunk(paths: list[str], max_pixels: int = MAX_PIXELS, channels: int = 3, stats: bool = False
                 ) -> tuple[list[tuple[int, str]], np.ndarray, ChannelMoments | None]:
    """(position in the chunk, reason) of each path that does not decode, the (width, height)
    of every path (0, 0 for a bad one): int32 (len(paths), 2), and with `stats` the per-channel
    moments of the good images (each decoded whole, not at a JPEG's reduced draft scale)."""
    bad, sizes = [], np.zeros((len(paths), 2), np.int32)
    moments = ChannelMoments(channels) if stats else None
    for k, p in enumerate(paths):
        if stats:
            try:
                values, scale = pixels_of(p, channels, max_pixels)
                err, size = None, (values.shape[1], values.shape[0])
                moments.add_image(values, scale)
            except DecodeError as e:
                err = str(e)
        else:
            err, size = check_image(p, max_pixels) if channels == 3 else check_file(p, channels, max_pixels)
        if err is not None:
            bad.append((k, err))
        else:
            sizes[k] = size
    return bad, sizes, moments


@dataclass
class ScanResult:
    good: SampleList
    bad: list[tuple[str, str]]  # (path, reason)
    classes: list[str]
    seconds: float = 0.0
    sizes: np.ndarray | None = None  # int32 (len(good), 2): (width, height) of each good image, from its header
    moments: ChannelMoments | None = None  # per-channel statistics of the good images (`stats=True`)

    def report(self) -> dict:
        return {"images": len(self.good) + len(self.bad), "good": len(self.good), "bad": len(self.bad),
                "seconds": round(self.seconds, 2), "classes": len(self.classes),
                "bad_files": [{"path": p, "error": e} for p, e in self.bad]}


def scan_images(samples: SampleList, classes: list[str], workers: int = 0, chunk: int = 128,
                on_error: str = "skip", progress: bool = True, max_pixels: int = MAX_PIXELS, channels: int = 3,
                stats: bool = False) -> ScanResult:
    """Checks every sample by the loaders' decode rules for `channels` (data.channels; `max_pixels`:
    the pixel limit); on_error 'fail' raises DatasetError naming the first bad file. `stats`: also
    the per-channel mean and std of the good images (`stats.ChannelMoments`), in the same pass.

    Linear in the number of samples: chunks are cut from the sample arrays as they are submitted,
    at most `4 * workers` chunks are in flight at a time (results come back in order), and only
    the bad files are kept (the clean list is one index gather at the end). `samples`: a
    SampleList, or (path, label) pairs. Nothing is logged per bad file: the caller tells them in
    a few lines (`skips.log_skips`)."""
    if not isinstance(samples, SampleList):
        samples = SampleList.from_pairs(samples)
    if on_error not in ("skip", "fail"):
        raise DatasetError(f"on_error must be 'skip' or 'fail', got '{on_error}'")
    try:
        check_max_pixels(max_pixels, "the pixel limit (--max-pixels)")
    except ValueError as e:
        raise DatasetError(str(e)) from None
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    n = len(samples)
    starts = range(0, n, chunk)
    check = functools.partial(_check_chunk, max_pixels=max_pixels, channels=channels, stats=stats)
    moments = ChannelMoments(channels) if stats else None
    bad_index: list[int] = []
    bad: list[tuple[str, str]] = []
    sizes = np.zeros((n, 2), np.int32)
    done = 0
    bar = tqdm(total=n, desc="scan", unit="img", disable=not progress, mininterval=1.0)
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(starts) > 1 else None
    try:
        for start, (got, got_sizes, got_moments) in _in_order(pool, starts, lambda a: samples.paths(a, a + chunk),
                                                              check, 4 * workers):
            for k, err in got:
                path = samples.path(start + k)
                if on_error == "fail":
                    raise DatasetError(f"cannot decode {path} ({err}); use --on-error skip to leave it out")
                bad_index.append(start + k)
                bad.append((path, err))
            sizes[start:start + len(got_sizes)] = got_sizes
            if moments is not None:
                moments.add(got_moments)
            done = start + len(got_sizes)
            bar.update(len(got_sizes))
    except BrokenProcessPool:  # a worker killed (out of memory, a signal): one line, not a traceback
        raise DatasetError(f"a scan worker died while checking files from {samples.path(done)!r} on "
                           f"(out of memory?); lower --workers or --max-pixels") from None
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    keep = np.ones(n, dtype=bool)
    keep[bad_index] = False
    good = np.flatnonzero(keep)
    return ScanResult(samples.take(good), bad, classes, time.perf_counter() - t0, sizes[good], moments)


def _in_order(pool, starts, make_chunk, check, in_flight: int):
    """(start, check(make_chunk(start))) for each start, in order; with a pool, at most `in_flight`
    chunks submitted ahead of the one being consumed."""
    if pool is None:
        for a in starts:
            yield a, check(make_chunk(a))
        return
    pending: deque = deque()
    it = iter(starts)
    for a in it:
        pending.append((a, pool.submit(check, make_chunk(a))))
        if len(pending) >= in_flight:
            break
    while pending:
        a, future = pending.popleft()
        result = future.result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(check, make_chunk(nxt))))
        yield a, result


# a path needs `quote_path` if it holds a backslash or a control character, starts with '#' or
# white space, or ends with white space; the rest are written as their bytes
_NEEDS_QUOTING = re.compile(rb"[\x00-\x1f\x7f\\]|^[#\s]|\s$")


def write_file_list(path: Path, samples: SampleList, block: int = 65536, labeled: bool = True) -> None:
    """The list format of `folder` (what `scan_folder` reads), absolute paths, written a block of
    lines at a time into a temporary file renamed into place. `samples`: a SampleList, or (path,
    label) pairs. `labeled=False`: bare paths (unlabeled data), no labels written."""
    if not isinstance(samples, SampleList):
        samples = SampleList.from_pairs(samples)

    root = os.fsencode(os.path.join(os.path.abspath(samples.root), "")) if samples.root else None

    def line(name: bytes, label: int) -> bytes:
        full = root + name if root is not None else os.fsencode(os.path.abspath(os.fsdecode(name)))
        if not labeled:
            bare = quote_bare_path(os.fsdecode(full)) if b" " in full or _NEEDS_QUOTING.search(full) else None
            return (full if bare is None else os.fsencode(bare)) + b"\n"
        if _NEEDS_QUOTING.search(full):
            full = os.fsencode(quote_path(os.fsdecode(full)))
        return b"%s %d\n" % (full, label)

    def write(tmp: str) -> None:
        names, offsets = samples.names, samples.offsets
        with open(tmp, "wb") as f:
            for a in range(0, len(samples), block):
                b = min(a + block, len(samples))
                f.write(b"".join(line(names[offsets[i]:offsets[i + 1]].tobytes(), label)
                                 for i, label in zip(range(a, b), samples.labels[a:b].tolist())))

    atomic_write(path, write)


def bad_list_path(list_path: str | os.PathLike) -> Path:
    """Where the bad files of the scan list `list_path` are listed: `LIST.bad.txt` beside it."""
    return sidecar(list_path, "bad.txt")


def write_bad_list(list_path: str | os.PathLike, bad: list[tuple[str, str]]) -> Path | None:
    """`bad_list_path(list_path)`, written atomically: one `path<TAB>reason` line per (path, reason)
    (the path quoted as the list format does, so a tab or newline in a name cannot split a line);
    an empty `bad` removes a stale one. Returns the path written, or None."""
    path = bad_list_path(list_path)
    if not bad:
        path.unlink(missing_ok=True)
        return None
    text = "".join(f"{quote_path(p)}\t{r}\n" for p, r in bad)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape"))


def check_output(path: str | os.PathLike, flag: str = "") -> Path:
    """`path` if a file can be written there (its folder is created), else DatasetError naming
    it: checked before any work, so a long scan or conversion never ends on a bad output path."""
    path = Path(path)
    name = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise DatasetError(f"{name} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except (FileExistsError, NotADirectoryError):
        parent = next((p for p in path.parents if p.exists()), path.parent)
        raise DatasetError(f"cannot write {name}: {parent} is a file, not a folder") from None
    except OSError as e:
        raise DatasetError(f"cannot write {name}: {e.strerror or e} in {path.parent}") from None
    return path
