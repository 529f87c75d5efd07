"""`simmim shard SRC DEST`: a data set written as MosaicML streaming shards (MDS), for
`data.backend: stream` (pipeline/stream_loader.py).

SRC is anything the loaders read (a class folder, an unlabeled folder of any nesting, a list);
the files are checked by the loaders' decode rules first (`scanlist.check`, reusing the scan record
beside SRC where there is one), and a file that does not decode is left out with a warning naming
it, as `simmim scan` does. Sample i of the shards is sample i of that checked list, stored as

    image  bytes   the file as it is on disk (no re-encoding: the stream backend decodes it with
                   the same rules and gets the same pixels as the torch backend)
    index  int64   i, the sample's index in the data set: its crop and flip are keyed by it
    path   str     the source file, for messages
    label  int32   the class (labeled data only)

DEST is a local folder or an object-store prefix (`s3://bucket/prefix`, endpoint and keys from
the usual environment variables: S3_ENDPOINT_URL for streaming, AWS_* for boto3). Completion is
atomic at the level of the data set: streaming's `index.json` is put in place last, after every
shard and our `simmim.json` (samples, classes, fingerprint) are in place (a local folder: shards
are written in DEST/.staging and renamed into DEST; a bucket: uploaded one by one as each shard
is closed, the index once every upload has finished). A run stopped half-way leaves no index, so
the set never looks complete; the next `simmim shard` to the same DEST removes what it left.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from streaming import MDSWriter
from streaming.base.storage.upload import CloudUploader
from tqdm import tqdm

from .decode import MAX_PIXELS
from simmim.core.errors import DatasetError
from .folder import SampleList, scan_folder
from .options import byte_size
from .scan import ScanResult, bad_list_path, clean_list_path
from .scanlist import check, read_record
from .skips import log_skips, no_image_error

log = logging.getLogger(__name__)

INDEX = "index.json"  # streaming's: present only once the whole set is in place
META = "simmim.json"  # ours: what the stream loader needs beyond the shards
SHARD_PREFIX = "shard."  # streaming's shard names: shard.00000.mds
STAGING = ".staging"  # a local DEST's folder for the shard being written


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object-store URL (s3://..., gs://...), False for a local path."""
    return "://" in str(path)


def columns(labeled: bool) -> dict[str, str]:
    """The MDS columns of a sample (see the module docstring)."""
    cols = {"image": "bytes", "index": "int64", "path": "str"}
    return {**cols, "label": "int32"} if labeled else cols


