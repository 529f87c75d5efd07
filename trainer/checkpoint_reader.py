"""Reading a checkpoint, whatever wrote it: `read_checkpoint(path) -> CheckpointContents`.

It reads this project's torch.save files (train.parallel=ddp) and DCP folders (train.parallel=fsdp,
written by trainer/checkpoint.py), microsoft/SimMIM's, MMPretrain's and timm's files, .safetensors
files and hub folders holding model.safetensors. `CheckpointContents` gives the weights (plain
tensors, unsharded), the config, the kind (pre-training / fine-tuning / encoder), the layout
(trainer/layouts.py), the class names and the settings the checkpoint records. Resume, `simmim
finetune`, `simmim evaluate` and `simmim export` use it; everything is read with weights_only=True
(or safetensors), never by unpickling objects. Writing checkpoints, and finding them in a run
folder, is trainer/checkpoint.py's (it imports this module, never the reverse).
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from simmim.core.errors import CheckpointError

from .layouts import (Kind, encoder_prefix, from_mmpretrain, is_ours, is_state_dict, kind_of, layout_name,
                      recorded_settings, tensor_settings, unwrap)

log = logging.getLogger(__name__)
__all__ = ["CheckpointContents", "WeightsOnlyLoadPlanner", "first_line", "is_dcp_checkpoint", "one_process",
           "read_checkpoint"]


# ---------------------------------------------------------------- the one reader
#
# Every consumer reads a checkpoint through `read_checkpoint`: resume (`newest_readable_checkpoint`,
# then the checkpointer's `load`), `simmim finetune` (finetune.pretrained), `simmim evaluate`,
# `simmim export`. Nothing is unpickled beyond tensors and plain containers: torch.save files with
# weights_only=True, DCP's non-tensor entries checked the same way (`WeightsOnlyLoadPlanner`),
# safetensors files through safetensors.

# The released SimMIM code saves its yacs config object in every checkpoint. weights_only loading
# refuses unknown classes; this reads `yacs.config.CfgNode` (a dict subclass: items, then a plain
# attribute dict holding a set) as an OrderedDict, so those files load without yacs and without
# unpickling arbitrary code. The tuple form (class, "module.name") is torch.serialization's own.
RELEASED_CONFIG_GLOBALS = [(collections.OrderedDict, "yacs.config.CfgNode"), set]
SAFETENSORS_FILES = ("model.safetensors", "pytorch_model.bin")  # a timm / HF hub folder's weights


@dataclass
class CheckpointContents:
    """What a checkpoint holds, whatever wrote it (see `read_checkpoint`).

    model: the weights (plain CPU tensors, unsharded), keyed as the writer named them, less the
    wrappers' prefixes (`layouts.strip_wrappers`); empty when read with tensors=False.
    encoder_prefix: the part of those keys before the encoder's own (timm) names, e.g.
    "encoder.swin." (this project's pre-training), "net." (its fine-tuning), "encoder."
    (microsoft/SimMIM), "backbone." (MMPretrain), "" (timm). `encoder()` strips it.
    config: this project's config dict (`Config.to_dict()`), or the writer's own record (the
    released code's yacs config as a dict), None if there is none; `settings` holds what either
    says about img_size / window_size / patch_size / in_chans (the image channels, data.channels),
    completed from the tensors (the patch embedding fixes patch_size and in_chans).
    classes: the class names of a fine-tuning checkpoint, in head order (None if not recorded).
    optimizer / train: a resume's optimizer state (None for a DCP folder: its checkpointer loads it
    sharded) and the rest of the checkpoint (train_state, scaler, config, ...).
    notes: what else was found and not used (an EMA copy), for the log."""
    path: Path
    format: str  # "torch.save" | "dcp" | "safetensors"
    layout: str  # "simmim", "microsoft/SimMIM", "MMPretrain/MMSelfSup", "timm", "weights under '<prefix>'"
    kind: Kind
    model: dict[str, torch.Tensor]
    encoder_prefix: str = ""
    naming: str = "timm"  # "timm" (and the original Swin code's) or "mmpretrain"
    config: dict | None = None
    classes: list[str] | None = None
    settings: dict[str, int] = field(default_factory=dict)
    optimizer: dict | None = None
    train: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def encoder(self) -> dict[str, torch.Tensor]:
        """The encoder's weights (and a fine-tuned head) with `encoder_prefix` removed, in timm's
        or the original Swin code's naming (MMPretrain's converted); the mask token is left out."""
        n = len(self.encoder_prefix)
        encoder = {k[n:]: v for k, v in self.model.items()
                   if k.startswith(self.encoder_prefix) and not k.endswith("mask_token")}
        return from_mmpretrain(encoder) if self.naming == "mmpretrain" else encoder

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std), one value per image channel in [0, 1] units, that the run normalised its
        images with: what this project's pre-training checkpoints record ("normalization", written
        by `PretrainTask.checkpoint_extra`), else the config's data.mean / data.std when set; None
        when the checkpoint does not say (older runs, other frameworks: ImageNet's for RGB)."""
        recorded = self.train.get("normalization")
        data = (self.config or {}).get("data") if is_ours(self.config) else None
        for source in (recorded, data):
            if isinstance(source, dict) and source.get("mean") and source.get("std"):
                return tuple(map(float, source["mean"])), tuple(map(float, source["std"]))
        return None


