"""Fine-tuning and evaluation: how a SimMIM checkpoint is judged (top-1 after fine-tuning).

    simmim finetune --config finetune_swin_base_100ep finetune.pretrained=runs/x/checkpoint-....pt
    simmim evaluate CKPT [--data VAL] [--backend torch|ffcv|dali]

The recipe (the paper's appendix; the `finetune` section of the config, see finetune_options.py):
AdamW, layer-wise lr decay (each parameter group's lr = schedule lr x decay^(depth - layer), set once per step),
drop path 0.1, RandAugment (rand-m9-mstd0.5-inc1), mixup 0.8 / cutmix 1.0 (switch 0.5), label
smoothing 0.1, random erasing 0.25, warmup then cosine; evaluation by resize + centre crop.

Loading a SimMIM checkpoint (this project's, or the released code's {"model": {"encoder.*"}}):
the encoder's weights, with the wrapper's prefixes stripped (the mask token and the prediction
head are dropped), go into a timm classifier of the same architecture through timm's checkpoint
filters (the original Swin layout's patch merging moves to the next stage); ViT's shared relative
position table is copied into every block; missing and unexpected keys are reported; another
architecture is refused; relative-position-bias tables are resized as the released fine-tuning did
(a cubic spline on a geometric offset grid, see `resize_rel_pos_bias`) when the window changes,
e.g. 192 px / window 6 pre-training to 224 px / window 7 fine-tuning. Same sizes load unchanged.
SwinV2 has no table to resize: its position bias is an MLP over log-spaced relative coordinates,
which loads as it is; when the window changes (e.g. 192 px / window 12 -> 224 px / window 14), the
coordinates are normalised by each stage's pre-training window (read from the checkpoint's
config), as the released SwinV2 fine-tuning does with pretrained_window_sizes, so offsets seen in
pre-training give the MLP the same inputs and the new, longer ones extrapolate along the log scale.
Checkpoints are read by checkpoint.read_checkpoint (a DCP folder gathered in memory; other
frameworks' wrappers and prefixes recognised, trainer/layouts.py).

Data: the same loaders as pre-training, in their classification form (`labels=True`, no masks):
random-resized-crop (scale finetune.crop_scale, 0.08-1) + flip in the loader, then RandAugment,
each backend its own way (pipeline/rand_augment.py: torch: timm's on PIL in its workers; FFCV: the
batched device op on the uint8 batch; DALI: DALI's own in its graph); then random erasing and
mixup / cutmix as the batch transform the engine applies before the forward (`MixupErasing`,
`FinetuneTask.batch_transform`). The classifier's forward only computes the logits and the loss.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.interpolate import RectBivariateSpline
from scipy.optimize import brentq
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models import adapt_input_conv, beit, swin_transformer, swin_transformer_v2
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.utils import accuracy
from torch import nn

from simmim.core.errors import CheckpointError, ConfigError, DatasetError
from simmim.pipeline import Augmentation, LoaderSpec, build_loader
from simmim.pipeline.augment import random_erasing
from simmim.pipeline.stats import normalization

from .checkpoint_reader import read_checkpoint
from .config import config_from_dict, load_config
from .distributed import DistInfo, all_reduce_sum, cleanup, init_distributed
from .finetune_options import FinetuneConfig
from .layouts import Kind, is_ours
from .loop import fit
from .model import ARCHS, SWIN_FAMILIES, log_decay, no_weight_decay, timm_model
from .parallel import lockstep
from .precision import amp_dtype_for, autocast

log = logging.getLogger("simmim")


# ---------------------------------------------------------------- model

def build_classifier(arch: str, img_size: int, num_classes: int, window_size: int = 0,
                     drop_path: float = 0.1, in_chans: int = 3) -> nn.Module:
    """The timm encoder of `arch` for `in_chans`-channel images with a linear classification head."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch '{arch}': choose one of {', '.join(ARCHS)}")
    return timm_model(ARCHS[arch], img_size, window_size, drop_path, num_classes, in_chans=in_chans)


DROPPED = ("mask_token", "decoder.")  # the pre-training's mask token and prediction head
BUFFERS = ("relative_position_index", "attn_mask", "k_bias")  # recomputed by timm, not weights


