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
    """Writes out_dir/checkpoint-{global step}.pt and deletes all but the newest `keep_last`."""
    path = Path(out_dir) / f"checkpoint-{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for _, old in checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path` (weights_only=True, on the CPU). CheckpointError if it is missing
    or cannot be read (truncated, not a torch file, holds arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}): "
                              f"delete it to resume from an earlier one") from None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(Path(out_dir))
    return found[-1][1] if found else None
