"""Writing checkpoints, in two formats behind one `Checkpointer` protocol, and finding them in a
run folder. Reading one, whatever wrote it, is trainer/checkpoint_reader.py's `read_checkpoint`.

- `TorchSaveCheckpointer` (train.parallel=ddp): checkpoint-{step}.pt, one torch.save file (temp
  file + rename), the last K kept.
- `DCPCheckpointer` (train.parallel=fsdp): checkpoint-{step}/, torch.distributed.checkpoint's
  folder of every rank's shards, published by rename once complete.
- `all_checkpoints` / `checkpoints` / `dcp_checkpoints` list a run folder's checkpoints;
  `newest_readable_checkpoint` picks the one a resume starts from (read by `read_checkpoint`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

from simmim.core.errors import CheckpointError
from simmim.core.io import atomic_write

from .checkpoint_reader import CheckpointContents, WeightsOnlyLoadPlanner, first_line, one_process, read_checkpoint

PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")
__all__ = ["DCP_PATTERN", "PATTERN", "Checkpointer", "DCPCheckpointer", "TorchSaveCheckpointer", "all_checkpoints",
           "checkpoints", "dcp_checkpoints", "make_checkpointer", "newest_readable_checkpoint", "remove_partial_saves",
           "save_checkpoint"]


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
    """The OSError behind `e`, if any: its cause chain, or a rank's failure in DCP's
    CheckpointException."""
    for failure, _ in (getattr(e, "failures", None) or {}).values():
        if (io := _os_error(failure)) is not None:
            return io
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e



def all_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Every checkpoint of a run folder by global step, oldest first: checkpoint-{step}.pt files
    (train.parallel=ddp) and checkpoint-{step} folders (DCP, train.parallel=fsdp), readable or not.
    A `.checkpoint-{step}.tmp` folder (a DCP save that did not finish) or a `*.corrupt` one set
    aside is never a checkpoint."""
    out_dir = Path(out_dir)
    folders = [(int(m.group(1)), p) for p in out_dir.glob("checkpoint-*") if p.is_dir() and (m := DCP_PATTERN.match(p.name))]
    return sorted(checkpoints(out_dir) + folders)


class Checkpointer(Protocol):
    """What the loop asks of a checkpoint format: `TorchSaveCheckpointer` (train.parallel=ddp: one
    torch.save file per checkpoint, written by rank 0) and `DCPCheckpointer` (fsdp: one folder of
    every rank's shards). Both read through `read_checkpoint`."""
    out_dir: Path

    def save(self, step: int, model, optimizer, train_state: dict, any_rank: bool = False) -> Path | None:
        """Writes checkpoint-{step} (atomically) and keeps the newest keep_last; CheckpointError
        when it cannot be written (the checkpoints before it intact)."""

    def load(self, contents: CheckpointContents, model, optimizer) -> dict:
        """Resume: loads model and optimizer state in place from the checkpoint `contents` was read
        from (by `newest_readable`); returns the rest (train_state, scaler, config)."""

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(global step, path) of every checkpoint in the run folder, oldest first."""

    def newest_readable(self) -> tuple[CheckpointContents | None, list[tuple[Path, CheckpointError]]]:
        """The newest checkpoint that reads and the newer ones that do not (see
        `newest_readable_checkpoint`)."""

    def wait(self) -> None:
        """Returns once a save in flight (async) is written."""


class RunFolderCheckpoints:
    """The listing half of `Checkpointer`, the same for both formats: a run folder may hold either
    (a resume with the other train.parallel is refused by `load`, in one line)."""
    out_dir: Path

    def checkpoints(self) -> list[tuple[int, Path]]:
        return all_checkpoints(self.out_dir)

    def newest_readable(self) -> tuple[CheckpointContents | None, list[tuple[Path, CheckpointError]]]:
        return newest_readable_checkpoint(self.out_dir)


class TorchSaveCheckpointer(RunFolderCheckpoints):
    """train.parallel=ddp: rank 0 writes the whole model and optimizer to checkpoint-{step}.pt
    (atomically), every rank reads it. `train_state` is the rest of a checkpoint (train_state,
    scaler, config), saved beside "model" and "optimizer". Write failures raise CheckpointError."""

    def __init__(self, out_dir: Path, is_main: bool, keep_last: int = 3):
        self.out_dir, self.is_main, self.keep_last = Path(out_dir), is_main, keep_last

    def save(self, step: int, model, optimizer, train_state: dict, any_rank: bool = False) -> Path | None:
        """Rank 0 writes (or this rank, if `any_rank`: DDP's states are replicated, so one rank
        alone can save them); the others return None."""
        if not (self.is_main or any_rank):
            return None
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **train_state}
        return save_checkpoint(self.out_dir, step, state, self.keep_last)

    def load(self, contents: CheckpointContents, model, optimizer) -> dict:
        """Loads model and optimizer state in place from `contents` (the file, read whole); returns
        the rest. CheckpointError if it does not fit."""
        path = contents.path
        if contents.format == "dcp":
            raise CheckpointError(f"checkpoint '{path}' is a DCP folder (written with train.parallel=fsdp): "
                                  f"resume it with train.parallel=fsdp")
        try:
            model.load_state_dict(contents.model)
        except RuntimeError as e:  # the config check passed, yet the shapes differ: say so in one line
            first = str(e).strip().splitlines()[-1].strip()[:200]
            raise CheckpointError(f"checkpoint '{path}' does not fit this model ({first}): set another "
                                  f"run.out_dir for a new run") from None
        optimizer.load_state_dict(contents.optimizer)
        return contents.train

    def wait(self) -> None:
        pass


# ---------------------------------------------------------------- sharded (DCP) checkpoints
#
# train.parallel=fsdp writes checkpoints through torch.distributed.checkpoint: a folder
# checkpoint-{step} holding every rank's shards (written in parallel) and DCP's .metadata. The
# folder is written as .checkpoint-{step}.tmp and renamed by rank 0 once DCP has returned on every
# rank (its coordinator writes .metadata last), so a folder with the final name is complete; a
# killed save leaves only a .tmp folder, which the next save or start removes. Model and
# optimizer state go through get_state_dict / set_state_dict (fully qualified names, sharded
# DTensors under FSDP2), so a checkpoint loads at any world size, sharded or not: DCP reshards.
DCP_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class ModelOptimizerState:
    """DCP's Stateful for a model and its optimizer (plain, DDP-free or FSDP2-sharded)."""

    def __init__(self, model, optimizer=None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])


