"""Atomic checkpoints (temp file + rename), the last K kept, loadable with weights_only=True."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")


UMASK = os.umask(0o022)
os.umask(UMASK)


def atomic_write(path: Path, write) -> None:
    """Calls write(tmp_path), then renames tmp onto `path`: readers see the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """A checkpoint as one dict ({"model", "optimizer", "train_state", "scaler", "config"}): a
    torch.save file, or a DCP folder consolidated in memory."""
    path = Path(path)
    if is_dcp_checkpoint(path):
        return consolidate(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ValueError(f"checkpoint '{path}' cannot be read ({type(e).__name__}): "
                         f"delete it to resume from an earlier one") from None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(Path(out_dir))
    return found[-1][1] if found else None


class TorchSaveCheckpointer:
    """train.parallel=ddp: rank 0 writes the whole model and optimizer to checkpoint-{step}.pt
    (atomically), every rank reads it. `train_state` is the rest of a checkpoint (train_state,
    scaler, config), saved beside "model" and "optimizer"."""

    def __init__(self, out_dir: Path, is_main: bool, keep_last: int = 3):
        self.out_dir, self.is_main, self.keep_last = Path(out_dir), is_main, keep_last
        self._cached: tuple[Path, dict] | None = None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out_dir)

    def _read(self, path: Path) -> dict:
        if self._cached is None or self._cached[0] != path:
            self._cached = (path, load_checkpoint(path))
        return self._cached[1]

    def read(self, path: Path) -> dict:
        return {k: v for k, v in self._read(path).items() if k not in ("model", "optimizer")}

    def save(self, step: int, model, optimizer, train_state: dict) -> Path | None:
        if not self.is_main:
            return None
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **train_state}
        return save_checkpoint(self.out_dir, step, state, self.keep_last)

    def load(self, path: Path, model, optimizer) -> dict:
        ckpt = self._read(path)
        self._cached = None
        model.load_state_dict(ckpt["model"])
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
        self.pending = None
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_saves(self.out_dir)

    def latest(self) -> Path | None:
        found = dcp_checkpoints(self.out_dir)
        return found[-1][1] if found else None

    def read(self, path: Path) -> dict:
        return read_dcp_train_state(path)

    def save(self, step: int, model, optimizer, train_state: dict) -> Path:
        """Writes checkpoint-{step} (every rank calls this); returns its path (published when this
        returns, or when the async write finishes)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

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
            if self.is_main:
                self.pending.add_done_callback(
                    lambda f: f.exception() is None and _publish(tmp, final, self.out_dir, self.keep_last))
            return final
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not self.distributed)  # returns on every rank once .metadata is written
        if self.is_main:
            _publish(tmp, final, self.out_dir, self.keep_last)
        if self.distributed:
            dist.barrier()
        return final

    def wait(self) -> None:
        """Waits for an async save in flight (raises its error, if any)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()
            if self.distributed:
                import torch.distributed as dist

                dist.barrier()  # rank 0's publish callback has run before anyone looks for the folder

    def load(self, path: Path, model, optimizer) -> dict:
        """Loads model and optimizer state in place (resharded to this world size); returns the
        train state saved beside them."""
        import torch.distributed.checkpoint as dcp

        train = read_dcp_train_state(path)
        dcp.load({"app": ModelOptimizerState(model, optimizer)}, checkpoint_id=str(path), no_dist=not self.distributed)
        return train


def read_dcp_train_state(path: str | Path) -> dict:
    """The train state (train_state, scaler, config), saved as one JSON entry in a DCP checkpoint,
    read without its tensors."""
    import torch.distributed.checkpoint as dcp

    entry = {"train": {"json": ""}}
    dcp.load(entry, checkpoint_id=str(path), no_dist=True)
    return json.loads(entry["train"]["json"])


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
