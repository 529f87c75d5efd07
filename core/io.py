"""Atomic file output: a reader sees the old file or the new one, never half of one.

Every output the project writes (clean lists, reports, `.beton` side files, checkpoints, figures,
resolved configs, metrics) goes through `atomic_write`: the content is written to a temporary file
in the destination's folder, then renamed onto the destination (`os.replace`, atomic on POSIX
within one filesystem). The temporary file is created with mode 0o666, so the process umask
applies exactly as for any file `open()` creates (the usual 0644); nothing reads or changes the
umask.

A folder of outputs (the sample dataset, an export) is filled by `atomic_folder` in a temporary
sibling folder that is renamed into place. A process killed while writing one (SIGKILL, SIGTERM's
default action, a lost node) cannot clean up: the next `atomic_folder` or `remove_stale_partials`
for the same destination removes it, telling a dead writer's folder from a live one's by the flock(2)
the writer holds on it until it is done (the kernel releases it when the process dies).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError

# errno values of a write the user's world refused (permissions, a read-only or immutable folder, a
# full disk or quota): never a bug of ours, so one line naming the path, not a traceback
WRITE_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})
# the names atomic_write and check_folder_writable give their temporary files (`temporaries`)
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$|^\.write-probe-[0-9a-f]{8}$")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Calls `write(tmp_path)`, then renames tmp onto `path`; creates the parent folder. On any
    failure (an exception, Ctrl-C) the temporary file is removed and `path` is left as it was.
    Returns `path` as a Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:  # O_EXCL: a fresh name; 0o666 & ~umask, as open() would create it
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 1 in 4e9
            continue
        except OSError as e:  # name the file the caller asked for, not the temporary one
            raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str, errors: str | None = None) -> Path:
    """`text` to `path` as UTF-8, atomically; `errors` as for `open` (e.g. "surrogateescape" to
    write back file names that are not valid UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors=errors))


def write_json(path: str | os.PathLike, obj) -> Path:
    """`obj` as indented JSON (one trailing newline) to `path`, atomically."""
    return write_text(path, json.dumps(obj, indent=1) + "\n")


def check_folder_writable(folder: str | os.PathLike, name: str, error: type[UserError] = UserError) -> Path:
    """`folder` as a Path if files can be made in it, or, where it does not exist yet, in its
    nearest existing ancestor (where it would be made); else `error` in one line naming `name`.
    Probed by creating and removing a file, so the kernel answers as it will for the real writes:
    permission bits, a read-only mount and an immutable folder (chattr +i) alike (os.access says
    yes to root for all three). Nothing is left behind, and no folder is made."""
    folder = Path(folder)
    where = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not where.is_dir():
        raise error(f"{name} '{folder}' cannot be made: '{where}' is a file, not a folder")
    probe = where / f".write-probe-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        at = "" if where == folder else f" (in '{where}', where it would be made)"
        raise error(f"{name} '{folder}' cannot be written{at}: {e.strerror}; choose a writable folder, or fix its "
                    f"permissions / free space") from None
    return folder


def temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files `atomic_write` and `check_folder_writable` left in `folder` or below it
    (a process killed between writing and renaming: SIGKILL, out of memory, a node lost). Only the
    folder's owner may delete them (a run folder's lock holder): another process's write may be
    under way."""
    return sorted(p for p in Path(folder).rglob(".*") if TEMPORARY.match(p.name) and p.is_file())


def umask() -> int:
    """The process umask, read without changing it (Linux /proc; elsewhere the usual 0o022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _partials(out: Path) -> list[Path]:
    """The temporary folders `atomic_folder` makes beside `out`: `.{name}.<8 characters>.partial`."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.[A-Za-z0-9_]{{8}}\.partial$")
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if pattern.match(p.name) and p.is_dir() and not p.is_symlink())


def remove_stale_partials(out: str | os.PathLike) -> list[Path]:
    """Removes the temporary folders of `atomic_folder(out, ...)` calls whose process died before
    finishing (no flock held on them); a folder still being written is left alone. Returns the
    removed paths."""
    removed = []
    for tmp in _partials(Path(out)):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:  # its writer finished or another sweep took it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer
            os.close(fd)
            continue
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def _locked_partial(out: Path) -> tuple[Path, int]:
    """A fresh temporary folder beside `out` and the fd holding its flock."""
    while True:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        fd = os.open(tmp, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a sweep that found it unlocked in the instant after mkdtemp
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # that sweep removed it as a dead writer's: make another


def atomic_folder(out: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Fills the folder `out` atomically: `write(tmp)` fills a temporary sibling folder (flock held),
    which is renamed onto `out`; an existing `out` is renamed aside first and removed after. The
    folder and the files directly in it get the usual modes under the umask (mkdtemp makes 0700,
    safetensors 0600). Any exception, Ctrl-C
    included, removes the temporary folder and leaves `out` as it was; a killed writer's folder is
    removed by the next call (`remove_stale_partials`). Returns `out` as a Path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp, fd = _locked_partial(out)
    try:
        write(tmp)
        mask = umask()
        for f in tmp.iterdir():  # a library writing through its own temporary file (safetensors) leaves 0600
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~mask)
        tmp.chmod(0o777 & ~mask)
        if out.exists():  # aside under a partial's name: if killed now, the next call removes it
            old = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    return out