def read_checkpoint(path: str | Path, *, tensors: bool = True, what: str = "checkpoint",
                    hint: str = "pass another checkpoint") -> CheckpointContents:
    """Reads a checkpoint: a torch.save file (this project's, microsoft/SimMIM's, MMPretrain's, a
    timm train script's or a bare state dict), a DCP folder (train.parallel=fsdp), a .safetensors
    file, or a folder holding model.safetensors (timm / Hugging Face hub layout, `simmim export`).
    tensors=False: a DCP folder's train state alone (for resume; the checkpointer reads its tensors
    sharded); a file is read whole either way.

    Raises CheckpointError, one line starting "{what} '{path}'", for a missing, truncated or
    foreign file or one with no encoder weights; `hint` says what to do where that depends on the
    command (a resume falls back to an older checkpoint by itself)."""
    path = Path(path)
    label = f"{what} '{path}'"
    if not path.exists():
        raise CheckpointError(f"{label} does not exist")
    try:
        if is_dcp_checkpoint(path):
            return _contents(path, "dcp", _read_dcp(path, tensors))
        if path.is_dir():
            return _read_hub_folder(path, label)
        fmt, raw = _read_file(path, label, hint)
        return _contents(path, fmt, raw)
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(label) else f"{label} {message}") from None
    except MemoryError:  # the process's state, not the file's: never set a good checkpoint aside for it
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a truncated file or shard
        raise CheckpointError(f"{label} cannot be read ({first_line(e)}): it is truncated or not a "
                              f"checkpoint; {hint}") from None


def _read_file(path: Path, label: str, hint: str) -> tuple[str, object]:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and path.suffix != ".pt":  # u64 header length, then its JSON
        return "safetensors", load_file(path)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save: a zip, or a pickle (PROTO 0x80)
        raise CheckpointError(f"{label} is not a checkpoint (not a zip or pickle file, as torch.save writes, nor "
                              f"safetensors): {hint}")
    try:
        with torch.serialization.safe_globals(RELEASED_CONFIG_GLOBALS):
            return "torch.save", torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) and "global" not in str(e).lower():
            raise
    return "torch.save", _load_with_opaque_objects(path, label)


class Opaque:
    """Stands in for an object of a class that is not unpickled here (another framework's: mmengine's
    HistoryBuffer, argparse.Namespace, numpy scalars): built and given its state without running
    any of that class's code, and holding nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass


def _load_with_opaque_objects(path: Path, label: str):
    """torch.load(weights_only=True) once more, every class the file names besides tensors and plain
    containers read as `Opaque` (the names are found by disassembling the pickle, not by running
    it): frameworks save their loggers' and arguments' objects beside the weights."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(type(name.rsplit(".", 1)[-1], (Opaque,), {}), name) for name in names]
        with torch.serialization.safe_globals(RELEASED_CONFIG_GLOBALS + stand_ins):
            raw = torch.load(path, map_location="cpu", weights_only=True)
        log.info("%s: objects of %s read as empty placeholders (not unpickled)", label, ", ".join(names[:4]))
        return raw
    except pickle.UnpicklingError as e:  # a legacy (non-zip) file, or an object weights_only cannot build at all
        raise CheckpointError(f"{label} holds Python objects besides tensors that weights_only loading cannot read "
                              f"({first_line(e)}): save its state dict alone (torch.save(model.state_dict(), f)) "
                              f"where you trust the file") from None


