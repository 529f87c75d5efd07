"""`run.mirror: s3://bucket/prefix`: every checkpoint copied to an S3-compatible object store in the
background, and a job whose run folder has no usable checkpoint resumes from the store's newest
complete one (multi-node runs on machines without a shared file system, or a job moved to other
machines).

What the store holds, under the prefix (`Mirror`):

    checkpoint-00000014.pt                 a torch.save checkpoint (train.parallel=ddp), one object
    checkpoint-00000014/.metadata, __R_0.distcp, ...   a DCP checkpoint (fsdp): every rank's shards
    .parts/checkpoint-00000014/rank-0000R.json         rank R's files of a DCP checkpoint, once uploaded
    checkpoint-00000014.complete.json      the marker: every object of the checkpoint and its size

The marker is written last, by one writer, once every object it lists is uploaded: a checkpoint
without it is incomplete (a node died mid-upload, an upload failed) and is never resumed from.

Upload. After each checkpoint is written locally (`MirroredCheckpointer.save`), the rank hands it to
its background thread (boto3's managed transfer: multipart, several connections) and training goes
on. A torch.save checkpoint is uploaded and marked by the rank that wrote it. A DCP checkpoint is
uploaded by every rank, each its own files (`__R_*.distcp`, and rank 0 the `.metadata`), found in
its own run folder, so nothing needs a shared file system; each rank then posts a small part object
naming its files (or its error); a node without rank 0's folder publishes its own share first
(checkpoint.DCPCheckpointer, `node_main`). With run.async_save a checkpoint is handed over once
DCP's background write is known to be done on every rank: at the next save, or at the end. Rank 0's
thread waits for the parts of every rank by listing `.parts/` (no collective: the training loop's
collectives are left alone, and a rank whose upload thread is slow or dead cannot block another's
step), then writes the marker. Each thread takes the newest checkpoint handed to it; rank 0 gives up
marking a checkpoint when a rank reports an error or a newer checkpoint is already waiting (an
upload slower than the checkpoint interval: said in the log). After the marker, the checkpoints
before the newest `run.keep_last` complete ones are deleted (marker first, then the objects), and so
are objects of earlier checkpoints that never got a marker. A failed upload is one warning; the
local checkpoint is untouched and the next checkpoint is uploaded as usual. At the end of a run and
after a stop signal each rank waits for its thread, at most `run.mirror_wait_s`; then (said in the
log) its transfer is stopped at its next chunk, unmarked: s3transfer's pool threads, joined at
interpreter exit, would otherwise hold the process until the upload ended.

Resume (`restore_from_mirror`, before the run folder is read): every rank says which checkpoint it
can read locally (the newest torch.save file, or DCP folder with its `.metadata`); rank 0 reads the
store's newest complete checkpoint (and deletes what incomplete uploads left). If every rank has
the same local checkpoint and it is at least as new, nothing is downloaded. Otherwise the mirror's
is taken: the checkpoints newer than it in a local folder (which some rank lacks: no shared file
system) are renamed `<name>.local-only`, and the missing files are downloaded (rank 0 first, then
one rank per node for what its node still lacks; a DCP folder's `.metadata` last, so a killed
download is never taken for a checkpoint). The run then resumes from it as from any local one.

A mirror prefix belongs to one run, as a run folder does (no lock can be held in an object store).
boto3 finds the endpoint and credentials itself (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles). boto3 is the `stream` extra.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from simmim.core.errors import CheckpointError, ConfigError
from simmim.core.io import atomic_write

from .checkpoint import DCP_PATTERN, PATTERN, Checkpointer, checkpoints, dcp_checkpoints
from .checkpoint_reader import CheckpointContents
from .config import S3_URL
from .distributed import DistInfo, all_gather, barrier, first_reported
from .runfolder import check_resume_config

log = logging.getLogger("simmim")
MARKER = re.compile(r"^(checkpoint-(\d+))\.complete\.json$")
# every object of checkpoint-N: its file or folder, its parts, its marker (keys relative to the prefix)
MEMBER = re.compile(r"^(?:\.parts/)?(checkpoint-(\d+))(?:\.pt$|/|\.complete\.json$)")
WHAT_TO_DO = ("check the bucket exists, the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
              "and the endpoint (AWS_ENDPOINT_URL), or set run.mirror= to train without a mirror")


def parse_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix/' -> ('bucket', 'some/prefix'); ConfigError if it is not one."""
    m = S3_URL.match(url)
    if not m:
        raise ConfigError(f"run.mirror '{url}' is not s3://bucket/prefix")
    return m.group(1), (m.group(2) or "").strip("/")