def geometric_offsets(src: int, dst: int) -> np.ndarray:
    """Where the `src` offsets -(src//2)..src//2 of a relative-position table sit on a target grid
    of offsets -(dst//2)..dst//2 (float64, shape (src,)), as the released SimMIM fine-tuning placed
    them: the gaps from 0 outwards grow geometrically, 1, q, q^2, ..., with q chosen so that the
    outermost source offset lands on the outermost target offset. Offsets -1, 0, +1 stay in place;
    only the tails stretch. Raises ValueError when the table is too small to be stretched (3 offsets)."""
    n, m = src // 2, dst // 2
    if n == m:
        return np.arange(-n, n + 1, dtype=np.float64)
    if n < 2 or m < 1:
        raise ValueError(f"cannot resize a relative position table of {src}x{src} offsets to {dst}x{dst}")
    excess = lambda r: np.sum(r ** np.arange(n)) - m  # noqa: E731 - (1 + r + ... + r^(n-1)) - m
    if excess(1.01) <= 0 < excess(1.5):
        # the released code's search: bisection on [1.01, 1.5] until the bracket is under 1e-6, q = the
        # last midpoint; kept so that window 6 -> 7 (q = 1.0903) gives the released tables to float precision
        lo, hi = 1.01, 1.5
        while hi - lo > 1e-6:
            q = (lo + hi) / 2
            lo, hi = (lo, q) if excess(q) > 0 else (q, hi)
    else:  # outside that bracket (larger stretches, shrinking) the released search fails; solve exactly
        q = brentq(excess, 1e-9, float(m), xtol=1e-15)
    gaps = np.cumsum(q ** np.arange(n))  # 1, 1 + q, 1 + q + q^2, ...
    return np.concatenate([-gaps[::-1], [0.0], gaps])


def resize_rel_pos_bias(table: torch.Tensor, size: int, extra: int = 0) -> torch.Tensor:
    """A relative position bias table ((2w-1)^2 + extra, heads) resized to (size^2 + extra, heads)
    as the released SimMIM fine-tuning did (e.g. 11x11 -> 13x13 for window 6 -> 7): per head, a
    cubic interpolating spline (FITPACK via SciPy's RectBivariateSpline, kx = ky = 3, s = 0: what
    the released code's `interp2d(kind='cubic')` ran) through the source values placed on the
    geometric grid of `geometric_offsets`, evaluated at the integer target offsets. The `extra`
    rows at the end (BEiT's 3 cls entries) are kept as they are. Unchanged when the sizes match."""
    n, heads = table.shape
    old = math.isqrt(n - extra)
    if old * old != n - extra:
        raise ValueError(f"relative position table of {n} rows ({extra} extra) is not square")
    if old == size:
        return table
    x = geometric_offsets(old, size)
    t = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    grid = table[:n - extra].double().numpy().reshape(old, old, heads)  # (offset h, offset w, heads)
    out = np.stack([RectBivariateSpline(x, x, grid[:, :, h], kx=3, ky=3, s=0)(t, t) for h in range(heads)], -1)
    out = torch.from_numpy(out.reshape(size * size, heads)).to(table.dtype)
    return torch.cat([out, table[n - extra:]]).contiguous()


# what to do with a checkpoint that cannot be used, per command
INSTEAD = {"finetune.pretrained": "point finetune.pretrained at another checkpoint of the pre-training run",
           "checkpoint": "evaluate another checkpoint of the fine-tuning run",
           "model.init_from": "point model.init_from at a SimMIM checkpoint or an exported encoder of model.arch, "
                               "or set model.init_from= (empty) to start from random weights",
           "probe.pretrained": "probe another checkpoint of the pre-training run"}


