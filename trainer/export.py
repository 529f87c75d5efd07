"""Export a pre-trained encoder for use elsewhere: timm (local folder / Hugging Face hub layout) or the
original Swin key layout that detection and segmentation codebases load.

    simmim export runs/demo/checkpoint-00000240.pt exported/demo            # timm: model.safetensors + config.json
    simmim export CKPT OUT_DIR --format swin                                # OUT_DIR/swin_encoder.pth

timm format: the encoder alone (mask token and prediction head dropped) in a timm model of the same
architecture, written with timm's own `save_for_hf` (`model.safetensors` and a `config.json` that names
a registered timm architecture plus the model arguments that differ), so that
`timm.create_model("local-dir:OUT_DIR", pretrained=True)` rebuilds it with no missing keys.

Swin format: `{"model": state_dict}` as the original Swin Transformer code saved it, which is what
detection / segmentation codebases' Swin backbones convert from: each stage's patch-merging layer is
stored at the end of the stage it follows (`layers.i.downsample`, i = 0..2; timm keeps it at the start
of the next stage), and the `relative_position_index` buffers are included.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf
from torch import nn

from simmim.core.errors import CheckpointError
from simmim.core.io import atomic_folder, remove_stale_partials
from simmim.kernels import LossOptions

from .checkpoint_reader import CheckpointContents, read_checkpoint
from .layouts import Kind, is_ours
from .model import ARCHS, build_simmim, default_stats

log = logging.getLogger("simmim")

FORMATS = ("timm", "swin")
# A registered timm architecture per encoder family: config.json names it, and the model arguments
# written beside it (embed_dim, depths, heads, window, image size) make it our exact encoder.
TIMM_ARCHITECTURES = {
    "swin": "swin_base_patch4_window7_224",
    "swinv2": "swinv2_base_window12_192",
    "vit": "beit_base_patch16_224",  # the paper's ViT is BEiT-style (trainer/model.py)
}


class ExportError(CheckpointError):
    """The checkpoint cannot be exported (not a SimMIM pre-training checkpoint, unknown encoder)."""


def read_pretraining_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """Returns (model state dict, config dict) of a simmim pre-training checkpoint (see `read_pretraining`)."""
    ckpt = read_pretraining(path)
    return ckpt.model, ckpt.config


def read_pretraining(path: str | Path) -> CheckpointContents:
    """A simmim pre-training checkpoint (a file or a DCP folder), read by `read_checkpoint`.

    Raises ExportError, naming the file, for a missing or unreadable file, a fine-tuned checkpoint
    (no mask token / prediction head) or a checkpoint without the config simmim writes.
    """
    path = Path(path)
    try:
        ckpt = read_checkpoint(path, hint="export reads what `simmim pretrain` writes")
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if ckpt.kind is not Kind.PRETRAINING:
        held = "a fine-tuned classifier" if ckpt.kind is Kind.FINETUNING else \
            "an encoder alone (fine-tuned or exported)"
        raise ExportError(f"'{path}' is not a SimMIM pre-training checkpoint (it holds {held}, {ckpt.layout} layout, "
                          f"no mask token): export the pre-training checkpoint, or load this one with timm directly")
    if ckpt.layout != "simmim" or not is_ours(ckpt.config):
        raise ExportError(f"'{path}' is a {ckpt.layout} checkpoint, not a simmim one (no model weights with their "
                          f"config): export reads what `simmim pretrain` writes")
    return ckpt


def encoder_network(model: nn.Module) -> nn.Module:
    """The timm network inside the SimMIM encoder (`SimMIM.encoder.<swin|vit|...>`)."""
    nets = [m for m in model.encoder.children() if hasattr(m, "default_cfg") or hasattr(m, "patch_embed")]
    if len(nets) != 1:
        raise RuntimeError(f"expected one timm network inside {type(model.encoder).__name__}, found {len(nets)}")
    return nets[0]


def build_encoder(config: dict, state: dict) -> tuple[nn.Module, str]:
    """Rebuilds the SimMIM model of `config`, loads `state` strictly and returns (its timm encoder
    network, family). Raises ExportError for an architecture this version does not know."""
    m, d = config.get("model", {}), config.get("data", {})
    arch = m.get("arch")
    if arch not in ARCHS:
        raise ExportError(f"the checkpoint's model.arch '{arch}' is unknown here (known: {', '.join(ARCHS)})")
    model = build_simmim(arch, d.get("img_size", 192), d.get("mask_patch_size", 32), m.get("window_size", 0),
                         loss=LossOptions(**config.get("loss", {})), head=m.get("head", "linear"),
                         in_chans=d.get("channels", 3))
    model.load_state_dict(state)
    return encoder_network(model).eval(), ARCHS[arch].family


def timm_model_args(net: nn.Module, family: str, img_size: int) -> dict:
    """The constructor arguments that make timm's registered architecture our encoder (in_chans:
    the image channels its patch embedding takes)."""
    in_chans = net.patch_embed.proj.in_channels
    if family in ("swin", "swinv2"):
        stages = net.layers
        return {"img_size": img_size, "patch_size": net.patch_embed.patch_size[0], "in_chans": in_chans,
                "embed_dim": net.embed_dim,
                "depths": [len(s.blocks) for s in stages],
                "num_heads": [s.blocks[0].attn.num_heads for s in stages],
                "window_size": _window(stages[0].blocks[0]), "num_classes": 0}
    args = {"img_size": img_size, "patch_size": net.patch_embed.patch_size[0], "in_chans": in_chans,
            "embed_dim": net.embed_dim, "depth": len(net.blocks), "num_heads": net.blocks[0].attn.num_heads, "num_classes": 0}
    if family == "vit":
        args.update(use_abs_pos_emb=net.pos_embed is not None,
                    use_shared_rel_pos_bias=net.rel_pos_bias is not None,
                    use_rel_pos_bias=net.blocks[0].attn.relative_position_bias_table is not None,
                    init_values=0.1, global_pool="avg", use_fc_norm=False)
    return args


def _window(block: nn.Module) -> int:
    w = getattr(block, "window_size", None)
    return int(w[0] if isinstance(w, (tuple, list)) else w)


def export_timm(net: nn.Module, family: str, img_size: int, out_dir: Path,
                normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Path:
    """Writes out_dir/model.safetensors + config.json with timm's `save_for_hf`; returns out_dir.
    config.json's model_args hold in_chans, its pretrained_cfg the input size (C, H, W) and the
    per-channel mean / std of `normalization` (the run's; default ImageNet's for 3 channels, else
    0.5 per channel), which `timm.data.resolve_data_config` hands to timm's transforms."""
    name = TIMM_ARCHITECTURES[family]
    args = timm_model_args(net, family, img_size)
    target = timm.create_model(name, pretrained=False, **args)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    missing, unexpected = target.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.endswith(("relative_position_index", "attn_mask"))]
    if missing or unexpected:
        raise RuntimeError(f"{name} does not hold the encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # config.json describes these weights, not the template architecture's own pretrained tag
    mean, std = normalization or default_stats(args["in_chans"])
    meta = {"pretrained_cfg": {"tag": "simmim", "crop_pct": 0.875, "origin_url": None, "mean": tuple(mean),
                               "std": tuple(std), "input_size": (args["in_chans"], img_size, img_size)}}
    _write_dir(out_dir, lambda tmp: save_for_hf(target, tmp, model_config=meta, safe_serialization=True))
    return out_dir


def swin_original_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """timm's Swin state dict in the original Swin code's layout (see the module docstring).

    Inverse of the layout half of timm's `swin_transformer.checkpoint_filter_fn`: timm's
    `layers.{i+1}.downsample.*` becomes `layers.{i}.downsample.*`. The merged-channel order is the
    same in both (timm concatenates the 2x2 neighbours in the original order), so no weight moves.
    """
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith(("head.", "fc_norm.")):
            continue
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda g: f"layers.{int(g.group(1)) - 1}.downsample", key)
        out[key] = value.detach().clone().contiguous()
    for name, module in net.named_modules():
        index = getattr(module, "relative_position_index", None)
        if isinstance(index, torch.Tensor) and f"{name}.relative_position_index" not in out:
            out[f"{name}.relative_position_index"] = index.clone()
    return out