def s3_client(attempts: int = 5):
    """A boto3 S3 client (endpoint and credentials from the environment, as boto3 reads them);
    ConfigError if boto3 is not installed."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("run.mirror needs boto3: pip install -e '.[stream]'") from None
    # a session of its own: boto3's default one caches the credentials it first found, and is not thread-safe
    return boto3.session.Session().client("s3", config=Config(connect_timeout=10, read_timeout=60,
                                            retries={"max_attempts": attempts, "mode": "standard"}))


def describe(e: BaseException) -> str:
    """One line for an S3 error: the service's code and message, or the client's own."""
    response = getattr(e, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        return f"{err.get('Code', type(e).__name__)}: {err.get('Message', '')}".strip()
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def check_mirror(url: str) -> None:
    """Before training: the mirror can be written (a small object put and deleted again), so that
    a bad bucket, missing credentials or an endpoint that is down end the command in one line,
    not a warning at each checkpoint. ConfigError naming the URL and what to do."""
    bucket, prefix = parse_url(url)
    client = s3_client(attempts=2)
    probe = "/".join(p for p in (prefix, f".write-probe-{socket.gethostname()}-{os.getpid()}") if p)
    try:
        client.put_object(Bucket=bucket, Key=probe, Body=b"")
        client.delete_object(Bucket=bucket, Key=probe)
    except Exception as e:  # noqa: BLE001 - botocore's errors: no credentials, no endpoint, no bucket, denied
        raise ConfigError(f"run.mirror '{url}' cannot be written ({describe(e)}): {WHAT_TO_DO}") from None


@dataclass
class Upload:
    """One checkpoint handed to a rank's upload thread."""
    step: int
    path: Path  # the local file (ddp) or folder (fsdp)
    sharded: bool  # a DCP folder: every rank uploads its own files, rank 0 marks it
    config: dict | None = None  # the run's (Config.to_dict()), kept in the marker: a resume checks it first
    abandoned: bool = False  # set by a timed-out Mirror.wait: its transfer stops at its next chunk

    @property
    def name(self) -> str:
        return f"checkpoint-{self.step:08d}"


class Abandoned(Exception):
    """Raised in a transfer's progress callback once its upload is abandoned: s3transfer then stops
    every part's worker thread at its next chunk (its pool threads are joined at interpreter exit,
    so an upload left running would hold the process past run.mirror_wait_s)."""