def to_timm_layout(encoder: dict, model: nn.Module, family: str) -> tuple[dict, list[str]]:
    """An encoder's weights (`CheckpointContents.encoder()`: its prefix removed) in the layout of
    `model` (a timm classifier): mask token and prediction head dropped, ViT's shared bias table copied into
    every block (as the released fine-tuning did), relative-position tables resized with
    `resize_rel_pos_bias`, then timm's own checkpoint filter (Swin: the original code's patch
    merging at the end of stage i moves to the start of stage i + 1 and head. becomes head.fc.;
    index buffers dropped). Returns (weights, names of the resized tables); ValueError if a table
    cannot be fitted."""
    weights = {k: v for k, v in encoder.items() if not k.startswith(DROPPED)}
    own = model.state_dict()
    shared = "rel_pos_bias.relative_position_bias_table"
    if family == "vit" and shared in weights and shared not in own:
        table = weights.pop(shared)
        for i in range(len(model.blocks)):
            weights.setdefault(f"blocks.{i}.attn.relative_position_bias_table", table.clone())
    strays = [k for k in weights if k.endswith("relative_position_bias_table") and k not in own]
    if strays:  # timm's filter would look the module up and fail with a traceback
        raise ValueError(f"{strays[0]} is not a position table of model.arch's encoder")
    extra = 3 if family == "vit" else 0  # BEiT's cls-to-token, token-to-cls, cls-to-cls entries
    resized = []
    for key, value in weights.items():
        if key.endswith("relative_position_bias_table") and key in own and own[key].shape != value.shape:
            if own[key].shape[1] != value.shape[1]:
                raise ValueError(f"{key} has {value.shape[1]} heads there, {own[key].shape[1]} here")
            weights[key] = resize_rel_pos_bias(value, math.isqrt(own[key].shape[0] - extra), extra)
            resized.append(key)
    weights = {k: v for k, v in weights.items() if not k.endswith(BUFFERS)}
    module = {"swin": swin_transformer, "swinv2": swin_transformer_v2}.get(family, beit)
    return module.checkpoint_filter_fn(weights, model), resized


def encoder_family(encoder: dict) -> str | None:
    """"swin", "swinv2" or "vit" from an encoder's weight names (Swin: stages `layers.*`, SwinV2
    also a position-bias MLP `cpb_mlp`; ViT: `blocks.*`); None if unclear."""
    names = list(encoder)
    if any(k.startswith("layers.") for k in names):
        return "swinv2" if any("cpb_mlp" in k for k in names) else "swin"
    return "vit" if any(k.startswith("blocks.") for k in names) else None


def load_weights(model: nn.Module, encoder: dict, arch: str, what: str) -> dict:
    """Loads an encoder's weights (`CheckpointContents.encoder()`, in timm's or the original Swin
    naming) into `model` (built by build_classifier). Returns {"missing", "unexpected", "resized"}
    key lists; CheckpointError if they do not fit `arch`."""
    own = model.state_dict()
    theirs, family = encoder_family(encoder), ARCHS[arch].family
    if theirs is not None and theirs != family:
        raise CheckpointError(f"{what} holds a {theirs} encoder; model.arch {arch} is a {family}: pick the "
                              f"model.arch it was trained with")
    proj = encoder.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4 and proj.shape[-1] != ARCHS[arch].patch_size:  # timm would resample it
        raise CheckpointError(f"{what} has patch size {proj.shape[-1]}; model.arch {arch} has "
                              f"{ARCHS[arch].patch_size}: pick the model.arch it was trained with")
    try:
        weights, resized = to_timm_layout(encoder, model, family)
    except ValueError as e:
        raise CheckpointError(f"{what} does not match model.arch {arch}: {e}") from None
    adapted = adapt_channels(weights, model, what)
    for key, value in list(weights.items()):
        if key in own and own[key].shape != value.shape:
            if key.startswith("head"):
                del weights[key]  # another number of classes: the head starts fresh
                continue
            raise CheckpointError(f"{what} does not match model.arch {arch}: {key} is "
                                  f"{tuple(value.shape)} there, {tuple(own[key].shape)} here")
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(BUFFERS)]
    encoder_keys = [k for k in own if not k.startswith(("head", "fc_norm")) and not k.endswith(BUFFERS)]
    if len([k for k in encoder_keys if k in weights]) < 0.9 * len(encoder_keys):
        raise CheckpointError(f"{what} does not match model.arch {arch} "
                              f"({len(missing)} of {len(own)} weights missing, e.g. {missing[:3]})")
    return {"missing": missing, "unexpected": list(result.unexpected_keys), "resized": resized, "adapted": adapted}


