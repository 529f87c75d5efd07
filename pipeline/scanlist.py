"""A scan list kept true to the files: what the loaders read instead of re-decoding a folder.

`simmim scan SRC` writes, beside its list `LIST` (`SRC.clean.txt` by default), `LIST.files.json`:
the pixel limit the check used and, for every file it saw, `[size, mtime_ns, pixels, reason]`
(pixels = width x height of a good image, reason = null for a good file, else the one-line reason).
Before the first epoch a loader reads that record and stats every file again (measured on a
shared 2-core machine, 100k unchanged files: 1.0 s of stats, 3.1 s for the whole check with the
walk and the record, next to minutes for an epoch); only files that are new, changed (size or
modification time) or refused for a pixel limit now raised are decoded again, files over a limit
now lowered are dropped from their recorded size, and files gone are dropped. For a folder the
walk is redone too (so files added in any subfolder are found) and the list and record beside it
are rewritten when anything changed; a list given as data.path is checked the same way but never
rewritten (the warning names the command that does). A list without a record (written by hand or
by an older `simmim scan`) is only stat-checked: missing and non-regular files are dropped.

One rule for every backend: DALI (which stops at the first file it cannot decode) always reads a
checked list, scanning a folder first when it has none; the torch loader reads the checked list
when a record exists beside the folder, so both train on the same samples.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import time
from array import array
from pathlib import Path

import numpy as np
import torch.distributed as dist

from simmim.core.errors import DatasetError
from simmim.core.io import write_json

from .decode import MAX_PIXELS
from .folder import SampleList, scan_folder, sidecar
from .scan import (ScanResult, bad_list_path, check_output, clean_list_path, scan_images, write_bad_list,
                   write_file_list)
from .skips import log_skips, no_image_error
from .stats import STATS_SUFFIX, write_stats

log = logging.getLogger(__name__)

Entry = list  # [size, mtime_ns, pixels, reason | None]


def record_path(list_path: str | os.PathLike) -> Path:
    return sidecar(list_path, "files.json")


def file_stat(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a regular file; None if it is gone or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def read_record(list_path: Path, channels: int = 3) -> dict | None:
    """The record beside a list, or None: none there, unreadable, or made for another channel
    count (data.channels: other files and rules; a record without the key is of 3)."""
    path = record_path(list_path)
    if not (list_path.is_file() and path.is_file()):
        return None
    try:
        record = json.loads(path.read_text())
        valid = isinstance(record.get("files"), dict) and isinstance(record.get("max_pixels"), int)
        return record if valid and record.get("channels", 3) == channels else None
    except (OSError, ValueError):
        log.warning("%s is unreadable; checking every file again", path)
        return None


def check(samples: SampleList, classes: list[str], record: dict | None, max_pixels: int,
          workers: int, progress: bool = False, channels: int = 3) -> tuple[ScanResult, dict, dict]:
    """Sorts samples into good and bad, decoding only what `record` cannot vouch for.
    Returns (result, new record entries, counts: checked / gone / limit, and "found": the
    (path, reason) of the bad files this check decoded, not known from `record`). The good samples
    are `samples.take(...)` of the kept ones, in order (flat arrays, as the loaders hold them)."""
    t0 = time.perf_counter()
    files = record["files"] if record else {}
    old_limit = record["max_pixels"] if record else max_pixels
    good = np.zeros(len(samples), dtype=bool)
    bad: list[tuple[int, str]] = []  # (index, reason)
    entries: dict[str, Entry] = {}
    todo, todo_stats, gone, limit, found = array("q"), [], 0, 0, []
    for i in range(len(samples)):
        path = samples.path(i)
        st = file_stat(path)
        if st is None:
            gone += 1
            continue
        e = files.get(path)
        if e is not None and tuple(e[:2]) == st:
            size_, mtime, pixels, reason = e
            if reason is None and pixels > max_pixels:
                reason = f"{pixels} pixels, over the limit of {max_pixels} (data.max_pixels, --max-pixels)"
                limit += 1
            elif reason is not None and "over the limit" in reason and max_pixels > old_limit:
                reason = "again"  # refused for a limit now raised: decoded again below
            if reason != "again":
                entries[path] = e
                if reason is None:
                    good[i] = True
                else:
                    bad.append((i, reason))
                continue
        todo.append(i)
        todo_stats.append(st)
    if todo:
        sub = samples.take(np.frombuffer(todo, np.int64))
        result = scan_images(sub, classes, workers, progress=progress, max_pixels=max_pixels, channels=channels)
        refused, found = dict(result.bad), result.bad
        g = 0
        for k, (i, (size, mtime)) in enumerate(zip(todo, todo_stats)):
            path = sub.path(k)
            if path in refused:
                bad.append((i, refused[path]))
                entries[path] = [size, mtime, 0, refused[path]]
            else:
                w, h = (int(x) for x in result.sizes[g])
                g += 1
                good[i] = True
                entries[path] = [size, mtime, w * h, None]
    bad.sort()
    result = ScanResult(samples.take(np.flatnonzero(good)), [(samples.path(i), r) for i, r in bad], classes,
                        time.perf_counter() - t0)
    return result, entries, {"checked": len(todo), "gone": gone, "limit": limit, "found": found}


def write_scan(out: Path, result: ScanResult, entries: dict, max_pixels: int, channels: int = 3) -> None:
    """The list, its class names, the bad-file report and list (`skips.write_bad_list`), the record
    (each written atomically) and, when the scan measured them, the per-channel statistics
    (`stats.write_stats`)."""
    write_file_list(out, result.good, labeled=bool(result.classes))
    write_json(sidecar(out, "classes.json"), result.classes)
    write_json(sidecar(out, "report.json"), result.report())
    write_bad_list(out, result.bad)
    write_json(record_path(out), {"max_pixels": max_pixels, "channels": channels, "files": entries})
    if result.moments is not None:
        write_stats(out, result.moments, len(result.good))


def entries_of(result: ScanResult, stats: dict) -> dict:
    """A record's entries for a full scan's result; `stats` taken before the scan (so a file
    changed during the scan is checked again next time)."""
    entries = {p: [*stats[p], int(w) * int(h), None]  # sizes: int32 (N, 2); the product in Python ints
               for (p, _), (w, h) in zip(result.good, result.sizes.tolist()) if p in stats}
    entries.update((p, [*stats[p], 0, reason]) for p, reason in result.bad if p in stats)
    return entries


def checked_samples(path: str, max_pixels: int, workers: int, rank: int = 0, world_size: int = 1,
                    required: bool = True, who: str = "data", channels: int = 3) -> tuple[SampleList, list[str]] | None:
    """(samples, classes) every backend agrees on, for data.path `path` (a folder or a list).

    A folder: its checked list (see the module docstring), brought up to date; without a list
    beside it, scanned first when `required` (DALI), else None (the torch loader decodes lazily).
    A list: its files stat-checked (and re-decoded where its record says they changed).
    Rank 0 does the work when torch.distributed is initialised; the other ranks read its list.
    `channels` (data.channels): which files are listed and how they are checked; a record made
    for another count is not trusted (every file is checked again).
    """
    src = Path(path)
    shared = world_size > 1 and dist.is_available() and dist.is_initialized()
    if not src.is_dir():
        return checked_file_list(src, max_pixels, workers, who, channels)
    clean = clean_list_path(src)
    if not required and not clean.is_file():
        return None
    if rank == 0 or not shared:
        samples, classes = refresh_folder(src, clean, max_pixels, workers, who, channels=channels)
        if not shared:
            return samples, classes
    dist.barrier()  # rank 0 has brought the list up to date
    if not clean.is_file() or read_record(clean, channels) is None:
        return refresh_folder(src, clean, max_pixels, workers, who, write=False, channels=channels)
    return scan_folder(clean)


def refresh_folder(src: Path, clean: Path, max_pixels: int, workers: int, who: str = "data",
                   write: bool = True, channels: int = 3) -> tuple[SampleList, list[str]]:
    samples, classes = scan_folder(src, channels=channels)
    record = read_record(clean, channels)
    if record is None:
        log.info("%s: no scan record beside %s; checking its %d files first (`simmim scan %s` does it once)",
                 who, src, len(samples), src)
    result, entries, counts = check(samples, classes, record, max_pixels, workers, channels=channels)
    if not len(result.good):
        raise no_image_error(str(src), result.bad, len(samples), channels,
                             listed=keep_bad_list(clean, result.bad) if write else None)
    changed = record is None or counts["checked"] or set(entries) != set(record["files"]) \
        or record["max_pixels"] != max_pixels
    if record is not None and changed:
        log.warning("%s: %s changed since its scan (%d file(s) new or changed, checked again; %d gone; "
                    "%d over data.max_pixels=%d); list updated", who, src, counts["checked"],
                    len(set(record["files"]) - set(entries)), counts["limit"], max_pixels)
    if changed and write:
        try:
            write_scan(clean, result, entries, max_pixels, channels)
        except OSError as e:
            log.warning("%s: cannot keep the scan list beside %s (%s); every run checks again", who, src,
                        e.strerror or e)
    listed = bad_list_path(clean) if result.bad and bad_list_path(clean).is_file() else None
    log_skips(log, who, result.bad, len(samples), str(src), listed, new=counts["found"])
    log.info("%s: %d of %d files decode (list %s%s)", who, len(result.good), len(samples), clean,
             f"; the others: {listed}" if listed else "")
    return result.good, classes


def keep_bad_list(clean: Path, bad: list[tuple[str, str]]) -> Path | None:
    """`skips.write_bad_list` beside `clean` where it can be written (None where not): the files
    of a data set none of which reads are listed even though no clean list is."""
    try:
        return write_bad_list(clean, bad)
    except OSError as e:
        log.warning("cannot write the list of bad files beside %s (%s)", clean, e.strerror or e)
        return None


def checked_file_list(lst: Path, max_pixels: int, workers: int, who: str = "data", channels: int = 3):
    samples, classes = scan_folder(lst)
    record = read_record(lst, channels)
    if record is None:
        present = np.fromiter((file_stat(samples.path(i)) is not None for i in range(len(samples))), bool,
                              len(samples))
        kept = samples.take(np.flatnonzero(present))
        if len(kept) < len(samples):
            first = samples.path(int(np.flatnonzero(~present)[0]))
            log.warning("%s: left out %d listed file(s) that are gone or not regular files, e.g. %r "
                        "(`simmim scan` on the source rebuilds the list)", who, len(samples) - len(kept), first)
        if not len(kept):
            raise DatasetError(f"no file listed in {lst} exists")
        return kept, classes
    result, _, counts = check(samples, classes, record, max_pixels, workers, channels=channels)
    listed = bad_list_path(lst) if result.bad and bad_list_path(lst).is_file() else None
    if not len(result.good):
        raise no_image_error(str(lst), result.bad, len(samples), channels, listed=listed)
    log_skips(log, who, result.bad, len(samples), str(lst), listed, new=counts["found"])
    dropped = len(samples) - len(result.good)
    if dropped or counts["checked"]:
        log.warning("%s: %s is out of date (%d file(s) changed and checked again, %d left out, e.g. %r); "
                    "`simmim scan SRC --out %s` rebuilds it", who, lst, counts["checked"], dropped,
                    result.bad[0][0] if result.bad else next((p for p, _ in samples if file_stat(p) is None), ""), lst)
    return result.good, classes


def scan_command(src: str, out: str | None, workers: int, on_error: str,
                 max_pixels: int = MAX_PIXELS, channels: int = 3, stats: bool = False) -> ScanResult:
    """`simmim scan SRC [--out LIST] [--channels C] [--stats]`: writes LIST (clean `path label`
    list), LIST's classes file, a JSON report of the bad files and the record the loaders check the
    list against beside it; with `stats`, the per-channel mean and std of the good images too
    (`stats.write_stats`: LIST's `.stats.json`, which pre-training reads when data.mean is empty)."""
    if channels < 1:
        raise DatasetError(f"--channels must be >= 1, got {channels}")
    samples, classes = scan_folder(src, announce=print, channels=channels)  # the walk only: the output is checked first
    out_path = check_output(out, "--out") if out else check_output(clean_list_path(src))
    file_stats = {p: st for p, _ in samples if (st := file_stat(p)) is not None}
    result = scan_images(samples, classes, workers, on_error=on_error, max_pixels=max_pixels, channels=channels,
                         stats=stats)
    if not result.good:
        raise no_image_error(src, result.bad, len(samples), channels, "--channels", keep_bad_list(out_path, result.bad))
    write_scan(out_path, result, entries_of(result, file_stats), max_pixels, channels)
    log_skips(log, "scan", result.bad, len(samples), src, bad_list_path(out_path))
    rate = len(samples) / max(result.seconds, 1e-9)
    print(f"scanned {len(samples)} images in {result.seconds:.1f}s ({rate:.0f} img/s): "
          f"{len(result.good)} good, {len(result.bad)} bad -> {out_path}")
    if result.moments is not None:
        m = result.moments
        print(f"per-channel mean {[round(float(v), 4) for v in m.mean]} std {[round(float(v), 4) for v in m.std]} "
              f"over {m.count} pixels -> {sidecar(out_path, STATS_SUFFIX)}")
    return result