def _read_hub_folder(path: Path, label: str) -> CheckpointContents:
    """A folder with timm's / the Hugging Face hub's model.safetensors (+ config.json)."""
    weights = next((path / f for f in SAFETENSORS_FILES if (path / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{label} is a folder without a checkpoint (no DCP .metadata, no model.safetensors): "
                              f"pass a checkpoint file, e.g. {path}/checkpoint-NNNNNNNN.pt, or a DCP checkpoint folder")
    config = path / "config.json"
    extra = json.loads(config.read_text()) if config.is_file() else None
    fmt, raw = _read_file(weights, label, "pass another checkpoint")
    return _contents(path, fmt, raw, extra)


def _contents(path: Path, fmt: str, raw, extra: dict | None = None) -> CheckpointContents:
    """Recognises the layout of what a file held (`layouts`)."""
    if fmt == "dcp" and not raw["model"]:  # read without tensors: ours, by construction
        train = {k: v for k, v in raw.items() if k != "model"}
        config = train.get("config")
        kind = Kind.FINETUNING if isinstance(config, dict) and "finetune" in config else Kind.PRETRAINING
        return CheckpointContents(path, fmt, "simmim", kind, {}, "", "timm", config, train.get("classes"),
                                  recorded_settings(None, config), None, train)
    top = raw if isinstance(raw, dict) and not is_state_dict(raw) else {}
    try:
        weights, where, notes = unwrap(raw)
        prefix, naming = encoder_prefix(weights)
    except CheckpointError:
        if "train_state" not in top and not is_ours(top.get("config")):
            raise
        # this project's own checkpoint reads whatever its model is (a resume needs no known encoder);
        # the command that uses it judges the weights (e.g. finetune: the config's model.arch first)
        weights, where, notes = top.get("model") if isinstance(top.get("model"), dict) else {}, "model", []
        prefix, naming = "", "timm"
    config = top.get("config") if isinstance(top.get("config"), dict) else None
    train = {k: v for k, v in top.items() if k not in ("model", "optimizer", where)}
    layout = layout_name(prefix, naming, top, config)
    contents = CheckpointContents(path, fmt, layout, kind_of(weights, prefix), weights, prefix, naming, config,
                                  top.get("classes"), {}, top.get("optimizer"), train, notes)
    # the tensors are what the weights are; the record fills in what they do not fix (the image size)
    contents.settings = {**recorded_settings(top, config, extra), **tensor_settings(contents.encoder())}
    return contents


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but each non-tensor entry (the train-state JSON, the optimizer's
    param_groups) must unpickle with weights_only=True before DCP's own unrestricted torch.load
    reads it: a DCP folder is held to the rule every other checkpoint read here is."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises UnpicklingError for anything but plain data
        value.seek(0)
        super().load_bytes(read_item, value)


def _read_dcp(path: Path, tensors: bool) -> dict:
    """A DCP checkpoint as {"model": weights (unsharded), "train": train state}, read in one
    process through torch.distributed.checkpoint's metadata (each tensor allocated at its global
    size, the shards gathered into it); the optimizer state is not read. tensors=False: only
    the train state."""
    meta = FileSystemReader(str(path)).read_metadata()
    if not any(k.startswith("app.model.") for k in meta.state_dict_metadata) or \
            not any(k.startswith("app.optim.") for k in meta.state_dict_metadata):
        raise CheckpointError("holds no model and optimizer state")
    state: dict = {"app": {"model": {}}, "train": {"json": ""}}
    for key, item in meta.state_dict_metadata.items() if tensors else ():
        where = meta.planner_data[key]  # ("app", "model", "<fully qualified name>")
        if where[:2] == ("app", "model") and isinstance(item, TensorStorageMetadata):
            state["app"]["model"][where[2]] = torch.empty(item.size, dtype=item.properties.dtype)
    with one_process(True):
        dcp.load(state, checkpoint_id=str(path), planner=WeightsOnlyLoadPlanner(), no_dist=True)
    return {"model": state["app"]["model"], **json.loads(state["train"]["json"])}


def is_dcp_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


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


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`; for DCP's CheckpointException, its first rank's error."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    first = (str(e).strip().splitlines() or [""])[0]
    if len(first) > 120:  # cut at a word, and say so
        first = first[:120].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {first}"