PATCH_EMBED = "patch_embed.proj.weight"


def adapt_channels(weights: dict, model: nn.Module, what: str) -> str:
    """Fits the patch embedding of `weights` ((D, C', p, p), timm's names) to `model`'s C input
    channels in place, with timm's `adapt_input_conv` (what timm does for its own pretrained weights
    at another in_chans): from RGB (C' = 3) to grey the three filters are summed (a grey image seen
    as R = G = B gives the same embedding), to C > 1 channels they are repeated and scaled by 3 / C;
    from grey (C' = 1) the filter is repeated and scaled by 1 / C (the channels' mean seen as grey).
    Returns what it did, for the load summary ("" when the counts match). CheckpointError, one line
    naming both counts, for any other pair (e.g. 5 channels there, 3 here)."""
    w, own = weights.get(PATCH_EMBED), model.state_dict().get(PATCH_EMBED)
    if w is None or own is None or w.ndim != 4 or w.shape[1] == own.shape[1]:
        return ""
    theirs, ours = w.shape[1], own.shape[1]
    if theirs not in (1, 3):
        raise CheckpointError(f"{what} holds a {theirs}-channel encoder; this model takes {ours}-channel images "
                              f"(data.channels={ours}): set data.channels={theirs}, or start from an RGB or grey "
                              f"checkpoint (those are adapted)")
    weights[PATCH_EMBED] = adapt_input_conv(ours, w, base_chans=theirs)
    how = "summed" if ours == 1 else f"repeated, scaled by {theirs}/{ours}"
    return f"patch embedding adapted from {theirs} to {ours} channels (timm adapt_input_conv: filters {how})"


def load_pretrained(model: nn.Module, path: str | Path, arch: str, settings: dict | None = None,
                    key: str = "finetune.pretrained") -> dict:
    """Loads the encoder of any checkpoint `read_checkpoint` reads (a SimMIM pre-training checkpoint
    of this project, microsoft/SimMIM, MMPretrain; a fine-tuned one; a timm encoder) into `model`
    (see `load_weights`). `settings` (img_size / window_size, from finetune.pretrained_*) replace
    what the checkpoint records. CheckpointError, one line, for a checkpoint whose own record names
    another architecture, or a SwinV2 one whose pre-training sizes nobody says. Returns
    load_weights' report plus "layout" and "notes". `key`: the config key that named `path`
    (finetune.pretrained, or model.init_from for continued pre-training), in the errors."""
    what = f"{key}: '{path}'"
    ckpt = read_checkpoint(path, what=f"{key}:", hint=INSTEAD[key])
    their_arch = ckpt.config["model"].get("arch") if is_ours(ckpt.config) else None
    if their_arch is not None and their_arch != arch:
        raise CheckpointError(f"{what} is a {their_arch} checkpoint; model.arch is {arch}")
    report = load_weights(model, ckpt.encoder(), arch, what)
    known = {**ckpt.settings, **{k: v for k, v in (settings or {}).items() if v}}
    report["resized"] += set_pretrained_windows(model, known, f"{what} ({ckpt.layout} layout)", key)
    return {**report, "layout": ckpt.layout, "notes": ckpt.notes}