class Mirror:
    """The checkpoints of one run in `url` (s3://bucket/prefix); see the module docstring.

    rank / world_size: this process's place (DCP checkpoints are marked by rank 0 once every rank's
    part is in); keep_last: complete checkpoints kept in the mirror (0: every one)."""
    POLL_S = (0.1, 2.0)  # rank 0's listing of the parts: first and longest interval

    def __init__(self, url: str, rank: int = 0, world_size: int = 1, keep_last: int = 3, client=None):
        self.url, (self.bucket, self.prefix) = url.rstrip("/"), parse_url(url)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.client = client or s3_client()
        self.cond = threading.Condition()
        self.pending: Upload | None = None
        self.busy: Upload | None = None
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------ objects
    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def objects(self, under: str = "") -> dict[str, int]:
        """{key relative to the prefix: size} of every object under `under` (relative too)."""
        start = self.key(under) if under or not self.prefix else self.prefix + "/"
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]
                found[rel] = obj["Size"]
        return found

    def put_json(self, rel: str, obj: dict) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=json.dumps(obj).encode(),
                               ContentType="application/json")

    def get_json(self, rel: str) -> dict:
        return json.loads(self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read())

    def delete(self, rels: list[str]) -> None:
        for i in range(0, len(rels), 1000):  # DeleteObjects takes 1000 keys a request
            chunk = [{"Key": self.key(r)} for r in rels[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    @staticmethod
    def by_checkpoint(objects: dict[str, int]) -> dict[int, dict[str, int]]:
        """{step: {key: size}} of the objects that belong to a checkpoint."""
        groups: dict[int, dict[str, int]] = {}
        for rel, size in objects.items():
            if m := MEMBER.match(rel):
                groups.setdefault(int(m.group(2)), {})[rel] = size
        return groups

    @staticmethod
    def marked(objects: dict[str, int]) -> list[int]:
        """Steps of the complete checkpoints (those with a marker), oldest first."""
        return sorted(int(m.group(2)) for rel in objects if (m := MARKER.match(rel)))

    def newest_complete(self, clean: bool = False) -> dict | None:
        """The manifest of the newest complete checkpoint (None if there is none); `clean`: also
        delete every object of a checkpoint without a marker (what an upload cut short left;
        only at the start of a job, when nothing of this run is uploading)."""
        objects = self.objects()
        done = self.marked(objects)
        if clean:
            stale = [rel for step, group in self.by_checkpoint(objects).items() if step not in done for rel in group]
            if stale:
                log.info("mirror %s: removed %d object%s of an incomplete upload", self.url, len(stale),
                         "" if len(stale) == 1 else "s")
                self.delete(stale)
        return self.get_json(f"checkpoint-{done[-1]:08d}.complete.json") if done else None

    # ------------------------------------------------------------ upload (a background thread per rank)
    def submit(self, upload: Upload) -> None:
        """Hands `upload` to this rank's thread and returns; a checkpoint handed earlier and not
        started yet is dropped for it (the newest is the one to have)."""
        with self.cond:
            self.pending = upload
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="simmim-mirror", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def wait(self, timeout_s: float) -> bool:
        """Until the uploads handed over are done (True), or `timeout_s` has passed (False, said in
        the log: the process may end with an upload unfinished, which then has no marker)."""
        start = time.monotonic()
        with self.cond:
            idle = self.cond.wait_for(lambda: self.pending is None and self.busy is None, timeout_s)
            unfinished = self.busy or self.pending
            if not idle:  # the end of a run or a stop: the transfer is stopped, never left to hold the exit
                for up in (self.busy, self.pending):
                    if up is not None:
                        up.abandoned = True
                self.pending = None
        if not idle:
            log.warning("mirror %s: %s still uploading after run.mirror_wait_s=%g s; going on without it (its "
                        "transfer is stopped, unmarked; the mirror keeps its newest complete checkpoint)",
                        self.url, unfinished.name, timeout_s)
        elif self.thread is not None and time.monotonic() - start > 1:
            log.info("mirror %s: waited %.0f s for the last upload", self.url, time.monotonic() - start)
        return idle

    def _work(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending is not None)
                self.busy, self.pending = self.pending, None
            try:
                self.upload(self.busy)
            except Abandoned:
                pass  # said by wait(); its objects are removed at the next start (no marker)
            except Exception as e:  # noqa: BLE001 - never the training's end: the local checkpoint is intact
                log.warning("mirror %s: uploading %s failed (%s); the local checkpoint is intact, the next one is "
                            "uploaded as usual", self.url, self.busy.name, describe(e))
                self._post_failure(self.busy, e)
            finally:
                with self.cond:
                    self.busy = None
                    self.cond.notify_all()

    def upload(self, up: Upload) -> None:
        """Uploads this rank's files of `up`, then marks it complete (its writer, or rank 0 once
        every rank's part is in; see the module docstring). Raises what the upload raised."""
        start = time.monotonic()
        files = self.own_files(up)
        sizes = {rel: path.stat().st_size for rel, path in files.items()}
        from boto3.s3.transfer import TransferConfig
        transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8)
        def progress(_bytes: int) -> None:  # called from s3transfer's worker threads, chunk by chunk
            if up.abandoned:
                raise Abandoned(up.name)

        for rel, path in sorted(files.items()):
            progress(0)
            self.client.upload_file(str(path), self.bucket, self.key(rel), Config=transfer, Callback=progress)
        progress(0)
        if up.sharded:
            self.put_json(f".parts/{up.name}/rank-{self.rank:05d}.json", {"files": sizes})
            if self.rank != 0:
                return
            sizes = self._gather_parts(up)
            if sizes is None:
                return
        self.put_json(f"{up.name}.complete.json", {
            "checkpoint": up.path.name, "step": up.step, "format": "dcp" if up.sharded else "torch.save",
            "world_size": self.world_size if up.sharded else 1, "files": sizes,
            "written": time.strftime("%Y-%m-%d %H:%M:%S"), "config": up.config})
        log.info("mirrored %s to %s (%d object%s, %.1f MB, %.0f s)", up.path.name, self.url, len(sizes),
                 "" if len(sizes) == 1 else "s", sum(sizes.values()) / 1e6, time.monotonic() - start)
        self.prune(up.step)

    def own_files(self, up: Upload) -> dict[str, Path]:
        """{key relative to the prefix: local path} of what this rank uploads of `up`: the file, or
        its own shards of a DCP folder (`__R_*.distcp`, rank 0 also `.metadata`), published on
        its node (by each node's local rank 0 where there is no shared file system)."""
        if not up.sharded:
            return {up.path.name: up.path}
        wanted = [f"__{self.rank}_*.distcp"] + ([".metadata"] if self.rank == 0 else [])
        found = {f"{up.path.name}/{p.name}": p for pattern in wanted for p in up.path.glob(pattern)}
        if found:
            return found
        raise FileNotFoundError(f"no files of rank {self.rank} in {up.path} (was it pruned before its upload?)")

    def _gather_parts(self, up: Upload) -> dict[str, int] | None:
        """Rank 0: every rank's files of `up` once all parts are in; None (said in the log) if a
        rank failed, or a newer checkpoint is waiting before they are all in."""
        wait = self.POLL_S[0]
        while True:
            parts = self.objects(f".parts/{up.name}/")
            if len(parts) >= self.world_size:
                break
            with self.cond:
                if self.pending is not None:
                    log.warning("mirror %s: %s not marked complete: %d of %d ranks had uploaded their files when the "
                                "next checkpoint came (uploads slower than the checkpoints: raise "
                                "run.save_every_minutes)", self.url, up.name, len(parts), self.world_size)
                    return None
            time.sleep(wait)
            wait = min(2 * wait, self.POLL_S[1])
        sizes: dict[str, int] = {}
        for rel in sorted(parts):
            part = self.get_json(rel)
            if "error" in part:
                log.warning("mirror %s: %s not marked complete: %s", self.url, up.name, part["error"])
                return None
            sizes.update(part["files"])
        return sizes

    def _post_failure(self, up: Upload, e: BaseException) -> None:
        """A rank's failed upload of a DCP checkpoint, posted so that rank 0 stops waiting for it."""
        if up.sharded and self.rank != 0:
            try:
                self.put_json(f".parts/{up.name}/rank-{self.rank:05d}.json",
                              {"error": f"rank {self.rank}'s upload failed ({describe(e)})"})
            except Exception:  # noqa: BLE001 - the store is unreachable: rank 0 gives up at the next checkpoint
                pass

    def prune(self, newest: int) -> None:
        """After `newest`'s marker: keep the newest keep_last complete checkpoints (each older one
        loses its marker first, then its objects), and delete the objects of checkpoints before
        `newest` that never got a marker (and `newest`'s parts, which its marker now lists)."""
        objects = self.objects()
        done = self.marked(objects)
        drop = done[:-self.keep_last] if self.keep_last > 0 else []
        groups = self.by_checkpoint(objects)
        markers = [f"checkpoint-{s:08d}.complete.json" for s in drop]
        self.delete(markers)
        rest = [rel for step, group in groups.items() for rel in group if rel not in markers and (
            step in drop or (step < newest and step not in done) or rel.startswith(f".parts/checkpoint-{newest:08d}/"))]
        self.delete(rest)

    # ------------------------------------------------------------ download
    def download(self, manifest: dict, out_dir: Path) -> int:
        """Every file of the checkpoint `manifest` describes into out_dir that is not already there
        with its size (a DCP folder's `.metadata` last); returns the bytes downloaded.
        CheckpointError if an object is missing or has another size."""
        done = 0
        for rel, size in sorted(manifest["files"].items(), key=lambda kv: kv[0].endswith("/.metadata")):
            path = out_dir / rel
            if path.is_file() and path.stat().st_size == size:
                continue

            def fetch(tmp: str, key: str = self.key(rel)) -> None:
                with open(tmp, "wb") as f:
                    self.client.download_fileobj(self.bucket, key, f)
            try:
                atomic_write(path, fetch)
            except Exception as e:  # noqa: BLE001 - botocore's errors
                raise CheckpointError(f"cannot download {self.url}/{rel} ({describe(e)}): {WHAT_TO_DO}") from None
            if path.stat().st_size != size:
                raise CheckpointError(f"{self.url}/{rel} has {path.stat().st_size} bytes, its marker says {size}: "
                                      f"the mirror was changed by something else; delete its marker to skip it")
            done += size
        return done


class MirroredCheckpointer:
    """A `Checkpointer` whose checkpoints are also copied to a `Mirror` in the background (this
    rank's part of each: the file of the rank that wrote it, or this rank's shards of a DCP
    folder). `wait()` also waits for the uploads, at most `wait_s` seconds (the end of a run, a
    stop signal).

    With run.async_save, DCP writes a checkpoint in the background and publishes it once the next
    save (or `wait()`) has found it written on every rank: it is handed to the mirror then, one
    checkpoint later (at the end of a run or a stop: before the wait)."""

    def __init__(self, inner: Checkpointer, mirror: Mirror, wait_s: float):
        self.inner, self.mirror, self.wait_s = inner, mirror, wait_s
        self.out_dir = inner.out_dir
        self.deferred: Upload | None = None  # an async save, published by the next save or wait()

    def save(self, step: int, model, optimizer, train_state: dict, any_rank: bool = False) -> Path | None:
        path = self.inner.save(step, model, optimizer, train_state, any_rank=any_rank)
        if path is not None:
            up = Upload(step, Path(path), Path(path).suffix != ".pt", train_state.get("config"))
            if getattr(self.inner, "async_save", False):
                self._send_deferred()  # the inner save waited for it and published it
                self.deferred = up
            else:
                self.mirror.submit(up)
        return path

    def _send_deferred(self) -> None:
        if self.deferred is not None:
            self.mirror.submit(self.deferred)
            self.deferred = None

    def load(self, contents: CheckpointContents, model, optimizer) -> dict:
        return self.inner.load(contents, model, optimizer)

    def checkpoints(self) -> list[tuple[int, Path]]:
        return self.inner.checkpoints()

    def newest_readable(self):
        return self.inner.newest_readable()

    def wait(self) -> None:
        self.inner.wait()
        self._send_deferred()
        self.mirror.wait(self.wait_s)

    def newest_local(self) -> tuple[int, Path] | None:
        """(step, path) of the newest checkpoint this rank can read in its run folder (None: none)."""
        found = checkpoints(self.out_dir) + dcp_checkpoints(self.out_dir)
        return max(found) if found else None

    def marked(self) -> list[int]:
        """The steps the mirror holds complete ([] where it cannot be listed: none known to be there)."""
        try:
            return self.mirror.marked(self.mirror.objects())
        except Exception:  # noqa: BLE001 - botocore's errors: the store is unreachable
            return []

    def catch_up(self, config: dict | None) -> None:
        """At the start of a run: a local checkpoint newer than the mirror's newest complete one (its
        upload failed, or was cut off at the end of the last job) is handed to the upload thread."""
        newest = self.newest_local()
        sharded = newest is not None and newest[1].suffix != ".pt"  # a torch.save file: its writer, rank 0, alone
        if newest is not None and (sharded or self.mirror.rank == 0) and newest[0] not in self.marked():
            log.info("mirror %s: uploading %s, which the mirror lacks", self.mirror.url, newest[1].name)
            self.mirror.submit(Upload(newest[0], newest[1], sharded, config))

    def missing(self) -> str | None:
        """After `wait()`: None if the newest local checkpoint is complete in the mirror (or there is
        none); else one line naming it, the mirror and what to do (MirrorBehind's message)."""
        newest = self.newest_local()
        if newest is None or newest[0] in self.marked():
            return None
        return (f"the newest checkpoint {newest[1]} is not in run.mirror {self.mirror.url} (its upload failed or "
                f"was cut off: see above); without a shared file system it is on this machine only: run the same "
                f"command again once the store is reachable (it uploads it first), or copy {newest[1]} into the next "
                f"job's run.out_dir; run.mirror_allow_missing=true accepts this and exits 0")


class MirrorBehind(Exception):
    """The run ended (or stopped) with its newest checkpoint missing from run.mirror; exit status
    loop.MIRROR_BEHIND_EXIT unless run.mirror_allow_missing."""


def local_step(out_dir: Path) -> int:
    """The newest checkpoint this rank can read in out_dir by itself: a torch.save file, or a DCP
    folder with its `.metadata` (-1: none)."""
    return max((step for step, _ in checkpoints(out_dir) + dcp_checkpoints(out_dir)), default=-1)


def set_aside_newer(out_dir: Path, step: int) -> None:
    """Renames the checkpoints of out_dir newer than `step` `<name>.local-only` (not every rank has
    them: resuming from them would split the run), with a warning naming them."""
    for path in sorted(out_dir.glob("checkpoint-*")):
        m = PATTERN.search(path.name) or DCP_PATTERN.match(path.name)
        if m and int(m.group(1)) > step:
            aside = path.with_name(path.name + ".local-only")
            n = 0
            while aside.exists():
                n += 1
                aside = path.with_name(f"{path.name}.local-only.{n}")
            os.replace(path, aside)
            log.warning("%s is newer than the mirror's newest complete checkpoint but not in every rank's run folder "
                        "(no shared file system): kept as %s, resuming from the mirror's", path.name, aside.name)


def restore_from_mirror(mirror: Mirror, out_dir: Path, dist: DistInfo, config: dict | None = None) -> None:
    """Before the run folder is read for a resume (every rank calls it): makes the mirror's newest
    complete checkpoint local where it is newer than what every rank can read by itself (see the
    module docstring); one line says which was taken. `config` (the new run's `Config.to_dict()`)
    is checked against the one in the newest marker first, whether or not anything is to be
    downloaded: ConfigError naming run.mirror for a key a resume may not change (another run's
    mirror, whose checkpoints this run's keep-last-K would delete). CheckpointError, on every rank, if the mirror
    cannot be read or a download fails."""
    steps = all_gather(local_step(out_dir))
    manifest, error = None, None
    if dist.is_main:
        try:
            manifest = mirror.newest_complete(clean=True)
        except Exception as e:  # noqa: BLE001 - botocore's errors, a marker that is not JSON
            error = f"cannot read run.mirror '{mirror.url}' ({describe(e)}): {WHAT_TO_DO}"
    manifest, error = all_gather((manifest, error))[0]
    if error:
        raise CheckpointError(error)
    if manifest is None:
        return
    # another run's mirror: refused by every rank alike before anything is downloaded, and also when
    # nothing would be (a run folder newer than the mirror): this run's uploads would prune its checkpoints
    if config is not None:
        check_resume_config(manifest.get("config"), config, Path(manifest["checkpoint"]), "run.mirror", mirror.url)
    if len(set(steps)) == 1 and steps[0] >= manifest["step"]:
        return
    if dist.local_rank == 0:
        set_aside_newer(out_dir, manifest["step"])
    size = 0
    for mine in (dist.is_main, dist.local_rank == 0 and not dist.is_main):  # one rank, then one per node
        failed = None
        if mine:
            try:
                size += mirror.download(manifest, out_dir)
            except CheckpointError as e:
                failed = str(e)
        if reported := first_reported(failed):
            raise CheckpointError(reported[1])
    barrier()
    have = "none" if max(steps) < 0 else f"step {max(steps)}" + ("" if len(set(steps)) == 1 else " (not on every rank)")
    log.info("resuming from the mirror: %s from %s, its newest complete checkpoint (%.1f MB downloaded; the run "
             "folder's newest: %s)", manifest["checkpoint"], mirror.url, size / 1e6, have)
