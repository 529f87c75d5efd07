"""`simmim convert SRC DST.beton` and `simmim inspect X.beton`.

Conversion: scan every image once (`scan.scan_images`: hostile-but-valid files decode, broken ones
are skipped and reported, or stop the run with `on_error='fail'`), then FFCV's writer stores each
good image as RGB, its longer side capped at `max_resolution`, with its integer label. The output
is written under a temporary name and renamed into place at the end, so an interrupted run never
leaves a DST that looks complete; the class list (`DST.classes.json`) and the report
(`DST.report.json`: counts, images/sec, bad files) are written beside it.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import numpy as np

from .folder import DatasetError, read_classes, scan_folder, sidecar
from .decode import MAX_PIXELS, decode_rgb
from .scan import check_output, scan_images, write_json

log = logging.getLogger(__name__)

WRITE_MODES = ("jpg", "raw", "proportion", "smart")


class ConvertDataset:
    """Indexable for FFCV's writer: (uint8 HxWx3 image, label), longer side <= max_resolution.

    FFCV's writer waits forever for a worker that raised, so no exception may leave here: a file
    that decoded in the scan but not now (it changed meanwhile) is written as a 1x1 black image
    and named in `failed_dir`, and the conversion then fails.
    """

    def __init__(self, samples: list[tuple[str, int]], max_resolution: int | None, failed_dir: Path,
                 max_pixels: int = MAX_PIXELS):
        self.samples, self.max_resolution, self.failed_dir = samples, max_resolution, failed_dir
        self.max_pixels = max_pixels
        self.current = ""  # the sample this worker is on, for a one-line error if FFCV's encode fails

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        self.current = path
        try:
            return self.load(path), label
        except Exception as e:  # noqa: BLE001 - see the class docstring
            (self.failed_dir / f"{i}").write_text(f"{path}: {type(e).__name__}: {e}")
            return np.zeros((1, 1, 3), np.uint8), label

    def load(self, path: str) -> np.ndarray:
        import cv2

        img = np.asarray(decode_rgb(path, self.max_pixels, draft=self.max_resolution))
        h, w = img.shape[:2]
        size = stored_shape(w, h, self.max_resolution)
        if size != (w, h):
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(img)


def convert(src: str, dst: str, max_resolution: int = 256, write_mode: str = "jpg",
            compress_probability: float = 0.5, jpeg_quality: int = 90, workers: int = 0,
            chunk_size: int = 100, limit: int = 0, on_error: str = "skip", force: bool = False,
            page_size: int = 0, progress: bool = True, max_pixels: int = MAX_PIXELS) -> dict:
    """Writes DST (an FFCV .beton) from a class-folder tree or a `path label` list; returns the
    report (also written to DST.report.json).

    page_size: bytes per .beton page, a power of two; 0: sized for the largest sample (at least
    FFCV's 4 MiB). Every sample must fit in one page; a page_size that cannot hold the largest
    raises DatasetError naming it before anything is written. A writer worker that fails ends
    the run with DatasetError (one line).
    """
    dst_path = Path(dst)
    if write_mode not in WRITE_MODES:
        raise DatasetError(f"write mode must be one of {', '.join(WRITE_MODES)}, got '{write_mode}'")
    if not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"JPEG quality must be in 1..100, got {jpeg_quality}")
    if page_size:
        check_page_size(page_size)
    if dst_path.is_dir():
        raise DatasetError(f"{dst_path} is a directory; give a file name such as train.beton")
    if dst_path.exists() and not force:
        raise DatasetError(f"{dst_path} exists; pass --force to overwrite it")
    samples, classes = scan_folder(src)  # the walk only: the output is checked before any decoding
    check_output(dst_path)
    if limit:
        # a spread over all classes rather than the first class only
        step = max(1, len(samples) // limit)
        samples = samples[::step][:limit]
    workers = workers or os.cpu_count() or 1
    log.info("checking %d images from %s", len(samples), src)
    scan = scan_images(samples, classes, workers, on_error=on_error, progress=progress, max_pixels=max_pixels)
    if not scan.good:
        raise DatasetError(f"no image under {src} decodes")
    page_size = fit_page_size(scan.good, scan.sizes, max_resolution, page_size)
    from ffcv.fields import IntField, RGBImageField  # after the checks: importing FFCV takes seconds

    from .ffcv_writer import CheckedWriter, WriterFailed

    dst_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_path.with_name(f".{dst_path.name}.{os.getpid()}.tmp")
    failed_dir = dst_path.with_name(f".{dst_path.name}.{os.getpid()}.failed")
    failed_dir.mkdir(exist_ok=True)
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     jpeg_quality=jpeg_quality, compress_probability=compress_probability),
              "label": IntField()}
    t0 = time.perf_counter()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a killed conversion still removes its temp file
    try:
        writer = CheckedWriter(str(tmp), fields, failed_dir, page_size, workers, progress)
        try:
            writer.from_indexed_dataset(ConvertDataset(scan.good, max_resolution, failed_dir, max_pixels),
                                        chunksize=chunk_size)
        except WriterFailed as e:
            raise DatasetError(f"conversion stopped: {e}") from None
        failed = sorted(p.read_text() for p in failed_dir.iterdir() if p.name.isdigit())
        if failed:
            raise DatasetError(f"{len(failed)} file(s) changed during conversion, e.g. {failed[0]}; run again")
        seconds = time.perf_counter() - t0
        report = {**scan.report(), "written": len(scan.good), "write_seconds": round(seconds, 2),
                  "images_per_sec": round(len(scan.good) / max(seconds, 1e-9), 1),
                  "source": str(Path(src).resolve()), "max_resolution": max_resolution,
                  "write_mode": write_mode, "jpeg_quality": jpeg_quality, "page_size": page_size,
                  "bytes": tmp.stat().st_size}
        write_json(sidecar(dst_path, "classes.json"), classes)
        write_json(sidecar(dst_path, "report.json"), report)
        os.replace(tmp, dst_path)
    finally:
        signal.signal(signal.SIGTERM, previous)
        tmp.unlink(missing_ok=True)
        for p in failed_dir.iterdir():
            p.unlink()
        failed_dir.rmdir()
    log.info("wrote %s: %d images (%d skipped) in %.1fs, %.0f images/sec, %.1f MB", dst_path,
             len(scan.good), len(scan.bad), seconds, report["images_per_sec"], report["bytes"] / 1e6)
    return report


def stored_shape(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """(width, height) as written: the longer side capped at max_resolution, at least one pixel on
    the short side (a 10000x10 image must not round to 0 rows)."""
    if max_resolution and max(width, height) > max_resolution:
        r = max_resolution / max(width, height)
        return max(1, round(width * r)), max(1, round(height * r))
    return width, height


def fit_page_size(samples: list[tuple[str, int]], sizes: list[tuple[int, int]], max_resolution: int | None,
                  page_size: int = 0) -> int:
    """The .beton page size for these samples (their header sizes): 0 picks the smallest power of
    two >= 4 MiB that holds the largest as raw RGB plus a quarter (a JPEG of noise can exceed its
    raw size); a given page_size is checked instead. DatasetError names the sample that does not fit."""
    need = [3 * w * h for w, h in (stored_shape(w, h, max_resolution) for w, h in sizes)]
    i = max(range(len(need)), key=need.__getitem__)
    largest = need[i] + need[i] // 4 + 4096
    if page_size:
        check_page_size(page_size)
        if largest > page_size:
            raise DatasetError(f"{samples[i][0]} needs up to {largest} bytes, more than the page of {page_size}: "
                               f"raise --page-size (or 0: sized for the largest sample), or lower --max-resolution")
        return page_size
    size = 1 << 22
    while size < largest:
        size <<= 1
    if size >= 1 << 32:
        raise DatasetError(f"{samples[i][0]} needs {largest} bytes, over FFCV's 4 GiB page; lower --max-resolution")
    if size > 1 << 22:
        log.info("page size %d MiB, for %s", size >> 20, samples[i][0])
    return size


def check_page_size(page_size: int) -> int:
    """A --page-size FFCV can use (a power of two, 2 MiB..2 GiB), else DatasetError."""
    if page_size & (page_size - 1) or not (1 << 21) <= page_size < (1 << 32):
        raise DatasetError(f"--page-size must be a power of two in 2 MiB..2 GiB (or 0: sized for the largest "
                           f"sample), got {page_size}")
    return page_size


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def open_beton(path: str | os.PathLike):
    """FFCV's Reader, with a one-line error for a missing or foreign file."""
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"'{path}' does not exist (write it with `simmim convert SRC {path}`)")
    try:
        return Reader(str(path))
    except Exception as e:  # noqa: BLE001 - ffcv raises assorted errors for foreign files
        raise DatasetError(f"'{path}' is not an FFCV .beton ({type(e).__name__}: {e})") from None