def set_pretrained_windows(model: nn.Module, settings: dict, what: str, key: str = "finetune.pretrained") -> list[str]:
    """SwinV2 only: each attention's continuous-position-bias coordinates normalised by the window
    its stage had in pre-training (settings: the checkpoint's img_size, window_size, patch_size).
    Returns the names of the attentions whose window differs from pre-training; CheckpointError
    when the settings lack a size (the bias would silently be read at this model's window), saying
    what to do for `key`, the option that named the checkpoint (only fine-tuning has
    finetune.pretrained_img_size / _window_size to supply them)."""
    if not isinstance(model, SwinTransformerV2):
        return []
    img, window = settings.get("img_size"), settings.get("window_size")
    patch = settings.get("patch_size") or model.patch_embed.patch_size[0]
    if not (img and window):
        lacking = [n for n, v in (("img_size", img), ("window_size", window)) if not v]
        todo = (f"set {', '.join(f'finetune.pretrained_{n}' for n in lacking)}" if key == "finetune.pretrained" else
                f"point {key} at a checkpoint that records them (this project's checkpoint file or DCP folder, "
                f"or a `simmim export` folder)")
        raise CheckpointError(f"{what} does not record the {' and '.join(lacking)} it was pre-trained at, which "
                              f"SwinV2's position bias is normalised by: {todo}")
    changed = []
    for i, stage in enumerate(model.layers):
        pre = min(window, img // patch // 2 ** i)  # timm clamps a window to its stage's grid
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            if attn.window_size[0] != pre:
                changed.append(f"layers.{i}.blocks.{j}.attn (window {pre} -> {attn.window_size[0]})")
            attn.pretrained_window_size = (pre, pre)
            attn.init_non_persistent_buffers()
    return changed


# ---------------------------------------------------------------- layer-wise lr decay

def num_layers(arch: str) -> int:
    a = ARCHS[arch]
    return sum(a.depths) if a.family in SWIN_FAMILIES else a.depths[0]


def layer_id(name: str, arch: str) -> int:
    """0 for the embeddings, 1..L for the blocks in order (Swin's downsampling layers go with the
    stage they end), L + 1 for the final norm and the head."""
    a = ARCHS[arch]
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "absolute_pos_embed", "reg_token")):
        return 0
    if a.family in SWIN_FAMILIES:
        m = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)", name)
        if m:
            stage = int(m.group(1))
            before = sum(a.depths[:stage])
            # timm puts the patch merging at the start of stages 1..3: it belongs to the stage before
            return before + (int(m.group(3)) + 1 if m.group(3) is not None else 0)
    else:
        m = re.match(r"blocks\.(\d+)\.", name)
        if m:
            return int(m.group(1)) + 1
    return num_layers(arch) + 1


def layer_decay_groups(model: nn.Module, arch: str, weight_decay: float, decay: float,
                       rule: str = "released") -> list[dict]:
    """One parameter group per (layer, weight decay or not), with lr_scale = decay^(L + 1 - layer);
    the engine multiplies the schedule's lr by it once per step. Weight decay follows `rule` (see
    model.no_weight_decay; the released fine-tuning exempts Swin's tables, not ViT's per-block ones).
    ViT's per-block bias tables and layer-scale gammas of block i go with block i (layer i + 1)."""
    depth = num_layers(arch) + 1
    family = ARCHS[arch].family
    groups: dict[tuple[int, bool], dict] = {}
    named = {True: [], False: []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, no_wd = layer_id(name, arch), no_weight_decay(name, p, family, rule, pretrain=False)
        g = groups.setdefault((layer, no_wd), {"params": [], "layer": layer,
                                               "weight_decay": 0.0 if no_wd else weight_decay,
                                               "lr_scale": decay ** (depth - layer)})
        g["params"].append(p)
        named[no_wd].append((name, p))
    log_decay(named[False], named[True], weight_decay, rule)
    return [groups[k] for k in sorted(groups)]


# ---------------------------------------------------------------- training-time augmentation

class MixupErasing:
    """The fine-tuning batch transform the engine applies before the forward (as MAE / DeiT's
    engine_finetune): (images, labels) -> (images, targets) on the device, no gradient.

    images: normalised (B, 3, H, W); labels: int64 (B,). Random erasing (`augment.random_erasing`:
    timm's RandomErasing for the whole batch at once, per image with probability `reprob`, normal
    noise), then timm's Mixup / CutMix (switch_prob: cutmix's share),
    which returns soft targets float (B, classes) with label smoothing; with mixup and cutmix off,
    or an odd batch (timm's batch mode pairs images), the labels pass through as they are. timm
    draws from the global generators: the engine runs this inside the step's keyed_rng, so the
    draws are a function of (seed, epoch, step, micro-batch, rank). Mixup changes the batch in
    place (timm's op), as the loader's batch is not used again."""

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1, reprob: float = 0.25):
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=switch_prob, mode="batch",
                               label_smoothing=label_smoothing, num_classes=num_classes)
        self.reprob = reprob

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reprob > 0:
            images = random_erasing(images, self.reprob)
        if self.mixup is not None and len(images) % 2 == 0:
            images, labels = self.mixup(images, labels)
        return images, labels


