"""Atomic checkpoints (temp file + rename), the last K kept, loadable with weights_only=True."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from simmim.pipeline.errors import CheckpointError
from simmim.pipeline.io import atomic_write

log = logging.getLogger(__name__)
PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")
__all__ = ["CheckpointError", "checkpoints", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("checkpoint-*.pt") if (m := PATTERN.search(p.name))]
    return sorted(found)


def save_checkpoint(out_dir: Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Writes out_dir/checkpoint-{global step}.pt and deletes all but the newest `keep_last`.
    Raises CheckpointError when the file cannot be written (a full disk), leaving no partial file."""
    path = Path(out_dir) / f"checkpoint-{step:08d}.pt"
    try:
        atomic_write(path, lambda tmp: _save(state, tmp))
    except (OSError, RuntimeError) as e:
        io = _os_error(e)  # a full disk or quota: torch's writer reports it as a RuntimeError
        if io is None:
            raise
        raise CheckpointError(f"cannot write checkpoint '{path}' ({io.strerror or io}): free space in (or fix the "
                              f"permissions of) {path.parent}; the checkpoints before it are intact") from None
    for _, old in checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def _save(state: dict, tmp: str) -> None:
    with open(tmp, "wb") as f:  # through a Python file, a failed write keeps its OSError (errno)
        torch.save(state, f)


def _os_error(e: BaseException) -> OSError | None:
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents on the CPU (weights_only). Raises CheckpointError for a missing,
    truncated or foreign file; the message says what is wrong, not what to do (that depends on
    the command: resume falls back to an older one, evaluate and finetune name another)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: {first})") from None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(Path(out_dir))
    return found[-1][1] if found else None