def dcp_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete DCP checkpoints in out_dir, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("checkpoint-*")
             if p.is_dir() and (m := DCP_PATTERN.match(p.name)) and (p / ".metadata").is_file()]
    return sorted(found)



def remove_partial_saves(out_dir: Path) -> None:
    """Deletes .checkpoint-*.tmp folders left by a save that did not finish (rank 0 only)."""
    for tmp in Path(out_dir).glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path, out_dir: Path, keep_last: int, shards_only: bool = False) -> None:
    """tmp -> final (replacing an older save of the same step), then keep the newest keep_last
    (`shards_only`: of the folders without a `.metadata`, another node's share of each save)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    published = sorted((int(m.group(1)), p) for p in out_dir.glob("checkpoint-*") if (m := DCP_PATTERN.match(p.name))
                       and p.is_dir()) if shards_only else dcp_checkpoints(out_dir)
    for _, stale in published[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)


class DCPCheckpointer(RunFolderCheckpoints):
    """Saves and loads DCP checkpoints for every rank; rank 0 (`is_main`) publishes and prunes.

    async_save: the state is staged to host memory, then written by a background thread over a
    separate gloo group while training goes on; the next save (or `wait()`) waits for it.

    node_main (local rank 0): on nodes without a shared file system, rank 0's publish is not seen
    on the other nodes, where DCP wrote those ranks' shards into the `.tmp` folder: each node's
    local rank 0 then publishes and prunes its node's share the same way (run.mirror uploads every
    rank's shards, and a resume there comes from the mirror: trainer/mirror.py)."""

    def __init__(self, out_dir: Path, is_main: bool, keep_last: int = 3, async_save: bool = False,
                 node_main: bool | None = None):
        self.out_dir, self.is_main, self.keep_last = Path(out_dir), is_main, keep_last
        self.node_main = is_main if node_main is None else node_main
        self.distributed = dist.is_initialized()
        self.async_group = dist.new_group(backend="gloo") if async_save and self.distributed else None
        self.async_save = async_save
        self.pending, self.pending_tmp, self.pending_final = None, None, None
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_saves(self.out_dir)

    def save(self, step: int, model, optimizer, train_state: dict, any_rank: bool = False) -> Path:
        """Writes checkpoint-{step} (every rank calls this: `any_rank` cannot apply, each rank
        holds only its shards); returns its path (published when this returns, or when the async
        write finishes). A write failure on any rank (a full disk) raises CheckpointError on every
        rank, the partial folder removed and the checkpoints before it intact."""
        if any_rank and self.distributed and dist.get_world_size() > 1:
            raise ValueError("a sharded (FSDP2) checkpoint needs every rank")
        self.wait()
        final = self.out_dir / f"checkpoint-{step:08d}"
        tmp = self.out_dir / f".{final.name}.tmp"
        if self.is_main:
            remove_partial_saves(self.out_dir)
            tmp.mkdir(parents=True)
        if self.distributed:
            dist.barrier()
        state = {"app": ModelOptimizerState(model, optimizer), "train": {"json": json.dumps(train_state)}}
        if self.async_save:
            self.pending = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.async_group)
            self.pending_tmp, self.pending_final = tmp, final
            if self.is_main:
                self.pending.add_done_callback(
                    lambda f: f.exception() is None and _publish(tmp, final, self.out_dir, self.keep_last))
            return final
        try:  # returns on every rank once .metadata is written; a failure on any rank raises on all
            with one_process(not self.distributed):
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not self.distributed)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors are BaseExceptions
            self._failed(e, tmp)
        if self.is_main:
            _publish(tmp, final, self.out_dir, self.keep_last)
        if self.distributed:
            dist.barrier()
        self._publish_node(tmp, final)
        return final

    def _publish_node(self, tmp: Path, final: Path, publish_may_lag: bool = False) -> None:
        """After every rank's save (and rank 0's publish): a node's local rank 0 that does not see
        the published folder (no shared file system) publishes its node's shards, and removes
        what killed saves left on its node (no other save is under way: every rank has returned).
        `publish_may_lag` (async: rank 0 publishes in the future's callback, which may run after
        the barrier): a `.metadata` in tmp is rank 0's, so the folder is shared and left to it."""
        if publish_may_lag and (tmp / ".metadata").exists():
            return
        if self.node_main and not self.is_main and tmp.is_dir() and not final.exists():
            for stale in self.out_dir.glob(".checkpoint-*.tmp"):
                if stale != tmp:
                    shutil.rmtree(stale, ignore_errors=True)
            _publish(tmp, final, self.out_dir, self.keep_last, shards_only=True)

    def wait(self) -> None:
        """Waits for an async save in flight (raises its error, if any)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            try:
                pending.result()
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                self._failed(e, self.pending_tmp)
            if self.distributed:
                dist.barrier()  # rank 0's publish callback has run before anyone looks for the folder
            self._publish_node(self.pending_tmp, self.pending_final, publish_may_lag=True)

    def _failed(self, e: BaseException, tmp: Path) -> None:
        """A failed save: its partial folder removed (rank 0), CheckpointError for a write that
        failed with an OSError (a full disk, a quota, permissions), else the error itself."""
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        io = _os_error(e)
        if io is None:
            raise e
        raise CheckpointError(f"cannot write checkpoint '{tmp.name.removeprefix('.').removesuffix('.tmp')}' in "
                              f"{self.out_dir} ({io.strerror or io}): free space in (or fix the permissions of) "
                              f"{self.out_dir}; the checkpoints before it are intact") from None

    def load(self, contents: CheckpointContents, model, optimizer) -> dict:
        """Loads model and optimizer state in place (resharded to this world size) from the folder
        `contents` was read from (its train state: `read_checkpoint(..., tensors=False)`); returns
        that train state. CheckpointError if a shard cannot be read or does not fit the model."""
        path = contents.path
        if contents.format != "dcp":
            raise CheckpointError(f"checkpoint '{path}' is a torch.save file (written with train.parallel=ddp): "
                                  f"resume it with train.parallel=ddp")
        try:
            with one_process(not self.distributed):
                dcp.load({"app": ModelOptimizerState(model, optimizer)}, checkpoint_id=str(path),
                         planner=WeightsOnlyLoadPlanner(), no_dist=not self.distributed)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a truncated shard, another model
            raise CheckpointError(f"checkpoint '{path}' cannot be loaded into this model ({first_line(e)}): "
                                  f"set another run.out_dir for a new run") from None
        return contents.train


def make_checkpointer(parallel: str, out_dir: Path, is_main: bool, keep_last: int, async_save: bool,
                      node_main: bool | None = None) -> Checkpointer:
    """torch.save files for DDP, sharded DCP folders for FSDP2 (see each class)."""
    if parallel == "fsdp":
        return DCPCheckpointer(out_dir, is_main, keep_last, async_save, node_main)
    return TorchSaveCheckpointer(out_dir, is_main, keep_last)


def newest_readable_checkpoint(out_dir: str | Path) -> tuple[CheckpointContents | None, list]:
    """The newest checkpoint in `out_dir` that reads (a .pt file read whole; a DCP folder's train
    state, its .metadata listing model and optimizer state; an unfinished `.checkpoint-*.tmp`
    folder is never one), or None if there is none, and [(path, CheckpointError)] of the newer ones
    that do not read. Raises CheckpointError if checkpoints exist and none reads. Reads only; see
    runfolder.set_aside."""
    bad: list[tuple[Path, CheckpointError]] = []
    for _, path in reversed(all_checkpoints(Path(out_dir))):
        try:
            contents = read_checkpoint(path, tensors=False)
            if contents.format != "dcp" and not isinstance(contents.optimizer, dict):
                raise CheckpointError(f"checkpoint '{path}' holds no model and optimizer state")
        except CheckpointError as e:  # a file renamed by rank 0 under another rank reads as missing
            bad.append((path, e))
            continue
        return contents, bad
    if bad:
        raise CheckpointError(f"no checkpoint in '{out_dir}' can be read ({len(bad)} tried; newest: {bad[0][1]}): "
                              f"move them away to start afresh, or set another run.out_dir")
    return None, bad