class Classifier(nn.Module):
    """model(images, targets) -> loss, as the engine expects; `logits(images)` for evaluation.

    targets: soft float (B, classes) from `MixupErasing` (timm's SoftTargetCrossEntropy), or int64
    labels (B,) (cross-entropy, label-smoothed in training). Augmentation happens before: per image
    in the loader (crop, flip, RandAugment), per batch in the engine (`MixupErasing`)."""

    def __init__(self, net: nn.Module, label_smoothing: float = 0.1):
        super().__init__()

        self.net, self.label_smoothing = net, label_smoothing
        self.soft_target_loss = SoftTargetCrossEntropy()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.net(images).float()  # (B, classes)
        if targets.is_floating_point():  # soft targets: mixed and label-smoothed
            return self.soft_target_loss(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing if self.training else 0.0)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype=None,
             to_head: torch.Tensor | None = None) -> dict:
    """top-1 / top-5 accuracy (%) and mean cross-entropy over the loader, summed over ranks.
    to_head: int64 (loader classes,), the head's index of each of the loader's labels (`class_map`);
    None: the labels are the head's indices already."""
    to_head = to_head.to(device) if to_head is not None else None
    net = model.net if isinstance(model, Classifier) else model
    was_training = net.training
    net.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # n, top1, top5, loss sum
    for (images, labels), real in lockstep(loader, net, device):  # FSDP2: the same forwards on every rank
        with autocast(device.type, amp_dtype):
            logits = net(images).float()
        if not real:
            continue
        if to_head is not None:
            labels = to_head[labels]
        top1, top5 = (a.double() * len(labels) / 100 for a in accuracy(logits, labels, topk=(1, 5)))  # % -> hits
        totals += torch.stack([torch.tensor(len(labels), device=device, dtype=torch.float64),
                               top1.round(), top5.round(), F.cross_entropy(logits, labels, reduction="sum").double()])
    totals = all_reduce_sum(totals)
    net.train(was_training)
    n = max(totals[0].item(), 1)
    return {"top1": 100 * totals[1].item() / n, "top5": 100 * totals[2].item() / n,
            "val_loss": totals[3].item() / n, "val_images": int(totals[0].item())}


def eval_loader(cfg: FinetuneConfig, path: str, backend: str, dist: DistInfo):
    d, f = cfg.data, cfg.finetune
    mean, std, _ = normalization(d.channels, d.mean, d.std, d.path)
    aug = Augmentation(size=d.img_size, mean=mean, std=std)
    spec = dataclasses.replace(LoaderSpec.from_config(d, aug, path, train=False, labels=True,
                                                      crop_ratio=f.eval_crop_ratio, drop_last=False), backend=backend)
    # labels=True: an unlabeled folder or list is refused in one line by the loader (Loader.require_one_batch)
    return build_loader(spec, None, dist.device, dist.rank, dist.world_size, cfg.train.seed)


def index_names(names: list[str]) -> bool:
    """A `path label` list without its classes file names its classes by their labels, "0".."n-1"."""
    return names == [str(i) for i in range(len(names))]


def class_map(data_classes: list[str] | None, head_classes: list[str] | None, outputs: int,
              where: str) -> torch.Tensor | None:
    """int64 (len(data_classes),): for each label of an evaluation loader (an index into its own
    sorted class list), the head's index of the class of the same name, so a class folder that is
    missing there moves no other label. None where either side has no names (or only index names,
    "0".."n-1": a list file without its classes file): the labels are taken as the head's indices.
    DatasetError, one line naming them, for classes the head does not know (or, without names, more
    classes than the head has outputs); a class the head knows and the data lacks is fine."""
    if data_classes and head_classes and not index_names(data_classes) and not index_names(head_classes):
        known = {name: i for i, name in enumerate(head_classes)}
        unknown = [c for c in data_classes if c not in known]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise DatasetError(f"{where} has classes the classifier was not trained on: {', '.join(unknown[:3])}{more} "
                               f"(it knows {len(head_classes)}: {', '.join(head_classes[:3])}, ...): remove those "
                               f"folders, or evaluate on data of the training classes")
        return torch.tensor([known[c] for c in data_classes], dtype=torch.int64)
    if data_classes and len(data_classes) > outputs:
        raise DatasetError(f"{where} has {len(data_classes)} classes; the classifier has {outputs} outputs: evaluate "
                           f"on data of the training classes")
    return None


