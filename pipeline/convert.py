"""`simmim convert SRC DST.beton` and `simmim inspect X.beton`.

Conversion is one pass: FFCV's writer workers decode each image (`decode.decode_rgb`: the rules
`simmim scan` and every loader follow; hostile-but-valid files decode, broken ones do not) and
store it as RGB,
its longer side capped at `max_resolution`, with its integer label. A file that does not decode
is written as a 1x1 placeholder and recorded; at the end the placeholders are dropped from the
.beton's tables (`drop_samples`), so the output holds exactly the good images, in source order,
and the bad ones are reported (or, with `on_error='fail'`, the run stops naming the first).
Nothing waits for a separate check of the whole tree: the first samples are written seconds after
the listing. The output is written under a temporary name and renamed into place at the end, so
an interrupted run never leaves a DST that looks complete; the class list (`DST.classes.json`)
and the report (`DST.report.json`: counts, images/sec, bad files) are written beside it. The
page size is fixed before anything is read: from `max_resolution` (no stored image is larger), or,
at full resolution, from the image headers (read, not decoded). A writer worker that fails ends
the run in one line (`ffcv_writer.CheckedWriter`).

Per-channel statistics (`stats.py`: what a run normalises with when data.mean is empty) go beside
the .beton as `DST.stats.json`: the source's statistics file (`simmim scan SRC --stats`), copied
when it is for the same `channels`; else, with `stats=True`, measured in the conversion's own pass,
on each image as stored (decoded, longer side capped at max_resolution, before FFCV's JPEG
encoding; for `channels=1` its luma by PIL's `convert("L")`, the rule the FFCV loader's
`channels.luma` follows): each writer worker accumulates its images (`stats.ChannelMoments`) and
the parent merges the workers. Without `stats`, no per-image work is added.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from simmim.core.errors import DatasetError
from simmim.core.io import write_json

from .decode import MAX_PIXELS, DecodeError, decode_rgb
from .ffcv_compat import keep_torch_threads
from .folder import SampleList, folder_classes, read_classes, scan_folder, sidecar, walk_tree
from .scan import check_output
from .skips import log_skips, no_image_error
from .stats import STATS_SUFFIX, ChannelMoments, read_stats, stats_path, write_stats

log = logging.getLogger(__name__)

WRITE_MODES = ("jpg", "raw", "proportion", "smart")
STOP = "stop"  # the marker file that tells every writer worker to stop decoding (on_error='fail')
MOMENTS = "moments-"  # a writer worker's statistics (`ConvertDataset.worker_done`), one .npy per process


class ConvertDataset:
    """Indexable for FFCV's writer: (uint8 HxWx3 image, label), longer side <= max_resolution.

    Runs in the writer's worker processes and decodes each image exactly once. FFCV's writer waits
    forever for a worker that raised, so no exception may leave here: a file that does not decode
    is returned as a 1x1 black placeholder and recorded as `failed_dir/<index>` (JSON
    [path, reason]); `convert` drops the placeholders afterwards. With `stop_on_error`, the first
    failure also writes `failed_dir/stop` and the remaining samples are placeholders too (no more
    decoding), so a failing run ends quickly.

    With `measure_channels` (1 or 3), each worker process also accumulates the per-channel
    statistics of the images it stores (`moments`; placeholders are not counted) and writes them to
    `failed_dir/moments-<pid>.npy` once its work is done (`worker_done`, which
    `ffcv_writer._guarded_worker` calls); `merge_moments` adds them up.
    """

    def __init__(self, samples: SampleList, max_resolution: int | None, failed_dir: Path,
                 stop_on_error: bool = False, max_pixels: int = MAX_PIXELS, measure_channels: int = 0):
        self.samples, self.max_resolution, self.failed_dir = samples, max_resolution, failed_dir
        self.stop_on_error, self.max_pixels = stop_on_error, max_pixels
        self.current = ""  # the sample this worker is on, for a one-line error if FFCV's encode fails
        self.moments = ChannelMoments(measure_channels) if measure_channels else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        self.current = path
        if self.stop_on_error and (self.failed_dir / STOP).exists():
            return np.zeros((1, 1, 3), np.uint8), label
        try:
            img = self.resize(np.asarray(decode_rgb(path, self.max_pixels, draft=self.max_resolution)))
            if self.moments is not None:
                self.measure(img)
            return img, label
        except DecodeError as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            err = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        (self.failed_dir / f"{i}").write_text(json.dumps([path, err]))
        if self.stop_on_error:
            (self.failed_dir / STOP).touch()
        return np.zeros((1, 1, 3), np.uint8), label

    def measure(self, img: np.ndarray) -> None:
        """Adds a stored image (uint8 (H, W, 3) RGB) to `moments`, in [0, 1] units (/ 255); for one
        channel its luma, the values a grey FFCV run trains on (PIL's rule, as `channels.luma`)."""
        if len(self.moments.mean) == 1:
            img = np.asarray(Image.fromarray(img).convert("L"))
        self.moments.add_image(img, 255.0)

    def worker_done(self) -> None:
        """In a writer worker, after its last sample: its moments, float64 (3, C) rows count, mean,
        m2, for the parent (`merge_moments`)."""
        if self.moments is not None:
            m = self.moments
            rows = np.stack([np.full_like(m.mean, m.count), m.mean, m.m2])
            np.save(self.failed_dir / f"{MOMENTS}{os.getpid()}.npy", rows)

    def resize(self, img: np.ndarray) -> np.ndarray:
        import cv2

        h, w = img.shape[:2]
        size = stored_shape(w, h, self.max_resolution)
        if size != (w, h):
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(img)


def list_samples(src: str, limit: int = 0) -> tuple[SampleList, list[str]]:
    """The samples to convert. With `limit` on a class-folder tree: `limit` images spread over the
    classes (evenly spaced classes when limit < classes, else limit // classes per class, the
    first ones each folder lists), reading only as much of each folder as needed, never the whole
    tree (`folder.walk_tree` with a quota); on an unlabeled folder, the first `limit` images of its
    walk; on a list file, every `len // limit`-th entry."""
    path = Path(src)
    if not limit or not path.is_dir():
        samples, classes = scan_folder(src)
        if limit:
            samples = samples[::max(1, len(samples) // limit)][:limit]
        return samples, classes
    classes = folder_classes(path)
    if classes is None:  # unlabeled: the first `limit` images of the tree
        samples, classes, quota = walk_tree(path, [""], {0: limit}), [], None
    elif limit < len(classes):
        quota = {int(c): 1 for c in np.linspace(0, len(classes) - 1, limit).round()}
    else:
        quota = {c: limit // len(classes) + (c < limit % len(classes)) for c in range(len(classes))}
    if quota is not None:
        samples = walk_tree(path, classes, quota)
    if not len(samples):
        raise DatasetError(f"data path '{src}' has {len(classes)} class folders but no images" if classes else
                           f"data path '{src}' has no images")
    return samples, classes


def check_arguments(dst_path: Path, write_mode: str, jpeg_quality: int, on_error: str, page_size: int,
                    force: bool, channels: int = 3) -> None:
    """`convert`'s options and output, checked before the listing and any decoding; DatasetError
    (one line) for a bad value, a folder or existing file as DST (without force), or an unwritable
    place."""
    if channels not in (1, 3):
        raise DatasetError(f"--channels must be 1 or 3 (FFCV reads RGB, and grey as its luma), got {channels}")
    if write_mode not in WRITE_MODES:
        raise DatasetError(f"write mode must be one of {', '.join(WRITE_MODES)}, got '{write_mode}'")
    if not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"JPEG quality must be in 1..100, got {jpeg_quality}")
    if on_error not in ("skip", "fail"):
        raise DatasetError(f"on_error must be 'skip' or 'fail', got '{on_error}'")
    if page_size:
        check_page_size(page_size)
    if dst_path.is_dir():
        raise DatasetError(f"{dst_path} is a directory; give a file name such as train.beton")
    if dst_path.exists() and not force:
        raise DatasetError(f"{dst_path} exists; pass --force to overwrite it")
    check_output(dst_path)


def convert(src: str, dst: str, max_resolution: int = 256, write_mode: str = "jpg",
            compress_probability: float = 0.5, jpeg_quality: int = 90, workers: int = 0,
            chunk_size: int = 100, limit: int = 0, on_error: str = "skip", force: bool = False,
            page_size: int = 0, progress: bool = True, max_pixels: int = MAX_PIXELS, channels: int = 3,
            stats: bool = False) -> dict:
    """Writes DST (an FFCV .beton) from a class-folder tree or a `path label` list; returns the
    report (also written to DST.report.json).

    channels: the data.channels the .beton is for (1 or 3; it stores RGB either way), whose
    statistics go beside it as DST.stats.json: the source's (`simmim scan --stats`), else with
    `stats` measured in this pass (module docstring). The report's "stats" says which ("" if none).

    page_size: bytes per .beton page, a power of two; 0: sized for the largest sample (at least
    FFCV's 4 MiB). Every sample must fit in one page; a page_size that cannot hold the largest
    raises DatasetError naming it before anything is written. A writer worker that fails ends
    the run with DatasetError (one line).
    """
    dst_path = Path(dst)
    check_arguments(dst_path, write_mode, jpeg_quality, on_error, page_size, force, channels)
    t0 = time.perf_counter()
    held = source_statistics(src, channels)
    samples, classes = list_samples(src, limit)
    workers = workers or os.cpu_count() or 1
    page_size = fit_page_size(samples, max_resolution, page_size)
    log.info("converting %d images from %s", len(samples), src)
    fields = beton_fields(write_mode, max_resolution, jpeg_quality, compress_probability)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_path.with_name(f".{dst_path.name}.{os.getpid()}.tmp")
    failed_dir = dst_path.with_name(f".{dst_path.name}.{os.getpid()}.failed")
    failed_dir.mkdir(exist_ok=True)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a killed conversion still removes its temp file
    try:
        dataset = ConvertDataset(samples, max_resolution, failed_dir, on_error == "fail", max_pixels,
                                 channels if stats and held is None else 0)
        write_samples(tmp, fields, dataset, page_size, workers, chunk_size, progress)
        bad = drop_failures(tmp, failed_dir, len(samples), src, on_error, sidecar(dst_path, "report.json"))
        seconds = time.perf_counter() - t0
        measured = merge_moments(failed_dir, channels) if dataset.moments is not None else None
        origin = save_statistics(dst_path, held, measured, len(samples) - len(bad))
        report = conversion_report(src, len(samples), len(classes), bad, seconds, tmp.stat().st_size,
                                   max_resolution=max_resolution, write_mode=write_mode, jpeg_quality=jpeg_quality,
                                   page_size=page_size, stats=origin)
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
             report["written"], report["bad"], seconds, report["images_per_sec"], report["bytes"] / 1e6)
    return report


def source_statistics(src: str, channels: int) -> tuple[Path, dict] | None:
    """(path, contents) of the statistics file beside the source (`stats.stats_path`: what
    `simmim scan SRC --stats` wrote), if it holds `channels` values (else None, with a warning);
    ConfigError (one line) for one that is unreadable or has a std of 0. Read before anything is
    converted."""
    found = stats_path(src)
    if not found.is_file():
        return None
    try:
        held = json.loads(found.read_text())
        count = len(held["mean"])
    except (OSError, ValueError, KeyError, TypeError):
        held, count = None, channels  # read_stats says what is wrong
    if count != channels:
        log.warning("%s holds statistics of %d channel(s), not --channels %d: not copied beside the .beton",
                    found, count, channels)
        return None
    read_stats(found, channels)
    return found, held


def merge_moments(failed_dir: Path, channels: int) -> ChannelMoments:
    """The statistics of every stored image: the writer workers' (`ConvertDataset.worker_done`)."""
    moments = ChannelMoments(channels)
    for part in sorted(failed_dir.glob(f"{MOMENTS}*.npy")):
        count, mean, m2 = np.load(part)
        moments.merge(int(count[0]), mean, m2)
    return moments


def save_statistics(dst_path: Path, held: tuple[Path, dict] | None, measured: ChannelMoments | None,
                    images: int) -> str:
    """Writes DST.stats.json atomically, in `stats.write_stats`'s format: the source's file `held`
    (`source_statistics`) as it is, else the `measured` statistics of `images` images; with
    neither, removes the one a former DST left (it describes other data). Returns where they came
    from: the source file's path, "measured", or ""."""
    out = sidecar(dst_path, STATS_SUFFIX)
    if held is not None:
        write_json(out, held[1])
        log.info("statistics: %s copied to %s", held[0], out)
        return str(held[0])
    if measured is not None:
        write_stats(dst_path, measured, images)
        log.info("statistics: measured on the %d stored images, written to %s", images, out)
        return "measured"
    out.unlink(missing_ok=True)
    return ""


def beton_fields(write_mode: str, max_resolution: int, jpeg_quality: int, compress_probability: float) -> dict:
    """The .beton's fields: "image" (FFCV's RGBImageField, longer side <= max_resolution) and
    "label" (IntField). Imports FFCV, which takes seconds: call it after the checks."""
    keep_torch_threads()  # importing FFCV sets torch's thread count
    from ffcv.fields import IntField, RGBImageField

    return {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                   jpeg_quality=jpeg_quality, compress_probability=compress_probability),
            "label": IntField()}


def write_samples(path: Path, fields: dict, dataset: ConvertDataset, page_size: int, workers: int,
                  chunk_size: int, progress: bool) -> None:
    """Writes every sample of `dataset` to the .beton at `path` with FFCV's writer in `workers`
    processes (`ffcv_writer.CheckedWriter`), `chunk_size` samples per task; a worker that fails
    raises DatasetError (one line)."""
    from .ffcv_writer import CheckedWriter, WriterFailed  # imports ffcv (optional)

    writer = CheckedWriter(str(path), fields, dataset.failed_dir, page_size, workers, progress)
    try:
        writer.from_indexed_dataset(dataset, chunksize=chunk_size)
    except WriterFailed as e:
        raise DatasetError(f"conversion stopped: {e}") from None


def drop_failures(path: Path, failed_dir: Path, n_samples: int, src: str, on_error: str,
                  report: Path | None = None) -> list[tuple[int, str, str]]:
    """The samples `ConvertDataset` recorded in `failed_dir` as not decoding, (index, path, reason)
    in source order, dropped from the .beton at `path` and told in a few lines (`skips.log_skips`,
    naming `report`, where they are all listed). DatasetError (one line) with on_error='fail',
    naming the first, or when none of the `n_samples` decodes (`skips.no_image_error`)."""
    bad = sorted((int(p.name), *json.loads(p.read_text())) for p in failed_dir.iterdir() if p.name.isdigit())
    if bad and on_error == "fail":
        raise DatasetError(f"cannot decode {bad[0][1]} ({bad[0][2]}); use --on-error skip to leave it out")
    reasons = [(file, err) for _, file, err in bad]
    if len(bad) == n_samples:
        raise no_image_error(src, reasons, n_samples, 3, setting="")
    log_skips(log, "convert", reasons, n_samples, src, report)
    if bad:
        drop_samples(path, np.array([i for i, _, _ in bad], dtype=np.int64))
    return bad


def conversion_report(src: str, images: int, classes: int, bad: list[tuple[int, str, str]], seconds: float,
                      size: int, *, max_resolution: int, write_mode: str, jpeg_quality: int, page_size: int,
                      stats: str = "") -> dict:
    """DST.report.json: counts (images listed, written, bad, classes), seconds from the listing to
    the finished .beton and images written per second, the bad files with their reasons, the
    source (absolute), the options and the .beton's size in bytes."""
    written = images - len(bad)
    return {"images": images, "good": written, "bad": len(bad), "seconds": round(seconds, 2),
            "classes": classes, "bad_files": [{"path": p, "error": e} for _, p, e in bad],
            "written": written, "write_seconds": round(seconds, 2),
            "images_per_sec": round(written / max(seconds, 1e-9), 1),
            "source": str(Path(src).resolve()), "max_resolution": max_resolution,
            "write_mode": write_mode, "jpeg_quality": jpeg_quality, "page_size": page_size, "bytes": size,
            "stats": stats}


def stored_shape(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """(width, height) as written: the longer side capped at max_resolution, at least one pixel on
    the short side (a 10000x10 image must not round to 0 rows)."""
    if max_resolution and max(width, height) > max_resolution:
        r = max_resolution / max(width, height)
        return max(1, round(width * r)), max(1, round(height * r))
    return width, height


def fit_page_size(samples: SampleList, max_resolution: int | None, page_size: int = 0) -> int:
    """The .beton page size: 0 picks the smallest power of two >= 4 MiB that holds the largest
    stored image as raw RGB plus a quarter (a JPEG of noise can exceed its raw size); a given
    page_size is checked instead. The largest is bounded by max_resolution (a max_resolution
    square) without reading anything; at full resolution (0) it is the largest image header's
    (headers are read, not decoded). DatasetError names what does not fit."""
    if max_resolution:
        w = h = max_resolution
        what = f"an image of {max_resolution}x{max_resolution} (--max-resolution)"
    else:
        w, h, what = 0, 0, ""
        for i in range(len(samples)):
            path = samples.path(i)
            try:
                size = image_size(path)
            except Exception:  # noqa: BLE001 - an unreadable file is a placeholder later: no page need
                continue
            if size[0] * size[1] > w * h:
                (w, h), what = size, path
    need = 3 * w * h
    largest = need + need // 4 + 4096
    if page_size:
        check_page_size(page_size)
        if largest > page_size:
            raise DatasetError(f"{what} needs up to {largest} bytes, more than the page of {page_size}: "
                               f"raise --page-size (or 0: sized for the largest sample), or lower --max-resolution")
        return page_size
    size = 1 << 22
    while size < largest:
        size <<= 1
    if size >= 1 << 32:
        raise DatasetError(f"{what} needs {largest} bytes, over FFCV's 4 GiB page; lower --max-resolution")
    if size > 1 << 22:
        log.info("page size %d MiB, for %s", size >> 20, what)
    return size


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding."""
    with Image.open(path) as img:
        return img.size


def drop_samples(path: Path, drop: np.ndarray) -> None:
    """Removes samples `drop` (indices) from the .beton at `path`, in place: the remaining
    samples keep their order and are renumbered 0..; their bytes stay where they are (the dropped
    placeholders' few bytes become unused). Rewrites the header's sample count, the metadata rows
    (where they were) and the allocation table (at its old place, the file cut after it), in
    FFCV's file layout (`ffcv.types`, as `ffcv.reader.Reader` reads it)."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    reader = Reader(str(path))
    keep = np.ones(int(reader.num_samples), dtype=bool)
    keep[drop] = False
    new_id = np.cumsum(keep) - 1
    metadata = reader.metadata[keep]
    alloc = np.array(reader.alloc_table, dtype=ALLOC_TABLE_TYPE)
    alloc = alloc[keep[alloc["sample_id"].astype(np.int64)]]
    alloc["sample_id"] = new_id[alloc["sample_id"].astype(np.int64)]
    header = np.array(reader.header, dtype=HeaderType)
    header["num_samples"] = int(keep.sum())
    with open(path, "r+b") as f:
        f.seek(HeaderType.itemsize + reader.field_descriptors.nbytes)
        f.write(metadata.tobytes())
        f.seek(int(header["alloc_table_ptr"]))
        f.write(alloc.tobytes())
        f.truncate()
        f.seek(0)
        f.write(header.tobytes())


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
    keep_torch_threads()
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
        "unlabeled": classes == [],  # converted from an unlabeled folder or list (every label 0)
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


def decode_all(path: str, reader, workers: int = 0, chunk: int = 1024) -> list[int]:
    """Decodes every image once with FFCV's own decoder (libffcv's `imdecode`, the function its
    loader pipelines call, at full size) and returns the indices that fail: a JPEG that libjpeg-turbo
    reports an error or warning for (FFCV's loader ignores those and trains on whatever came out),
    raw pixels of the wrong size, or data outside the file. O(N) in total, in `workers` threads
    (the decoder releases the GIL)."""

    from ffcv.libffcv import imdecode

    field = reader.metadata[f"f{reader.field_names.index('image')}"]
    table = np.sort(reader.alloc_table, order="ptr")
    ptrs, sizes = table["ptr"].astype(np.int64), table["size"].astype(np.int64)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    mode, height, width = field["mode"], field["height"].astype(np.int64), field["width"].astype(np.int64)
    ptr = field["data_ptr"].astype(np.int64)
    slot = np.minimum(np.searchsorted(ptrs, ptr), len(ptrs) - 1) if len(ptrs) else np.zeros(len(ptr), np.int64)
    found = (ptrs[slot] == ptr) if len(ptrs) else np.zeros(len(ptr), bool)

    def bad(i: int) -> bool:
        if not found[i] or ptr[i] + sizes[slot[i]] > len(data):
            return True
        src = np.asarray(data[ptr[i]:ptr[i] + sizes[slot[i]]])
        h, w = int(height[i]), int(width[i])
        if mode[i] != 0:  # raw RGB
            return src.size < h * w * 3
        dst = np.empty((h, w, 3), np.uint8)
        return imdecode(src, dst, h, w, h, w, 0, 0, 1, 1, False, False) != 0

    def run(start: int) -> list[int]:
        return [i for i in range(start, min(start + chunk, len(field))) if bad(i)]

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return [i for got in pool.map(run, range(0, len(field), chunk)) for i in got]


def format_inspect(info: dict) -> str:
    lines = [f"{info['file']}: {info['samples']} samples, {info['bytes'] / 1e6:.1f} MB, "
             f"{'unlabeled' if info.get('unlabeled') else str(info['classes']) + ' classes'}, "
             f"{100 * info['jpeg_fraction']:.0f}% JPEG"]
    if info["labels"] and not info.get("unlabeled"):
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
