"""Atomic checkpoints (temp file + rename), the last K kept, loadable with weights_only=True."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from simmim.pipeline.errors import CheckpointError
from simmim.pipeline.io import atomic_write

log = logging.getLogger(__name__)
PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")
__all__ = ["CheckpointError", "checkpoints", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


@contextlib.contextmanager
def one_process(no_dist: bool):
    """Around a DCP save / load: with no_dist=True, DCP's "torch.distributed is ... uninitialized,
    assuming the intent is to save (load) in a single process" UserWarning is ignored. DCP issues it
    on every call made without a process group, even when no_dist=True asks for exactly that, so
    a one-process FSDP run printed it at every checkpoint; this is the only warning ignored, and
    only there (a process group present: nothing is filtered)."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r"torch\.distributed is (disabled, )?unavailable or uninitialized, "
                                            r"assuming the intent is to (save|load) in a single process")
        yield


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


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint as one dict ({"model", "optimizer", "train_state", "scaler", "config"}) on the
    CPU: a torch.save file (weights_only), or a DCP folder consolidated in memory. Raises
    CheckpointError for a missing, truncated or foreign one; the message says what is wrong, not
    what to do (that depends on the command: resume falls back to an older one, evaluate and
    finetune name another)."""
    path = Path(path)
    if is_dcp_checkpoint(path):
        try:
            return consolidate(path)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a missing or truncated shard
            raise CheckpointError(f"checkpoint '{path}' cannot be read ({_first_line(e)})") from None
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:  # the process's state, not the file's: never set a good checkpoint aside for it
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """`Type: first line of the message`; for DCP's CheckpointException, its first rank's error."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    first = (str(e).strip().splitlines() or [""])[0]
    if len(first) > 120:  # cut at a word, and say so
        first = first[:120].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {first}"


def all_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Every checkpoint of a run folder by global step, oldest first: checkpoint-{step}.pt files
    (train.parallel=ddp) and checkpoint-{step} folders (DCP, train.parallel=fsdp), readable or not.
    A `.checkpoint-{step}.tmp` folder (a DCP save that did not finish) or a `*.corrupt` one set
    aside is never a checkpoint."""
    out_dir = Path(out_dir)
    folders = [(int(m.group(1)), p) for p in out_dir.glob("checkpoint-*") if p.is_dir() and (m := DCP_PATTERN.match(p.name))]
    return sorted(checkpoints(out_dir) + folders)


def peek_checkpoint(path: str | Path) -> dict:
    """What a resume needs to decide before building anything: for a .pt file its whole contents
    (loaded once), for a DCP folder all but the tensors (train_state, scaler, config; the tensors
    are read in place, sharded, by DCPCheckpointer.load). Raises CheckpointError if it cannot be
    read or holds no model and optimizer state."""
    path = Path(path)
    if path.is_dir():
        keys = dcp_keys(path)
        if not any(k.startswith("app.model.") for k in keys) or not any(k.startswith("app.optim.") for k in keys):
            raise CheckpointError(f"checkpoint '{path}' holds no model and optimizer state")
        return read_dcp_train_state(path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"model", "optimizer"} <= ckpt.keys():
        raise CheckpointError(f"checkpoint '{path}' holds no model and optimizer state")
    return ckpt


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(Path(out_dir))
    return found[-1][1] if found else None


class TorchSaveCheckpointer:
    """train.parallel=ddp: rank 0 writes the whole model and optimizer to checkpoint-{step}.pt
    (atomically), every rank reads it. `train_state` is the rest of a checkpoint (train_state,
    scaler, config), saved beside "model" and "optimizer". Write failures raise CheckpointError."""

    def __init__(self, out_dir: Path, is_main: bool, keep_last: int = 3):
        self.out_dir, self.is_main, self.keep_last = Path(out_dir), is_main, keep_last

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out_dir)

    def save(self, step: int, model, optimizer, train_state: dict, any_rank: bool = False) -> Path | None:
        """Rank 0 writes (or this rank, if `any_rank`: DDP's states are replicated, so one rank
        alone can save them); the others return None."""
        if not (self.is_main or any_rank):
            return None
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **train_state}
        return save_checkpoint(self.out_dir, step, state, self.keep_last)

    def load(self, path: Path, model, optimizer, ckpt: dict | None = None) -> dict:
        """Loads model and optimizer state in place from `ckpt` (the file's contents, read by the
        caller already) or from the file; returns the rest. CheckpointError if it does not fit."""
        if Path(path).is_dir():
            raise CheckpointError(f"checkpoint '{path}' is a DCP folder (written with train.parallel=fsdp): "
                                  f"resume it with train.parallel=fsdp")
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:  # the config check passed, yet the shapes differ: say so in one line
            first = str(e).strip().splitlines()[-1].strip()[:200]
            raise CheckpointError(f"checkpoint '{path}' does not fit this model ({first}): set another "
                                  f"run.out_dir for a new run") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        return {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}

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
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

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


def is_dcp_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def remove_partial_saves(out_dir: Path) -> None:
    """Deletes .checkpoint-*.tmp folders left by a save that did not finish (rank 0 only)."""
    for tmp in Path(out_dir).glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path, out_dir: Path, keep_last: int) -> None:
    """tmp -> final (replacing an older save of the same step), then keep the newest keep_last."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    for _, stale in dcp_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)