def num_classes_of(cfg: FinetuneConfig, loader) -> int:
    if cfg.finetune.num_classes:
        return cfg.finetune.num_classes
    classes = getattr(loader, "classes", None)
    if classes:
        return len(classes)
    raise ConfigError("set finetune.num_classes (the loader does not know the class list)")


class FinetuneTask:
    """For `fit`: the classifier (from finetune.pretrained, or from scratch), the labelled
    loader, layer-decay groups, and evaluation after every `finetune.eval_every` epochs."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.best = 0.0
        self.batch_transform = None  # MixupErasing, once build() knows the number of classes

    def build(self, dist: DistInfo):
        d, m, f, t = self.cfg.data, self.cfg.model, self.cfg.finetune, self.cfg.train
        mean, std, source = normalization(d.channels, d.mean, d.std, d.path)
        log.info("data: %d channel(s), normalised by %s mean %s std %s", d.channels, source, mean, std)
        aug = Augmentation(size=d.img_size, scale=(f.crop_scale, 1.0), mean=mean, std=std)
        # RandAugment is each backend's own (pipeline/rand_augment.py): the spec carries the string
        spec = LoaderSpec.from_config(d, aug, train=True, labels=True, rand_augment=f.rand_augment)
        loader = build_loader(spec, None, dist.device, dist.rank, dist.world_size, t.seed)
        classes = num_classes_of(self.cfg, loader)
        net = build_classifier(m.arch, d.img_size, classes, m.window_size, m.drop_path, d.channels)
        if f.pretrained:
            report = load_pretrained(net, f.pretrained, m.arch, {"img_size": f.pretrained_img_size,
                                                                  "window_size": f.pretrained_window_size})
            for note in report["notes"]:
                log.info("finetune.pretrained: %s", note)
            log.info("loaded %s (%s layout): %d missing keys %s, %d unexpected %s, resized %s%s", f.pretrained,
                     report["layout"], len(report["missing"]), report["missing"][:6], len(report["unexpected"]),
                     report["unexpected"][:6], report["resized"][:4] + (["..."] if len(report["resized"]) > 4 else []),
                     f"; {report['adapted']}" if report["adapted"] else "")
        else:
            log.info("no finetune.pretrained: training from scratch")
        model = Classifier(net, f.label_smoothing).to(dist.device)
        self.batch_transform = MixupErasing(classes, f.mixup, f.cutmix, f.mixup_switch_prob, f.label_smoothing,
                                            f.reprob)
        self.val = eval_loader(self.cfg, f.val_path, d.backend, dist) if f.val_path else None
        self.classes, self.class_names = classes, loader.classes
        self.val_to_head = class_map(self.val.classes, self.class_names, classes,
                                     f"finetune.val_path '{f.val_path}'") if self.val is not None else None
        return model, loader

    def param_groups(self, model) -> list[dict]:
        o, f = self.cfg.optim, self.cfg.finetune
        return layer_decay_groups(model.net, self.cfg.model.arch, o.weight_decay, f.layer_decay, o.weight_decay_rule)

    def inputs(self) -> dict[str, tuple[str, str]]:
        d, f = self.cfg.data, self.cfg.finetune
        make = f"; write it with `simmim convert SRC {d.path}`" if d.backend == "ffcv" else ""
        return {"data.path": (d.path, "point it at the labelled training images" + make),
                "finetune.val_path": (f.val_path, "point it at the validation images, or set finetune.val_path= "
                                                  "(empty) to train without evaluation"),
                "finetune.pretrained": (f.pretrained, "point it at a simmim pre-training checkpoint, or set "
                                                      "finetune.pretrained= (empty) to train from scratch")}

    def describe_data(self) -> str:
        f = self.cfg.finetune
        return (f"{self.classes} classes, RandAugment {f.rand_augment or 'off'}, mixup {f.mixup}, cutmix {f.cutmix}, "
                f"label smoothing {f.label_smoothing}, random erasing {f.reprob}")

    def prepare(self, model, loader, dist: DistInfo) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        """The class names in head order: evaluation maps its folders to them by name."""
        return {"classes": list(self.class_names)} if self.class_names else {}

    def after_epoch(self, model, epoch: int, last: bool, out_dir: Path, dist: DistInfo, amp_dtype) -> dict:
        if self.val is None or not ((epoch + 1) % self.cfg.finetune.eval_every == 0 or last):
            return {}
        result = evaluate(model, self.val, dist.device, amp_dtype, self.val_to_head)
        self.best = max(self.best, result["top1"])
        return {"top1": result["top1"], "top5": result["top5"], "val_loss": result["val_loss"],
                "best_top1": self.best}


def finetune(cfg: FinetuneConfig) -> dict:
    if cfg.finetune.pretrained and not Path(cfg.finetune.pretrained).exists():
        raise CheckpointError(f"finetune.pretrained: '{cfg.finetune.pretrained}' does not exist")
    return fit(cfg, FinetuneTask(cfg))


def evaluate_checkpoint(path: str, data: str | None = None, backend: str | None = None,
                        overrides: list[str] = ()) -> dict:
    """`simmim evaluate CKPT`: the checkpoint's own config (data.img_size, model) unless overridden;
    for another framework's fine-tuned checkpoint, the image and window size its record gives
    (`CheckpointContents.settings`), model.arch from the command line. The data's classes are
    mapped by name to the checkpoint's (`class_map`); DatasetError for a class it does not know."""
    ckpt = read_checkpoint(path, hint=INSTEAD["checkpoint"])
    if ckpt.kind is Kind.PRETRAINING:
        raise CheckpointError(f"'{path}' is not a fine-tuned checkpoint: fine-tune it first "
                              f"(simmim finetune --config ... finetune.pretrained={path})")
    if is_ours(ckpt.config):
        cfg = config_from_dict(ckpt.config, overrides, FinetuneConfig)
    else:
        recorded = {"data.img_size": ckpt.settings.get("img_size"),
                    "model.window_size": ckpt.settings.get("window_size"), "data.channels": ckpt.settings.get("in_chans")}
        cfg = load_config(None, [f"{k}={v}" for k, v in recorded.items() if v] + list(overrides), FinetuneConfig)
    val = data or cfg.finetune.val_path
    if not val:
        raise ConfigError("no validation data: pass --data or set finetune.val_path")
    weights = ckpt.encoder()
    heads = [v for k, v in weights.items() if k in ("head.fc.weight", "head.weight")]
    if not heads:  # (a bare StopIteration once)
        raise CheckpointError(f"'{path}' has no classification head (head.weight): not a fine-tuned checkpoint")
    net = build_classifier(cfg.model.arch, cfg.data.img_size, heads[0].shape[0], cfg.model.window_size, 0.0,
                           cfg.data.channels)
    report = load_weights(net, weights, cfg.model.arch, f"checkpoint '{path}'")
    if report["adapted"]:
        log.info("checkpoint '%s': %s", path, report["adapted"])
    if report["missing"]:
        raise CheckpointError(f"checkpoint '{path}' lacks {len(report['missing'])} weights of {cfg.model.arch}, "
                              f"e.g. {report['missing'][:3]}: set model.arch / data.img_size / model.window_size")
    if ckpt.classes is None:
        log.warning("'%s' records no class names: label i is the i-th class of %s (sorted), as in training only "
                    "if both have the same classes", path, val)
    dist = init_distributed(cfg.train.device)  # the checkpoint is checked whole before any data is read
    try:
        loader = eval_loader(cfg, val, backend or cfg.data.backend, dist)
        to_head = class_map(loader.classes, ckpt.classes, heads[0].shape[0], f"--data '{val}'" if data else
                            f"finetune.val_path '{val}'")
        result = evaluate(net.to(dist.device), loader, dist.device, amp_dtype_for(cfg.train.precision, dist.device),
                          to_head)
    finally:
        cleanup()
    return {**result, "checkpoint": str(path), "data": val}
