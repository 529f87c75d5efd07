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

import logging
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .folder import DatasetError, scan_folder, sidecar
from .io import write_json, write_text

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


def check_image(path: str) -> str | None:
    """None if the file decodes to an RGB image, else a one-line reason."""
    try:
        if os.path.getsize(path) == 0:
            return "zero bytes"
        open_rgb(path, max_side=1)
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _check_chunk(paths: list[str]) -> list[str | None]:
    return [check_image(p) for p in paths]


@dataclass
class ScanResult:
    good: list[tuple[str, int]]
    bad: list[tuple[str, str]]  # (path, reason)
    classes: list[str]
    seconds: float = 0.0

    def report(self) -> dict:
        return {"images": len(self.good) + len(self.bad), "good": len(self.good), "bad": len(self.bad),
                "seconds": round(self.seconds, 2), "classes": len(self.classes),
                "bad_files": [{"path": p, "error": e} for p, e in self.bad]}


def scan_images(samples: list[tuple[str, int]], classes: list[str], workers: int = 0,
                chunk: int = 64, on_error: str = "skip", progress: bool = True) -> ScanResult:
    """Checks every sample; on_error 'fail' raises DatasetError naming the first bad file."""
    if on_error not in ("skip", "fail"):
        raise DatasetError(f"on_error must be 'skip' or 'fail', got '{on_error}'")
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    paths = [p for p, _ in samples]
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    errors: list[str | None] = []
    bar = tqdm(total=len(paths), desc="scan", unit="img", disable=not progress, mininterval=1.0)
    if workers == 1 or len(chunks) == 1:
        results = map(_check_chunk, chunks)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_check_chunk, chunks)
    try:
        for got in results:
            for path, err in zip(paths[len(errors):], got):
                if err is not None and on_error == "fail":
                    raise DatasetError(f"cannot decode {path} ({err}); use --on-error skip to leave it out")
            errors += got
            bar.update(len(got))
    finally:
        bar.close()
        if workers != 1 and len(chunks) > 1:
            pool.shutdown(cancel_futures=True)
    good = [s for s, e in zip(samples, errors) if e is None]
    bad = [(s[0], e) for s, e in zip(samples, errors) if e is not None]
    for path, err in bad:
        log.warning("skipping %s (%s)", path, err)
    return ScanResult(good, bad, classes, time.perf_counter() - t0)


def write_file_list(path: Path, samples: list[tuple[str, int]]) -> None:
    """`path label` per line, absolute paths (the format `scan_folder` reads), written atomically."""
    write_text(path, "".join(f"{os.path.abspath(p)} {label}\n" for p, label in samples))


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