def export(checkpoint: str | Path, out: str | Path, fmt: str = "timm", force: bool = False) -> Path:
    """Exports the encoder of a SimMIM pre-training checkpoint.

    fmt "timm": `out` is a folder with model.safetensors + config.json (timm local-dir / HF hub layout).
    fmt "swin": `out` is a folder with swin_encoder.pth, `{"model": state_dict}` in the original Swin
    layout (Swin encoders only). Outputs are written atomically. Returns the folder.

    Raises ExportError (a UserError) for a missing, unreadable, fine-tuned or foreign checkpoint, an
    unknown format, a non-Swin encoder with fmt "swin", or an existing `out` without `force`.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    out = Path(out)
    remove_stale_partials(out)  # an export killed before it finished (SIGKILL, SIGTERM)
    check_output(out, Path(checkpoint), force)
    ckpt = read_pretraining(checkpoint)
    config = ckpt.config
    net, family = build_encoder(config, ckpt.model)
    img_size = config.get("data", {}).get("img_size", 192)
    if fmt == "timm":
        export_timm(net, family, img_size, out, ckpt.normalization())
    else:
        if family not in ("swin",):
            raise ExportError(f"--format swin needs a Swin encoder; '{checkpoint}' holds a {family} encoder "
                              f"(use --format timm)")
        sd = swin_original_state_dict(net)
        _write_dir(out, lambda tmp: torch.save({"model": sd}, Path(tmp) / "swin_encoder.pth"))
    log.info("exported the %s encoder of %s to %s (%s format)", config["model"]["arch"], checkpoint, out, fmt)
    return out


EXPORT_FILES = {"config.json", "model.safetensors", "swin_encoder.pth"}


def check_output(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuses, before any work, an output that is a file, holds the checkpoint or is the current
    folder, and an existing non-empty folder unless `force` and it holds only a previous export
    (so --force can never delete a run folder or anything else)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"'{out}' is a file: export writes a folder; pick a new folder name")
    if out.resolve() == Path.cwd().resolve():
        raise ExportError(f"'{out}' is the current folder: export into a new folder, e.g. exported/NAME")
    if checkpoint.resolve().is_relative_to(out.resolve()):
        raise ExportError(f"'{out}' holds the checkpoint '{checkpoint}': export into another folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ExportError(f"'{out}' exists and is not empty: pick another folder, or pass --force to replace "
                          f"a previous export there")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
    if others:
        raise ExportError(f"'{out}' holds more than a previous export ({', '.join(others[:3])}): --force only "
                          f"replaces an export; pick another folder")


def _write_dir(out: Path, write) -> None:
    """write(tmp_dir) fills a temporary sibling folder, which then replaces `out` (`atomic_folder`,
    core/io.py: atomic per folder; a killed export's temporary folder is removed by the next one)."""
    atomic_folder(out, write)
