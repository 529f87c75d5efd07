"""Whose checkpoint is this: the wrappers, key prefixes and namings of the frameworks people pre-train
SimMIM with, recognised from the keys alone, and the settings each one records.

`checkpoint.read_checkpoint` calls `recognise` on whatever a file holds. What it knows:

    layout              weights under         encoder keys              its own settings
    simmim (this one)   "model"               encoder.swin. / .vit.     "config" (ours), "classes"
                                              net. (fine-tuned)
    microsoft/SimMIM    "model"               encoder. (pre-training)   "config" (a yacs CfgNode:
                                              none (fine-tuned)         DATA.IMG_SIZE, MODEL.SWIN...)
    MMPretrain /        "state_dict"          backbone.                 "meta" (mmengine's cfg text)
    MMSelfSup
    timm / HF hub       the file itself       none                      config.json beside it
    (model.safetensors, pytorch_model.bin, a timm train script's {"state_dict", "state_dict_ema"})

and, inside any of them, the wrappers training code adds: DDP / DataParallel's `module.`,
torch.compile's `_orig_mod.`, FSDP1's `_fsdp_wrapped_module.`, activation checkpointing's
`_checkpoint_wrapped_module.`; an EMA copy beside the weights ("model_ema", "state_dict_ema",
"ema_state_dict") is noted, not used. The encoder is found by its patch embedding
(`<prefix>patch_embed.proj.weight`), whatever prefix a framework puts before it. Hugging Face
transformers' own Swin / ViT naming (`embeddings.patch_embeddings.projection`) is recognised and
refused in one line. Settings the tensors fix (patch size from the patch-embedding kernel, a Swin
window from its first relative-position table, a BEiT ViT's grid from its shared table) fill what
the record does not say.
"""
from __future__ import annotations

import enum
import math
import re

import torch

from simmim.core.errors import CheckpointError

from .model import ARCHS

# where the weights sit in a checkpoint dict, in the order tried (the first holding tensors wins)
WEIGHT_KEYS = ("model", "state_dict", "module", "model_state_dict", "net", "network", "weights")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema_state_dict", "ema", "ema_model")
# inserted into every key by a wrapper of the model: DDP (leading), torch.compile, FSDP1, activation checkpointing
WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
PATCH_EMBED = re.compile(r"^(.*?)patch_embed\.(proj|projection)\.weight$")
HF_PATCH_EMBED = re.compile(r"^(.*?)embeddings\.patch_embeddings\.projection\.weight$")
EXPECTED = ("a simmim checkpoint, a microsoft/SimMIM or MMPretrain/MMSelfSup one, a timm / Hugging Face hub "
            "encoder (model.safetensors), or a state dict with a timm encoder's patch_embed.proj.weight")


class Kind(enum.Enum):
    """What the weights are for (not who wrote them: that is the layout)."""
    PRETRAINING = "pre-training"  # an encoder with a mask token (and a prediction head)
    FINETUNING = "fine-tuning"  # an encoder with a classification head
    ENCODER = "encoder"  # the encoder alone (an export, a backbone)


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and \
        all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(raw) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """(weights, the key they were under ("" for a bare state dict), notes) of a loaded checkpoint.
    Wrapper prefixes are removed from the keys. CheckpointError (without the path: the caller adds
    it) when no state dict is found."""
    notes, where = [], ""
    weights = raw if is_state_dict(raw) else None
    for key in WEIGHT_KEYS if weights is None and isinstance(raw, dict) else ():
        inner = raw.get(key)
        if isinstance(inner, dict) and not is_state_dict(inner):  # one more level: {"model": {"state_dict": ...}}
            inner = next((inner[k] for k in WEIGHT_KEYS if is_state_dict(inner.get(k))), inner)
        if is_state_dict(inner):
            weights, where = inner, key
            break
    if weights is None:
        ema = [k for k in EMA_KEYS if isinstance(raw, dict) and is_state_dict(raw.get(k))]
        if not ema:
            top = ", ".join(map(str, list(raw)[:6])) if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"holds no model weights (found {top or 'nothing'}); expected {EXPECTED}")
        weights, where = raw[ema[0]], ema[0]
        notes.append(f"only an EMA copy of the weights ('{ema[0]}') is there: using it")
    else:
        notes += [f"an EMA copy '{k}' is there too, not used (the weights under '{where or 'the top level'}' are)"
                  for k in EMA_KEYS if isinstance(raw, dict) and is_state_dict(raw.get(k))]
    return strip_wrappers(weights), where, notes