class DCPCheckpointer:
    """Saves and loads DCP checkpoints for every rank; rank 0 (`is_main`) publishes and prunes.

    async_save: the state is staged to host memory, then written by a background thread over a
    separate gloo group while training goes on; the next save (or `wait()`) waits for it."""

    def __init__(self, out_dir: Path, is_main: bool, keep_last: int = 3, async_save: bool = False):
        import torch.distributed as dist

        self.out_dir, self.is_main, self.keep_last = Path(out_dir), is_main, keep_last
        self.distributed = dist.is_initialized()
        self.async_group = dist.new_group(backend="gloo") if async_save and self.distributed else None
        self.async_save = async_save
        self.pending, self.pending_tmp = None, None
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_saves(self.out_dir)

    def latest(self) -> Path | None:
        found = dcp_checkpoints(self.out_dir)
        return found[-1][1] if found else None

    def save(self, step: int, model, optimizer, train_state: dict, any_rank: bool = False) -> Path:
        """Writes checkpoint-{step} (every rank calls this: `any_rank` cannot apply, each rank
        holds only its shards); returns its path (published when this returns, or when the async
        write finishes). A write failure on any rank (a full disk) raises CheckpointError on every
        rank, the partial folder removed and the checkpoints before it intact."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

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
            self.pending_tmp = tmp
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
        return final

    def wait(self) -> None:
        """Waits for an async save in flight (raises its error, if any)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            try:
                pending.result()
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                self._failed(e, self.pending_tmp)
            if self.distributed:
                import torch.distributed as dist

                dist.barrier()  # rank 0's publish callback has run before anyone looks for the folder

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

    def load(self, path: Path, model, optimizer, ckpt: dict | None = None) -> dict:
        """Loads model and optimizer state in place (resharded to this world size); returns the
        train state saved beside them (`ckpt`, if the caller read it already). CheckpointError if
        a shard cannot be read or does not fit the model."""
        import torch.distributed.checkpoint as dcp

        if not Path(path).is_dir():
            raise CheckpointError(f"checkpoint '{path}' is a torch.save file (written with train.parallel=ddp): "
                                  f"resume it with train.parallel=ddp")
        train = read_dcp_train_state(path) if ckpt is None else ckpt
        try:
            with one_process(not self.distributed):
                dcp.load({"app": ModelOptimizerState(model, optimizer)}, checkpoint_id=str(path),
                         no_dist=not self.distributed)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a truncated shard, another model
            raise CheckpointError(f"checkpoint '{path}' cannot be loaded into this model ({_first_line(e)}): "
                                  f"set another run.out_dir for a new run") from None
        return {k: v for k, v in train.items() if k not in ("model", "optimizer")}


def read_dcp_train_state(path: str | Path) -> dict:
    """The train state (train_state, scaler, config), saved as one JSON entry in a DCP checkpoint,
    read without its tensors. CheckpointError if it cannot be read."""
    import torch.distributed.checkpoint as dcp

    entry = {"train": {"json": ""}}
    try:
        with one_process(True):
            dcp.load(entry, checkpoint_id=str(path), no_dist=True)
        return json.loads(entry["train"]["json"])
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - no .metadata, a truncated file
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({_first_line(e)})") from None


def dcp_keys(path: str | Path) -> set[str]:
    """The flattened keys of a DCP checkpoint's .metadata ("app.model.<fqn>", "app.optim.<...>",
    "train.json"). CheckpointError if there is no readable .metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as e:  # noqa: BLE001 - missing or truncated .metadata
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({_first_line(e)})") from None


def consolidate(path: str | Path, out: str | Path | None = None) -> dict:
    """A DCP checkpoint as one torch.save-style dict {"model", "optimizer"?, "config", ...} (the
    layout train.parallel=ddp writes), through torch.distributed.checkpoint.format_utils.
    dcp_to_torch_save; also written to `out` (atomically) when given."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not is_dcp_checkpoint(path):
        raise FileNotFoundError(f"'{path}' is not a complete DCP checkpoint (no .metadata)")
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "full.pt"
        with one_process(True):
            dcp_to_torch_save(path, flat)
        full = torch.load(flat, map_location="cpu", weights_only=False)
    app = full.get("app", {})
    state = {**json.loads(full["train"]["json"]), "model": app.get("model", {})}
    if "optim" in app:
        state["optimizer"] = app["optim"]
    if out is not None:
        atomic_write(Path(out), lambda t: torch.save(state, t))
    return state


def make_checkpointer(parallel: str, out_dir: Path, is_main: bool, keep_last: int, async_save: bool):
    """torch.save files for DDP, sharded DCP folders for FSDP2 (see each class)."""
    if parallel == "fsdp":
        return DCPCheckpointer(out_dir, is_main, keep_last, async_save)
    return TorchSaveCheckpointer(out_dir, is_main, keep_last)
