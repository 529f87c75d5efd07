"""Checks every image of a dataset once, in parallel: which decode, which do not, and why.

Real ImageNet holds CMYK and grayscale JPEGs, a PNG named `.JPEG`, huge and tiny images; all of
those decode (PIL reads them, `load_rgb` makes them RGB). Truncated files, zero-byte files and
non-images do not. `scan_images` sorts them; `simmim scan SRC` writes the clean `path label` list
(which every loader accepts as data.path) and a JSON report of the bad files; `simmim convert`
uses the same check before writing a `.beton`.

A JPEG is checked by decoding its whole entropy-coded stream at a reduced DCT scale (PIL's draft
mode), which finds truncation and corruption for a fraction of a full decode's cost.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .folder import DatasetError, SampleList, scan_folder, sidecar

log = logging.getLogger(__name__)

# ImageNet's largest images are ~10k px on a side; refuse only absurd sizes (PIL's default bomb
# guard stops at ~179 Mpx).
Image.MAX_IMAGE_PIXELS = 1 << 30


def open_rgb(path: str, max_side: int | None = None) -> Image.Image:
    """Decode `path` as RGB. With `max_side`, a JPEG is decoded at the smallest DCT scale that
    still covers max_side on both sides (exact downscaling happens later)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if max_side is not None and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))
            img.load()
            if img.width < 1 or img.height < 1:
                raise ValueError(f"empty image ({img.width}x{img.height})")
            return img.convert("RGB") if img.mode != "RGB" else img.copy()


def decode_checked(path: str, max_side: int | None = None) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) if `path` decodes (`open_rgb` at `max_side`), else (None, a one-line
    reason): the one rule `scan`, `convert` and the loaders' skipping agree on."""
    try:
        if os.path.getsize(path) == 0:
            return None, "zero bytes"
        return open_rgb(path, max_side), None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def check_image(path: str) -> str | None:
    """None if the file decodes to an RGB image, else a one-line reason (decoded at the smallest
    DCT scale: the whole entropy-coded stream is read, few pixels are made)."""
    return decode_checked(path, max_side=1)[1]


def _check_chunk(paths: list[str]) -> list[tuple[int, str]]:
    """(position in the chunk, reason) of each path that does not decode."""
    return [(k, err) for k, p in enumerate(paths) if (err := check_image(p)) is not None]


@dataclass
class ScanResult:
    good: SampleList
    bad: list[tuple[str, str]]  # (path, reason)
    classes: list[str]
    seconds: float = 0.0

    def report(self) -> dict:
        return {"images": len(self.good) + len(self.bad), "good": len(self.good), "bad": len(self.bad),
                "seconds": round(self.seconds, 2), "classes": len(self.classes),
                "bad_files": [{"path": p, "error": e} for p, e in self.bad]}


def scan_images(samples: SampleList, classes: list[str], workers: int = 0, chunk: int = 128,
                on_error: str = "skip", progress: bool = True) -> ScanResult:
    """Checks every sample; on_error 'fail' raises DatasetError naming the first bad file.

    Linear in the number of samples: chunks are cut from the sample arrays as they are submitted,
    at most `4 * workers` chunks are in flight at a time (results come back in order), and only
    the bad files are kept (the clean list is one index gather at the end)."""
    if on_error not in ("skip", "fail"):
        raise DatasetError(f"on_error must be 'skip' or 'fail', got '{on_error}'")
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    n = len(samples)
    starts = range(0, n, chunk)
    bad_index: list[int] = []
    bad: list[tuple[str, str]] = []
    bar = tqdm(total=n, desc="scan", unit="img", disable=not progress, mininterval=1.0)
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(starts) > 1 else None
    try:
        for start, got in _in_order(pool, starts, lambda a: samples.paths(a, a + chunk), 4 * workers):
            for k, err in got:
                path = samples.path(start + k)
                if on_error == "fail":
                    raise DatasetError(f"cannot decode {path} ({err}); use --on-error skip to leave it out")
                bad_index.append(start + k)
                bad.append((path, err))
            bar.update(min(chunk, n - start))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    keep = np.ones(n, dtype=bool)
    keep[bad_index] = False
    for path, err in bad:
        log.warning("skipping %s (%s)", path, err)
    return ScanResult(samples.take(np.flatnonzero(keep)), bad, classes, time.perf_counter() - t0)


def _in_order(pool, starts, make_chunk, in_flight: int):
    """(start, _check_chunk(make_chunk(start))) for each start, in order; with a pool, at most
    `in_flight` chunks submitted ahead of the one being consumed."""
    if pool is None:
        for a in starts:
            yield a, _check_chunk(make_chunk(a))
        return
    pending: deque = deque()
    it = iter(starts)
    for a in it:
        pending.append((a, pool.submit(_check_chunk, make_chunk(a))))
        if len(pending) >= in_flight:
            break
    while pending:
        a, future = pending.popleft()
        result = future.result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(_check_chunk, make_chunk(nxt))))
        yield a, result


def write_json(path: Path, obj) -> None:
    from simmim.trainer.checkpoint import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def write_file_list(path: Path, samples: SampleList, block: int = 65536) -> None:
    """`path label` per line, absolute paths (the format `scan_folder` reads), written a block of
    lines at a time into a temporary file renamed into place."""
    from simmim.trainer.checkpoint import atomic_write

    root = os.fsencode(os.path.join(os.path.abspath(samples.root), "")) if samples.root else None

    def lines(a: int, b: int) -> bytes:
        names, offsets = samples.names, samples.offsets
        out = []
        for i, label in zip(range(a, b), samples.labels[a:b].tolist()):
            name = names[offsets[i]:offsets[i + 1]].tobytes()
            full = root + name if root is not None else os.fsencode(os.path.abspath(os.fsdecode(name)))
            out.append(b"%s %d\n" % (full, label))
        return b"".join(out)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for a in range(0, len(samples), block):
                f.write(lines(a, min(a + block, len(samples))))

    atomic_write(path, write)


def clean_list_path(src: str | os.PathLike) -> Path:
    """Where `simmim scan SRC` writes its clean list by default: `SRC.clean.txt` beside SRC."""
    return Path(str(Path(src).resolve()).rstrip("/") + ".clean.txt")


def scan_command(src: str, out: str | None, workers: int, on_error: str) -> ScanResult:
    """`simmim scan SRC [--out LIST]`: writes LIST (clean `path label` list), LIST's classes file
    and a JSON report of the bad files beside it."""
    samples, classes = scan_folder(src)
    result = scan_images(samples, classes, workers, on_error=on_error)
    out_path = Path(out) if out else clean_list_path(src)
    if not result.good:
        raise DatasetError(f"no image under {src} decodes")
    write_file_list(out_path, result.good)
    write_json(sidecar(out_path, "classes.json"), classes)
    write_json(sidecar(out_path, "report.json"), result.report())
    rate = len(samples) / max(result.seconds, 1e-9)
    print(f"scanned {len(samples)} images in {result.seconds:.1f}s ({rate:.0f} img/s): "
          f"{len(result.good)} good, {len(result.bad)} bad -> {out_path}")
    return result