def strip_wrappers(weights: dict) -> dict:
    keys = list(weights)
    if all(k.startswith("module.") for k in keys):  # DDP / DataParallel
        keys = [k[len("module."):] for k in keys]
    for part in WRAPPER_PARTS:
        keys = [k.replace(part, "") for k in keys]
    return dict(zip(keys, weights.values()))


def encoder_prefix(weights: dict) -> tuple[str, str]:
    """(prefix before the encoder's keys, key naming: "timm" or "mmpretrain"). CheckpointError for
    Hugging Face transformers' naming or no patch embedding at all."""
    for key in weights:
        if m := PATCH_EMBED.match(key):
            return m.group(1), "timm" if m.group(2) == "proj" else "mmpretrain"
    for key in weights:
        if m := HF_PATCH_EMBED.match(key):
            raise CheckpointError(f"is a Hugging Face transformers model ({key}); expected {EXPECTED}: export its "
                                  f"encoder to timm's naming first")
    some = ", ".join(list(weights)[:3])
    raise CheckpointError(f"holds no encoder this project knows (no patch_embed.proj.weight among {len(weights)} "
                          f"weights, e.g. {some}); expected {EXPECTED}")


# MMPretrain's Swin (SimMIMSwinTransformer) names -> the original Swin code's: the inverse of the renames
# of MMPretrain's swin_to_mmpretrain converter (its patch merging also reorders channels: `_unfold_order`)
MM_SWIN_RENAMES = ((re.compile(r"^stages\."), "layers."), (re.compile(r"\.attn\.w_msa\."), ".attn."),
                   (re.compile(r"\.ffn\.layers\.0\.0\."), ".mlp.fc1."), (re.compile(r"\.ffn\.layers\.1\."), ".mlp.fc2."),
                   (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."), (re.compile(r"^norm\d+\."), "norm."))
UNFOLD_TO_SWIN = [0, 2, 1, 3]  # its own inverse


def _unfold_order(value: torch.Tensor) -> torch.Tensor:
    """A patch-merging weight (out, 4C) or norm (4C,) from mmcv's PatchMerging channel order to the
    original Swin's. mmcv gathers the 2x2 neighbours with nn.Unfold: channel c * 4 + k, k over
    (row, col) = (0, 0), (0, 1), (1, 0), (1, 1); Swin concatenates x0..x3 = (0, 0), (1, 0), (0, 1),
    (1, 1): channel p * C + c."""
    shape = value.shape
    rows = value.reshape(-1, shape[-1] // 4, 4).transpose(1, 2)  # (out, k, c)
    return rows[:, UNFOLD_TO_SWIN, :].reshape(shape).contiguous()


def from_mmpretrain(encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An MMPretrain / MMSelfSup Swin backbone's weights (`backbone.` removed) in the original Swin
    naming, which timm's filter reads. CheckpointError for MMPretrain's ViT naming (not converted)."""
    if not any(k.startswith("stages.") for k in encoder):
        raise CheckpointError("is an MMPretrain/MMSelfSup ViT (layers.i.ln1, ffn.layers), whose naming is not "
                              f"converted here; expected {EXPECTED}")
    out = {}
    for key, value in encoder.items():
        for pattern, new in MM_SWIN_RENAMES:
            key = pattern.sub(new, key)
        if ".downsample." in key and key.endswith(("reduction.weight", "norm.weight", "norm.bias")):
            value = _unfold_order(value)
        out[key] = value
    return out


def layout_name(prefix: str, naming: str, raw, config) -> str:
    if naming == "mmpretrain" or (isinstance(raw, dict) and "meta" in raw and prefix == "backbone."):
        return "MMPretrain/MMSelfSup"
    if prefix in ("encoder.swin.", "encoder.vit.", "net.") or is_ours(config):
        return "simmim"
    if prefix == "encoder." or is_released(config):
        return "microsoft/SimMIM"
    return "timm" if prefix == "" else f"weights under '{prefix}'"


def is_ours(config) -> bool:
    """This project's config (Config.to_dict(): lower-case sections)."""
    return isinstance(config, dict) and isinstance(config.get("model"), dict)


def is_released(config) -> bool:
    """The released SimMIM code's yacs config (upper-case sections)."""
    return isinstance(config, dict) and isinstance(config.get("MODEL"), dict)


def kind_of(weights: dict, prefix: str) -> Kind:
    if any(k.endswith("mask_token") for k in weights):
        return Kind.PRETRAINING
    if any(k in weights for k in (f"{prefix}head.weight", f"{prefix}head.fc.weight")):
        return Kind.FINETUNING
    return Kind.ENCODER


# ---------------------------------------------------------------- settings a checkpoint records

def recorded_settings(raw, config, extra: dict | None = None) -> dict[str, int]:
    """img_size / window_size / patch_size / in_chans as the checkpoint's own record gives them (only
    those it gives): this project's config, the released code's yacs config, MMPretrain's cfg text,
    or a timm config.json (`extra`)."""
    found: dict[str, int] = {}
    if is_ours(config):
        arch = ARCHS.get(config["model"].get("arch", ""))
        found["img_size"] = config.get("data", {}).get("img_size")
        found["window_size"] = config["model"].get("window_size") or (arch.window_size if arch else None)
        found["patch_size"] = arch.patch_size if arch else None
        found["in_chans"] = config.get("data", {}).get("channels")
    elif is_released(config):
        model = config["MODEL"]
        found["img_size"] = (config.get("DATA") or {}).get("IMG_SIZE")
        family = next((model[k] for k in ("SWINV2", "SWIN", "VIT") if isinstance(model.get(k), dict)
                       and str(model.get("TYPE", "")).upper().startswith(k)), None)
        found["window_size"] = (family or {}).get("WINDOW_SIZE")
        found["patch_size"] = (family or {}).get("PATCH_SIZE")
    elif isinstance(raw, dict) and isinstance(raw.get("meta"), dict) and \
            isinstance(text := raw["meta"].get("cfg", raw["meta"].get("config")), str):  # mmengine: cfg; mmcv: config
        text = text[text.find("backbone"):] if "backbone" in text else text  # the model's, not the pipeline's
        for key in ("img_size", "window_size", "patch_size"):
            if m := re.search(rf"\b{key}\s*=\s*(\d+)", text):
                found[key] = int(m.group(1))
    elif extra:  # timm's config.json: model_args, else pretrained_cfg's input_size
        args = extra.get("model_args") or {}
        found.update({k: args.get(k) for k in ("img_size", "window_size", "patch_size", "in_chans")})
        size = (extra.get("pretrained_cfg") or {}).get("input_size")
        if not found.get("img_size") and isinstance(size, list) and len(size) == 3:
            found["img_size"] = size[-1]
    return {k: int(v[0] if isinstance(v, (list, tuple)) else v) for k, v in found.items() if v}


def tensor_settings(encoder: dict[str, torch.Tensor]) -> dict[str, int]:
    """What the encoder's own tensors fix: the patch size and the image channels `in_chans` (the
    patch embedding's kernel, (D, C, p, p)), a Swin window (its first relative-position table has
    (2w - 1)^2 rows; SwinV2: its coordinates table), a BEiT ViT's image size (its shared table has
    (2g - 1)^2 + 3 rows, g = img / patch)."""
    found = {}
    proj = encoder.get("patch_embed.proj.weight", encoder.get("patch_embed.projection.weight"))
    if proj is not None and proj.ndim == 4:
        found["patch_size"], found["in_chans"] = proj.shape[-1], proj.shape[1]
    shared = encoder.get("rel_pos_bias.relative_position_bias_table")
    if shared is not None and "patch_size" in found:
        side = math.isqrt(shared.shape[0] - 3)
        if side * side == shared.shape[0] - 3 and side % 2:
            found["img_size"] = (side + 1) // 2 * found["patch_size"]
    for key, value in encoder.items():
        if key.startswith(("layers.0.", "stages.0.")) and key.endswith("relative_position_bias_table"):
            side = math.isqrt(value.shape[0])
            if side * side == value.shape[0] and side % 2:
                found["window_size"] = (side + 1) // 2
                break
        if key.startswith(("layers.0.", "stages.0.")) and key.endswith("relative_coords_table") and value.ndim == 4:
            found["window_size"] = (value.shape[1] + 1) // 2
            break
    return found
