"""The run folder stays consistent: one job owns it, a resume starts from a readable checkpoint,
and a resumed run is the same run.

- `RunLock`: run.out_dir/.lock, held with flock(2) by the job's rank 0 for the whole run. The
  kernel drops it when the process ends however it ends (SIGKILL, OOM, a node reboot), so a crashed
  job never leaves it stuck. A torchrun restart of the same job (same TORCHELASTIC_RUN_ID) waits a
  while for the old rank 0 to exit; any other job is refused at once. It is taken before the inputs
  are opened and is provisional until the run commits to the folder: a refused input removes it
  (and the folder, if the lock made it), so nothing is left behind.
- `set_aside`: the unreadable checkpoints newer than the one resumed (checkpoint.py's
  `newest_readable_checkpoint` finds them: truncated, foreign) are renamed to `*.corrupt`, with a
  warning naming them.
- `check_resume_config`: the checkpoint's config against the new one, before anything is written:
  only keys that leave the run the same run (`RESUMABLE`) may change.
"""
from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from simmim.core.errors import ConfigError
from simmim.core.io import temporaries

from .config import flatten

log = logging.getLogger("simmim")

# Keys a resume may change (fnmatch patterns over dotted keys): where the run writes and how often,
# its length, where the data is read from and how fast, the device and precision, the learning
# rates (lowered after a divergence), FSDP2's CPU offload and the batch split (the global batch is kept through
# accumulation). Anything else (the model, image and mask sizes, the augmentation, the seed,
# the optimizer's form) would make the checkpoint a different run's.
RESUMABLE = ("run.*", "train.epochs", "train.device", "train.precision", "train.compile", "train.cpu_offload",
             "train.grad_checkpointing", "train.channels_last", "train.max_skipped_steps", "train.accum_steps",
             "data.path", "data.val_path", "data.max_pixels", "data.backend", "data.batch_size", "data.num_workers", "data.ffcv.*",
             "data.dali.*", "data.stream.cache_dir", "data.stream.cache_limit", "data.stream.predownload",
             "data.stream.decode", "optim.base_lr", "optim.warmup_lr", "optim.min_lr",
             "optim.clip_grad", "model.fused_shuffle", "model.init_from", "finetune.val_path", "finetune.eval_every")


class RunFolderBusy(ConfigError):
    """Another job holds the run folder's lock."""


class RunLock:
    """An exclusive lock on `out_dir` for this process (use on rank 0 only); a context manager.

    `job` identifies the job (torchrun's run id): a lock held by the same job is waited for up to
    `wait_s` seconds (a restarted worker group whose old rank 0 is still exiting); a lock held by
    another job raises RunFolderBusy naming its pid and host.

    The lock is taken before the run's inputs are opened (so two jobs that start together cannot
    both pass their checks), but until `commit()` it is provisional: the lock file is all it has
    written, and a release before `commit()` (an input refused) removes the lock file and the
    folders it made, so a refused command leaves no run folder behind. A removed lock file cannot
    let two jobs in: a job that took the lock on a file that was removed meanwhile tries again
    (flock locks the file, so each holder checks that the path still names the file it locked)."""

    def __init__(self, out_dir: str | Path, job: str | None = None, wait_s: float = 90.0):
        out = Path(out_dir)
        self.path, self.committed, self.fd = out / ".lock", False, -1
        self.made = [p for p in reversed([out, *out.parents]) if not p.exists()]  # outermost first
        deadline = time.monotonic() + wait_s
        while True:
            out.mkdir(parents=True, exist_ok=True)  # again if a refused holder removed it meanwhile
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                if job and holder.get("job") == job and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise RunFolderBusy(
                    f"run.out_dir '{self.path.parent}' is in use by another job (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, since {holder.get('since', '?')}): wait for it to end, or set "
                    f"another run.out_dir") from None
            if _names(self.path, fd):
                break
            os.close(fd)  # locked a file a refused holder removed after we opened it: open the new one
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def commit(self) -> None:
        """The run's inputs are checked: from now on the folder is the run's, and the lock file stays."""
        self.committed = True

    def release(self) -> None:
        """Unlocks; before `commit()`, also removes the lock file and the (then empty) folders it made."""
        if self.fd < 0:
            return
        if not self.committed:
            with contextlib.suppress(OSError):
                self.path.unlink()
            for folder in reversed(self.made):
                with contextlib.suppress(OSError):  # not empty: someone else's files are there now
                    folder.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the open file `fd`."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def remove_leftovers(out_dir: str | Path) -> list[Path]:
    """Deletes what a stopped run left half-written in its folder, whatever stopped it (SIGKILL,
    out of memory, a node lost): atomic_write's temporary files (checkpoints, figures, metrics,
    config), a DCP save's `.checkpoint-*.tmp` folder and a replaced one's `.checkpoint-*.old`.
    Rank 0 only, holding the folder's lock (no other writer can be at work); returns them, said in
    one line."""
    out_dir = Path(out_dir)
    found = [*temporaries(out_dir), *(p for p in out_dir.glob(".checkpoint-*")
                                      if p.is_dir() and p.name.endswith((".tmp", ".old")))]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if found:
        log.info("removed %d file%s a stopped run left half-written: %s", len(found), "" if len(found) == 1 else "s",
                 ", ".join(str(p.relative_to(out_dir)) for p in found[:5]) + (" ..." if len(found) > 5 else ""))
    return found


def job_id() -> str | None:
    """The same for every worker group of one torchrun job (across restarts), else None."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")


def set_aside(bad: list, resumed: Path) -> None:
    """Renames each unreadable checkpoint (file or DCP folder) `<name>.corrupt` (kept for the user
    to judge, out of the resume order; `<name>.corrupt.1`, ... if that name is taken), with a
    warning naming it; rank 0 only."""
    for path, why in bad:
        if not path.exists():
            continue
        corrupt, n = path.with_name(path.name + ".corrupt"), 0
        while corrupt.exists():
            n += 1
            corrupt = path.with_name(f"{path.name}.corrupt.{n}")
        os.replace(path, corrupt)
        log.warning("%s; kept as %s, resumed from %s instead", why, corrupt.name, resumed.name)


def check_resume_config(saved: dict | None, new: dict, path: Path, key: str = "run.out_dir",
                        place: str | None = None) -> list[str]:
    """Compares a checkpoint's config with the new run's (both as `Config.to_dict()`); returns the
    changed keys a resume allows, raises ConfigError naming those it does not; keys only one side
    knows are not compared. `key` / `place`: where the checkpoint `path` is (run.out_dir and the
    path's folder; run.mirror and its URL for a mirror's), for the message."""
    if not saved:
        return []
    old, cur = flatten(saved), flatten(new)
    changed = [k for k in cur if k in old and old[k] != cur[k] and k != "run.out_dir"]  # the folder may move
    refused = [k for k in changed if not any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE)]
    if refused:
        diff = ", ".join(f"{k} {old[k]!r} -> {cur[k]!r}" for k in refused)
        allowed = [p for p in RESUMABLE if any(fnmatch.fnmatchcase(k, p) for k in cur)]  # this config's keys only
        raise ConfigError(f"{key} '{place or path.parent}' holds another run ({path.name}): {diff} cannot change on "
                          f"resume (only {', '.join(allowed)} can): set another {key}, or set them back")
    return changed