class ShardDest:
    """Where `simmim shard` puts its files: a local folder, or a prefix in an object store.

    `state()` says whether DEST holds a complete set, a partial one or nothing; `clear()` removes a
    set (its index first, so it never looks complete meanwhile); `put(name)` moves or uploads a
    closed file from `staging` (uploads run in the background); `finish(meta)` waits for them,
    then puts META and INDEX last. Only names a shard set has are touched: DEST holding anything
    else is refused (`foreign`)."""

    def __init__(self, dest: str):
        self.dest, self.remote = str(dest).rstrip("/"), is_remote(dest)
        self.pending: list[Future] = []
        if self.remote:
            self.staging = tempfile.mkdtemp(prefix="simmim-shard-")
            try:
                self.uploader = CloudUploader.get((self.staging, self.dest), keep_local=False)
            except Exception as e:  # noqa: BLE001 - a missing bucket, no credentials, an unknown scheme: one line
                raise DatasetError(f"cannot write to {self.dest}: {type(e).__name__}: {one_line(e)}") from None
            self.pool = ThreadPoolExecutor(4)
        else:
            self.staging = os.path.join(self.dest, STAGING)

    def names(self) -> list[str]:
        """The names of the files under DEST (keys under the prefix), relative to it."""
        if not self.remote:
            return sorted(os.listdir(self.dest)) if os.path.isdir(self.dest) else []
        url = urllib.parse.urlparse(self.dest)
        prefix = url.path.lstrip("/") + "/" if url.path.strip("/") else ""
        pages = self.uploader.s3.get_paginator("list_objects_v2").paginate(Bucket=url.netloc, Prefix=prefix)
        return sorted(obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", []))

    def state(self) -> str:
        """'complete' (an index is there), 'partial' (files but no index) or 'empty'."""
        names = self.names()
        return "complete" if INDEX in names else "partial" if names else "empty"

    def foreign(self) -> list[str]:
        return [n for n in self.names() if n not in (INDEX, META, STAGING) and not n.startswith(SHARD_PREFIX)
                and not n.startswith(STAGING + "/")]

    def clear(self) -> None:
        names = self.names()
        ordered = ([INDEX] if INDEX in names else []) + [n for n in names if n != INDEX]
        if not self.remote:
            for n in ordered:
                path = os.path.join(self.dest, n)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            return
        url = urllib.parse.urlparse(self.dest)
        prefix = url.path.lstrip("/") + "/" if url.path.strip("/") else ""
        s3 = self.uploader.s3
        if INDEX in names:
            s3.delete_object(Bucket=url.netloc, Key=prefix + INDEX)
        rest = [n for n in ordered if n != INDEX]
        for a in range(0, len(rest), 1000):
            s3.delete_objects(Bucket=url.netloc, Delete={"Objects": [{"Key": prefix + n} for n in rest[a:a + 1000]]})

    def put(self, name: str) -> None:
        if self.remote:
            self.pending.append(self.pool.submit(self.uploader.upload_file, name))
        else:
            os.replace(os.path.join(self.staging, name), os.path.join(self.dest, name))

    def finish(self, meta: dict) -> None:
        for f in self.pending:
            f.result()  # an upload that failed raises here, before anything could look complete
        Path(self.staging, META).write_text(json.dumps(meta, indent=1))
        self.put(META)
        if self.remote:
            self.pending.pop().result()
        self.put(INDEX)
        if self.remote:
            self.pending.pop().result()
            self.pool.shutdown()
        shutil.rmtree(self.staging, ignore_errors=True)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def prepare_dest(dest: ShardDest, overwrite: bool) -> None:
    """DEST made ready for a new set: DatasetError for a complete set (unless `overwrite`) or for
    files that are not a shard set's; a partial set (a run stopped half-way) is removed."""
    if not dest.remote and os.path.exists(dest.dest) and not os.path.isdir(dest.dest):
        raise DatasetError(f"shard destination {dest.dest} is a file; give a folder or an s3:// prefix")
    foreign = dest.foreign()
    if foreign:
        raise DatasetError(f"{dest.dest} holds files that are not shards (e.g. {foreign[0]}); give an empty "
                           f"folder or prefix")
    state = dest.state()
    if state == "complete" and not overwrite:
        raise DatasetError(f"{dest.dest} already holds a complete shard set; pass --overwrite to replace it")
    if state != "empty":
        log.warning("%s: removing %s shard set first", dest.dest,
                    "the complete" if state == "complete" else "a partial (interrupted)")
        dest.clear()
    if not dest.remote:
        os.makedirs(dest.staging, exist_ok=True)


def checked(src: str, max_pixels: int, workers: int) -> ScanResult:
    """The samples of `src` that decode (`scanlist.check`, with the scan record beside a folder or
    list where there is one), those left out told in a few lines (`skips.log_skips`)."""
    samples, classes = scan_folder(src, announce=print)
    listed = clean_list_path(src) if Path(src).is_dir() else Path(src)
    record = read_record(listed)
    result, _, _ = check(samples, classes, record, max_pixels, workers, progress=True)
    if not len(result.good):
        raise no_image_error(src, result.bad, len(samples), 3, setting="")
    bad_list = bad_list_path(listed)  # the scan's full list, where the record's scan wrote one
    log_skips(log, "shard", result.bad, len(samples), src, bad_list if record and bad_list.is_file() else None)
    return result


def write_shards(result: ScanResult, dest: ShardDest, shard_size: int, progress: bool = True) -> int:
    """Every sample of `result.good` into MDS shards of at most `shard_size` bytes; each shard is
    handed to `dest.put` once closed. A file gone or unreadable since its check is left out with
    a warning. Returns the number of samples written (sample i has index i)."""
    good: SampleList = result.good
    labeled = bool(result.classes)
    written = moved = 0
    with MDSWriter(out=dest.staging, columns=columns(labeled), size_limit=shard_size, exist_ok=False) as writer:
        for i in tqdm(range(len(good)), desc="shard", unit="img", disable=not progress, mininterval=1.0):
            path, label = good[i]
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                log.warning("skipping %r (%s)", path, e.strerror or e)
                continue
            sample = {"image": data, "index": written, "path": path}
            writer.write({**sample, "label": label} if labeled else sample)
            written += 1
            moved = _put_closed(writer, dest, moved)  # every entry of writer.shards is a closed file
    _put_closed(writer, dest, moved)  # the last shard, closed by finish(), which also wrote the index to staging
    return written


def _put_closed(writer, dest: ShardDest, moved: int) -> int:
    for shard in writer.shards[moved:]:
        dest.put(shard["raw_data"]["basename"])
    return len(writer.shards)


@contextlib.contextmanager
def storage_errors(dest: ShardDest):
    """A write, listing or upload at DEST that fails (a full disk, no permission, a bucket or
    credentials refused, an endpoint down) as one DatasetError line; the set stays incomplete (no
    index), and the same command run again removes what was written."""
    try:
        yield
    except (OSError, BotoCoreError, ClientError) as e:
        raise DatasetError(f"cannot write the shard set to {dest.dest} ({type(e).__name__}: {one_line(e)}); "
                           f"run the same command again once that is fixed") from None


def shard_command(src: str, dest: str, shard_size: str = "64mb", workers: int = 0, max_pixels: int = MAX_PIXELS,
                  overwrite: bool = False, progress: bool = True) -> dict:
    """`simmim shard SRC DEST [--shard-size 64mb] [--overwrite]`: see the module docstring. Returns
    the metadata written as DEST/simmim.json. DatasetError (one line) for a SRC with no readable
    image, a DEST that cannot be written, holds other files or (without `overwrite`) a complete set."""
    size = byte_size(shard_size)
    if size is None or not 0 < size < 2 ** 32:
        raise DatasetError(f"--shard-size must be a size under 4gb such as 64mb, got '{shard_size}'")
    target = ShardDest(dest)
    with storage_errors(target):
        prepare_dest(target, overwrite)  # before the check: a DEST it cannot use is said at once
    result = checked(src, max_pixels, workers)
    with storage_errors(target):
        n = write_shards(result, target, size, progress)
        meta = {"version": 1, "samples": n, "classes": list(result.classes), "source": str(src),
                "fingerprint": result.good.fingerprint() if n == len(result.good) else "", "max_pixels": max_pixels}
        target.finish(meta)
    print(f"wrote {n} images ({len(result.bad)} left out) in shards of <= {shard_size} -> {dest}")
    return meta
