"""Checks every image of a dataset once, in parallel: which decode, which do not, and why.

Real ImageNet holds CMYK and grayscale JPEGs, a PNG named `.JPEG`, huge and tiny images; all of
those decode. Truncated files, zero-byte files, non-images, formats DALI does not read and images
over the pixel limit do not. The check is the loaders' own decode (`decode.check_image`, by
`decode.decode_rgb`'s rules), so a file the scan keeps decodes in every loader, and to the same
pixels. `scan_images` sorts them; `simmim scan SRC` writes the clean list (`folder`'s list format;
every loader accepts it as data.path) and a JSON report of the bad files; `simmim convert` uses
the same check before writing a `.beton`.

A JPEG is checked by decoding its whole entropy-coded stream at a reduced DCT scale (PIL's draft
mode), which finds truncation and corruption for a fraction of a full decode's cost.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .decode import MAX_PIXELS, check_image, check_max_pixels
from .folder import DatasetError, scan_folder, write_list_text

log = logging.getLogger(__name__)


def _check_chunk(paths: list[str], max_pixels: int = MAX_PIXELS) -> list[tuple[str | None, tuple[int, int]]]:
    return [check_image(p, max_pixels) for p in paths]


@dataclass
class ScanResult:
    good: list[tuple[str, int]]
    bad: list[tuple[str, str]]  # (path, reason)
    classes: list[str]
    seconds: float = 0.0
    sizes: list[tuple[int, int]] | None = None  # (width, height) of each good image, from its header

    def report(self) -> dict:
        return {"images": len(self.good) + len(self.bad), "good": len(self.good), "bad": len(self.bad),
                "seconds": round(self.seconds, 2), "classes": len(self.classes),
                "bad_files": [{"path": p, "error": e} for p, e in self.bad]}


def scan_images(samples: list[tuple[str, int]], classes: list[str], workers: int = 0,
                chunk: int = 64, on_error: str = "skip", progress: bool = True,
                max_pixels: int = MAX_PIXELS) -> ScanResult:
    """Checks every sample by the loaders' decode rules (`max_pixels`: the pixel limit); on_error
    'fail' raises DatasetError naming the first bad file."""
    if on_error not in ("skip", "fail"):
        raise DatasetError(f"on_error must be 'skip' or 'fail', got '{on_error}'")
    try:
        check_max_pixels(max_pixels, "the pixel limit (--max-pixels)")
    except ValueError as e:
        raise DatasetError(str(e)) from None
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    paths = [p for p, _ in samples]
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    errors: list[str | None] = []
    sizes: list[tuple[int, int]] = []
    check = functools.partial(_check_chunk, max_pixels=max_pixels)
    bar = tqdm(total=len(paths), desc="scan", unit="img", disable=not progress, mininterval=1.0)
    if workers == 1 or len(chunks) == 1:
        results = map(check, chunks)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(check, chunks)
    try:
        for got in results:
            for path, (err, _) in zip(paths[len(errors):], got):
                if err is not None and on_error == "fail":
                    raise DatasetError(f"cannot decode {path} ({err}); use --on-error skip to leave it out")
            errors += [e for e, _ in got]
            sizes += [size for _, size in got]
            bar.update(len(got))
    except BrokenProcessPool:  # a worker killed (out of memory, a signal): one line, not a traceback
        chunk_paths = paths[len(errors):len(errors) + chunk]
        raise DatasetError(f"a scan worker died while checking files from {chunk_paths[0]!r} on (out of memory?); "
                           f"lower --workers or --max-pixels") from None
    finally:
        bar.close()
        if workers != 1 and len(chunks) > 1:
            pool.shutdown(cancel_futures=True)
    good = [s for s, e in zip(samples, errors) if e is None]
    bad = [(s[0], e) for s, e in zip(samples, errors) if e is not None]
    for path, err in bad:
        log.warning("skipping %r (%s)", path, err)
    good_sizes = [size for size, e in zip(sizes, errors) if e is None]
    return ScanResult(good, bad, classes, time.perf_counter() - t0, good_sizes)


def write_json(path: Path, obj) -> None:
    from simmim.trainer.checkpoint import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def write_file_list(path: Path, samples: list[tuple[str, int]]) -> None:
    """The list format of `folder` (what `scan_folder` reads), absolute paths."""
    from simmim.trainer.checkpoint import atomic_write

    text = write_list_text(samples)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape"))


def clean_list_path(src: str | os.PathLike) -> Path:
    """Where `simmim scan SRC` writes its clean list by default: `SRC.clean.txt` beside SRC."""
    return Path(str(Path(src).resolve()).rstrip("/") + ".clean.txt")


def check_output(path: str | os.PathLike, flag: str = "") -> Path:
    """`path` if a file can be written there (its folder is created), else DatasetError naming
    it: checked before any work, so a long scan or conversion never ends on a bad output path."""
    import tempfile

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


def scan_command(src: str, out: str | None, workers: int, on_error: str,
                 max_pixels: int = MAX_PIXELS) -> ScanResult:
    """`simmim scan SRC [--out LIST]`: writes LIST (clean `path label` list), LIST's classes file,
    a JSON report of the bad files and the record the loaders check the list against
    (`scanlist`) beside it."""
    from .scanlist import entries_of, file_stat, write_scan

    samples, classes = scan_folder(src)  # the walk only: the output is checked before any decoding
    out_path = check_output(out, "--out") if out else check_output(clean_list_path(src))
    stats = {p: st for p, _ in samples if (st := file_stat(p)) is not None}
    result = scan_images(samples, classes, workers, on_error=on_error, max_pixels=max_pixels)
    if not result.good:
        raise DatasetError(f"no image under {src} decodes")
    write_scan(out_path, result, entries_of(result, stats), max_pixels)
    rate = len(samples) / max(result.seconds, 1e-9)
    print(f"scanned {len(samples)} images in {result.seconds:.1f}s ({rate:.0f} img/s): "
          f"{len(result.good)} good, {len(result.bad)} bad -> {out_path}")
    return result
