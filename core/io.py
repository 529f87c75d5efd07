"""Atomic file output: a reader sees the old file or the new one, never half of one.

Every output the project writes (clean lists, reports, `.beton` side files, checkpoints, figures,
resolved configs, metrics) goes through `atomic_write`: the content is written to a temporary file
in the destination's folder, then renamed onto the destination (`os.replace`, atomic on POSIX
within one filesystem). The temporary file is created with mode 0o666, so the process umask
applies exactly as for any file `open()` creates (the usual 0644); nothing reads or changes the
umask.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
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