def inspect(path: str, decode: bool = True, workers: int = 0) -> dict:
    """Samples, labels, resolutions, and (decode=True) a check that every sample decodes."""
    reader = open_beton(path)
    meta = reader.metadata
    if "image" not in reader.field_names or "label" not in reader.field_names:
        raise DatasetError(f"'{path}' has fields {reader.field_names}; expected image and label")
    image, label = (meta[f"f{reader.field_names.index(k)}"] for k in ("image", "label"))
    labels = np.asarray(label).reshape(-1).astype(np.int64)
    w, h = image["width"].astype(np.int64), image["height"].astype(np.int64)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    present = counts[counts > 0]
    classes = read_classes(path)
    info = {
        "file": str(path), "samples": int(reader.num_samples), "bytes": os.path.getsize(path),
        "page_size": int(reader.page_size),
        "classes": len(classes) if classes is not None else int(len(present)),
        "labels": {"min": int(labels.min()), "max": int(labels.max()), "distinct": int(len(present)),
                   "per_class_min": int(present.min()), "per_class_median": float(np.median(present)),
                   "per_class_max": int(present.max())} if len(labels) else {},
        "jpeg_fraction": float(np.mean(image["mode"] == 0)) if len(labels) else 0.0,
        "width": _stats(w), "height": _stats(h), "longer_side": _stats(np.maximum(w, h)),
        "aspect": _stats(w / np.maximum(h, 1)),
    }
    if decode:
        info["decode_failures"] = decode_all(path, reader, workers)
    return info


def _stats(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {}
    return {"min": float(np.min(x)), "median": float(np.median(x)), "mean": round(float(np.mean(x)), 3),
            "max": float(np.max(x))}


def decode_all(path: str, reader, workers: int = 0) -> list[int]:
    """Decodes every image through FFCV's own decoder (one pass, small centre crops); returns the
    indices that fail. A failing batch is retried one sample at a time to name the culprits."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    def run(indices, batch):
        loader = Loader(str(path), batch_size=batch, num_workers=workers or os.cpu_count() or 1,
                        order=OrderOption.SEQUENTIAL, indices=indices, drop_last=False,
                        pipelines={"image": [CenterCropRGBImageDecoder((8, 8), 1.0)], "label": None})
        for _ in loader:
            pass

    all_idx = np.arange(reader.num_samples, dtype=np.uint64)
    try:
        run(all_idx, 256)
        return []
    except Exception:  # noqa: BLE001 - narrow down below
        failures = []
        for i in all_idx:
            try:
                run(np.array([i], dtype=np.uint64), 1)
            except Exception:  # noqa: BLE001
                failures.append(int(i))
        return failures


def format_inspect(info: dict) -> str:
    lines = [f"{info['file']}: {info['samples']} samples, {info['bytes'] / 1e6:.1f} MB, "
             f"{info['classes']} classes, {100 * info['jpeg_fraction']:.0f}% JPEG"]
    if info["labels"]:
        lab = info["labels"]
        lines.append(f"labels {lab['min']}..{lab['max']} ({lab['distinct']} present); per class "
                     f"min {lab['per_class_min']}, median {lab['per_class_median']:g}, max {lab['per_class_max']}")
    for key in ("width", "height", "longer_side", "aspect"):
        s = info[key]
        if s:
            lines.append(f"{key:12s} min {s['min']:g}  median {s['median']:g}  mean {s['mean']:g}  max {s['max']:g}")
    if "decode_failures" in info:
        bad = info["decode_failures"]
        lines.append("every sample decodes" if not bad else f"{len(bad)} samples fail to decode: {bad[:20]}")
    return "\n".join(lines)
