"""Fine-tuning and evaluation: how a SimMIM checkpoint is judged (top-1 after fine-tuning).

    simmim finetune --config finetune_swin_base_100ep finetune.pretrained=runs/x/checkpoint-....pt
    simmim evaluate CKPT [--data VAL] [--backend torch|ffcv|dali]

The recipe (the paper's appendix; the `finetune` section of the config): AdamW, layer-wise lr
decay (each parameter group's lr = schedule lr x decay^(depth - layer), set once per step),
drop path 0.1, RandAugment (rand-m9-mstd0.5-inc1), mixup 0.8 / cutmix 1.0 (switch 0.5), label
smoothing 0.1, random erasing 0.25, warmup then cosine; evaluation by resize + centre crop.

Loading a SimMIM checkpoint: the encoder's weights, with the wrapper's prefixes stripped (the
mask token and the prediction head are dropped), go into a timm classifier of the same
architecture; missing and unexpected keys are reported; another architecture is refused;
relative-position-bias tables are resized (bicubic, in torch) when the window changes, e.g.
192 px / window 6 pre-training to 224 px / window 7 fine-tuning, and ViT position tables when the
grid changes. Same sizes load unchanged. SwinV2 has no table to resize: its position bias is an
MLP over log-spaced relative coordinates, which load as they are; when the window changes (e.g.
192 px / window 12 -> 224 px / window 14), the coordinates are normalised by the pre-training
window of each stage (read from the checkpoint's config), as the released SwinV2 fine-tuning does
with pretrained_window_sizes, so offsets seen in pre-training give the MLP the same inputs and the
new, larger offsets extrapolate along the log scale.

Data: the same loaders as pre-training, in their classification form (`labels=True`, no masks):
random-resized-crop (scale finetune.crop_scale, 0.08-1) + flip in the loader, then RandAugment
(the reference loader: timm's, on PIL in its workers; FFCV / DALI: torchvision's on the device),
random erasing, mixup / cutmix on the device.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from simmim.pipeline import Augmentation, build_loader
from simmim.pipeline.augment import denormalize, normalize

from .checkpoint import consolidate, is_dcp_checkpoint, load_checkpoint
from .config import Config, ConfigError, config_from_dict
from .distributed import DistInfo, all_reduce_sum, cleanup, init_distributed
from .loop import amp_dtype_for, fit, loader_options
from .model import ARCHS, SWIN_FAMILIES, no_weight_decay, timm_model
from .parallel import lockstep

log = logging.getLogger("simmim")


# ---------------------------------------------------------------- model

def build_classifier(arch: str, img_size: int, num_classes: int, window_size: int = 0,
                     drop_path: float = 0.1) -> nn.Module:
    """The timm encoder of `arch` with a linear classification head."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch '{arch}': choose one of {', '.join(ARCHS)}")
    return timm_model(ARCHS[arch], img_size, window_size, drop_path, num_classes)


ENCODER_PREFIXES = ("encoder.swin.", "encoder.vit.")
DROPPED = ("encoder.mask_token", "decoder.")


def interpolate_rel_pos_bias(table: torch.Tensor, size: int) -> torch.Tensor:
    """A Swin relative-position-bias table ((2w-1)^2, heads) resized to (size^2, heads) with
    bicubic interpolation over the (2w-1) x (2w-1) offset grid; unchanged when sizes match."""
    n, heads = table.shape
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"relative position table of {n} rows is not square")
    if old == size:
        return table
    grid = table.T.reshape(1, heads, old, old).float()
    out = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return out.reshape(heads, size * size).T.to(table.dtype).contiguous()


def load_pretrained(model: nn.Module, path: str | Path, arch: str) -> dict:
    """Loads a SimMIM (or fine-tuned) checkpoint into `model` (built by build_classifier).
    Returns {"missing", "unexpected", "resized"} key lists; raises ConfigError for a file that is
    not a checkpoint or holds another architecture."""
    from timm.layers import resample_abs_pos_embed

    path = Path(path)
    if not (path.is_file() or is_dcp_checkpoint(path)):
        raise ConfigError(f"finetune.pretrained: '{path}' does not exist")
    try:  # a DCP folder (train.parallel=fsdp) is consolidated in memory first
        ckpt = consolidate(path) if is_dcp_checkpoint(path) else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure
        raise ConfigError(f"finetune.pretrained: '{path}' is not a simmim checkpoint ({type(e).__name__})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"finetune.pretrained: '{path}' holds no model weights")
    their_arch = (ckpt.get("config") or {}).get("model", {}).get("arch") if isinstance(ckpt, dict) else None
    if their_arch is not None and their_arch != arch:
        raise ConfigError(f"finetune.pretrained: '{path}' is a {their_arch} checkpoint; model.arch is {arch}")

    weights = {}
    for key, value in state.items():
        if key.startswith(DROPPED):
            continue
        for prefix in ENCODER_PREFIXES + ("module.",):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        weights[key] = value
    own = model.state_dict()
    resized = []
    for key, value in list(weights.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        if key.endswith("relative_position_bias_table"):
            weights[key] = interpolate_rel_pos_bias(value, math.isqrt(own[key].shape[0]))
        elif key == "pos_embed":
            prefix = getattr(model, "num_prefix_tokens", 1)
            grid = int(math.isqrt(own[key].shape[1] - prefix))
            weights[key] = resample_abs_pos_embed(value, (grid, grid), num_prefix_tokens=prefix)
        elif key.startswith("head"):
            del weights[key]  # another number of classes: the head starts fresh
            continue
        else:
            raise ConfigError(f"finetune.pretrained: '{path}' does not match model.arch {arch}: {key} is "
                              f"{tuple(value.shape)} there, {tuple(own[key].shape)} here")
        resized.append(key)
    # buffers timm recomputes from the window (index tables, attention masks) are not weights
    weights = {k: v for k, v in weights.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    result = model.load_state_dict(weights, strict=False)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        resized += set_pretrained_windows(model, ckpt["config"])
    missing = [k for k in result.missing_keys if not k.endswith(("relative_position_index", "attn_mask"))]
    encoder_keys = [k for k in own if not k.startswith(("head", "fc_norm"))]
    if len([k for k in encoder_keys if k in weights]) < 0.9 * len(encoder_keys):
        raise ConfigError(f"finetune.pretrained: '{path}' does not match model.arch {arch} "
                          f"({len(missing)} of {len(own)} weights missing, e.g. {missing[:3]})")
    return {"missing": missing, "unexpected": list(result.unexpected_keys), "resized": resized}


def set_pretrained_windows(model: nn.Module, pretrain_cfg: dict) -> list[str]:
    """SwinV2 only: each attention's continuous-position-bias coordinates normalised by the window
    its stage had in pre-training (pretrain_cfg: the checkpoint's config). Returns the names of the
    attentions whose window differs from pre-training."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    if not isinstance(model, SwinTransformerV2):
        return []
    arch = ARCHS.get(pretrain_cfg.get("model", {}).get("arch", ""))
    img = pretrain_cfg.get("data", {}).get("img_size")
    if arch is None or not img:
        return []
    window = pretrain_cfg["model"].get("window_size") or arch.window_size
    changed = []
    for i, stage in enumerate(model.layers):
        pre = min(window, img // arch.patch_size // 2 ** i)  # timm clamps a window to its stage's grid
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


def layer_decay_groups(model: nn.Module, arch: str, weight_decay: float, decay: float) -> list[dict]:
    """One parameter group per (layer, weight decay or not), with lr_scale = decay^(L + 1 - layer);
    the engine multiplies the schedule's lr by it once per step."""
    depth = num_layers(arch) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, no_wd = layer_id(name, arch), no_weight_decay(name, p)
        g = groups.setdefault((layer, no_wd), {"params": [], "layer": layer,
                                               "weight_decay": 0.0 if no_wd else weight_decay,
                                               "lr_scale": decay ** (depth - layer)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ---------------------------------------------------------------- training-time augmentation

def rand_augment_ops(spec: str) -> tuple[int, int]:
    """(num ops, magnitude) of a timm RandAugment string such as rand-m9-mstd0.5-inc1."""
    parts = spec.split("-")
    if not spec or parts[0] != "rand":
        raise ConfigError(f"finetune.rand_augment must look like rand-m9-mstd0.5-inc1, got '{spec}'")
    n, m = 2, 9
    for p in parts[1:]:
        if p.startswith("n") and p[1:].isdigit():
            n = int(p[1:])
        elif p.startswith("m") and p[1:].isdigit():
            m = int(p[1:])
    return n, m


class PILRandAugment:
    """timm's RandAugment on a PIL crop, for the reference loader's workers.

    timm maps the top of the magnitude range of Posterize to 0 bits kept, which Pillow >= 10
    rejects (it used to give a black image); the bits are floored at 1 here."""

    def __init__(self, spec: str, mean):
        from timm.data import auto_augment

        rand_augment_ops(spec)  # validate
        self.op = auto_augment.rand_augment_transform(spec, {"translate_const": 100,
                                                             "img_mean": tuple(round(255 * x) for x in mean)})
        for op in self.op.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize_at_least_one_bit

    def __call__(self, img, rng):
        return self.op(img)


def _posterize_at_least_one_bit(img, bits_to_keep, **kwargs):
    from timm.data import auto_augment

    return auto_augment.posterize(img, max(1, bits_to_keep), **kwargs)


class DeviceRandAugment:
    """torchvision's RandAugment per image on the training device, for loaders that augment in a
    compiled pipeline (FFCV, DALI): normalised batch -> uint8 -> RandAugment -> normalised."""

    def __init__(self, spec: str, mean, std):
        from torchvision.transforms import v2

        n, m = rand_augment_ops(spec)
        self.op = v2.RandAugment(num_ops=n, magnitude=m)
        self.mean, self.std = mean, std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        u8 = (denormalize(images, self.mean, self.std) * 255).round().to(torch.uint8)
        out = torch.stack([self.op(x) for x in u8])
        return normalize(out, self.mean, self.std, images.dtype)


class Classifier(nn.Module):
    """model(images, labels) -> loss, as the engine expects; `logits(images)` for evaluation.
    Training batches get random erasing, then mixup / cutmix (soft targets with label smoothing),
    then optionally device RandAugment first."""

    def __init__(self, net: nn.Module, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, reprob: float = 0.25,
                 device_augment=None):
        super().__init__()
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.net, self.label_smoothing = net, label_smoothing
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=switch_prob, mode="batch",
                           label_smoothing=label_smoothing, num_classes=num_classes) if mixup > 0 or cutmix > 0 else None
        self.erase = RandomErasing(reprob, mode="pixel", device="cpu") if reprob > 0 else None
        self.device_augment = device_augment

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = None
        if self.training:
            with torch.no_grad():
                if self.device_augment is not None:
                    images = self.device_augment(images)
                if self.erase is not None:
                    self.erase.device = images.device
                    images = self.erase(images.float()).to(images.dtype)
                if self.mixup is not None and len(images) % 2 == 0:  # timm's batch mixup pairs images
                    images, targets = self.mixup(images, labels)
        logits = self.net(images).float()
        if targets is not None:  # soft targets: mixed and label-smoothed
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if self.training else 0.0)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype=None) -> dict:
    """top-1 / top-5 accuracy (%) and mean cross-entropy over the loader, summed over ranks."""
    net = model.net if isinstance(model, Classifier) else model
    was_training = net.training
    net.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # n, top1, top5, loss sum
    for (images, labels), real in lockstep(loader, net, device):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = net(images).float()
        if not real:
            continue
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        totals += torch.stack([torch.tensor(len(labels), device=device, dtype=torch.float64),
                               hit[:, 0].sum().double(), hit.any(1).sum().double(),
                               F.cross_entropy(logits, labels, reduction="sum").double()])
    totals = all_reduce_sum(totals)
    net.train(was_training)
    n = max(totals[0].item(), 1)
    return {"top1": 100 * totals[1].item() / n, "top5": 100 * totals[2].item() / n,
            "val_loss": totals[3].item() / n, "val_images": int(totals[0].item())}


def eval_loader(cfg: Config, path: str, backend: str, dist: DistInfo):
    d, f = cfg.data, cfg.finetune
    aug = Augmentation(size=d.img_size)
    return build_loader(backend, path, aug, None, d.batch_size, d.num_workers, dist.device, dist.rank,
                        dist.world_size, cfg.train.seed, **{**loader_options(d), "train": False, "labels": True,
                                                            "crop_ratio": f.eval_crop_ratio, "drop_last": False})


def num_classes_of(cfg: Config, loader) -> int:
    if cfg.finetune.num_classes:
        return cfg.finetune.num_classes
    classes = getattr(loader, "classes", None)
    if classes:
        return len(classes)
    raise ConfigError("set finetune.num_classes (the loader does not know the class list)")


class FinetuneTask:
    """For `fit`: the classifier (from finetune.pretrained, or from scratch), the labelled
    loader, layer-decay groups, and evaluation after every `finetune.eval_every` epochs."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.best = 0.0

    def build(self, dist: DistInfo):
        d, m, f, t = self.cfg.data, self.cfg.model, self.cfg.finetune, self.cfg.train
        aug = Augmentation(size=d.img_size, scale=(f.crop_scale, 1.0))
        options = {**loader_options(d), "train": True, "labels": True}
        if d.backend == "torch":
            options["transform"] = PILRandAugment(f.rand_augment, aug.mean) if f.rand_augment else None
        loader = build_loader(d.backend, d.path, aug, None, d.batch_size, d.num_workers, dist.device, dist.rank,
                              dist.world_size, t.seed, **options)
        classes = num_classes_of(self.cfg, loader)
        net = build_classifier(m.arch, d.img_size, classes, m.window_size, m.drop_path)
        if f.pretrained:
            report = load_pretrained(net, f.pretrained, m.arch)
            log.info("loaded %s: %d missing keys %s, %d unexpected %s, resized %s", f.pretrained,
                     len(report["missing"]), report["missing"][:6], len(report["unexpected"]),
                     report["unexpected"][:6], report["resized"][:4] + (["..."] if len(report["resized"]) > 4 else []))
        else:
            log.info("no finetune.pretrained: training from scratch")
        device_augment = None
        if f.rand_augment and d.backend != "torch":
            device_augment = DeviceRandAugment(f.rand_augment, aug.mean, aug.std)
        model = Classifier(net, classes, f.mixup, f.cutmix, f.mixup_switch_prob, f.label_smoothing, f.reprob,
                           device_augment).to(dist.device)
        self.val = eval_loader(self.cfg, f.val_path, d.backend, dist) if f.val_path else None
        self.classes = classes
        return model, loader

    def param_groups(self, model) -> list[dict]:
        o, f = self.cfg.optim, self.cfg.finetune
        return layer_decay_groups(model.net, self.cfg.model.arch, o.weight_decay, f.layer_decay)

    def describe_data(self) -> str:
        f = self.cfg.finetune
        return (f"{self.classes} classes, RandAugment {f.rand_augment or 'off'}, mixup {f.mixup}, cutmix {f.cutmix}, "
                f"label smoothing {f.label_smoothing}, random erasing {f.reprob}")

    def prepare(self, model, loader, dist: DistInfo) -> None:
        pass

    def after_epoch(self, model, epoch: int, last: bool, out_dir: Path, dist: DistInfo, amp_dtype) -> dict:
        if self.val is None or not ((epoch + 1) % self.cfg.finetune.eval_every == 0 or last):
            return {}
        result = evaluate(model, self.val, dist.device, amp_dtype)
        self.best = max(self.best, result["top1"])
        return {"top1": result["top1"], "top5": result["top5"], "val_loss": result["val_loss"],
                "best_top1": self.best}


def finetune(cfg: Config) -> dict:
    if cfg.finetune.pretrained and not (Path(cfg.finetune.pretrained).is_file() or
                                        is_dcp_checkpoint(cfg.finetune.pretrained)):
        raise ConfigError(f"finetune.pretrained: '{cfg.finetune.pretrained}' does not exist")
    return fit(cfg, FinetuneTask(cfg))


def evaluate_checkpoint(path: str, data: str | None = None, backend: str | None = None,
                        overrides: list[str] = ()) -> dict:
    """`simmim evaluate CKPT`: the checkpoint's own config (data.img_size, model) unless overridden."""
    if not (Path(path).is_file() or is_dcp_checkpoint(path)):
        raise ConfigError(f"checkpoint '{path}' does not exist")
    state = load_checkpoint(Path(path))
    if "config" not in state or not any(k.startswith("net.") for k in state.get("model", {})):
        raise ConfigError(f"'{path}' is not a fine-tuned checkpoint: fine-tune it first "
                          f"(simmim finetune --config ... finetune.pretrained={path})")
    cfg = config_from_dict(state["config"], overrides)
    dist = init_distributed(cfg.train.device)
    val = data or cfg.finetune.val_path
    if not val:
        raise ConfigError("no validation data: pass --data or set finetune.val_path")
    loader = eval_loader(cfg, val, backend or cfg.data.backend, dist)
    head = next(v for k, v in state["model"].items() if k.endswith(("head.fc.weight", "head.weight")))
    net = build_classifier(cfg.model.arch, cfg.data.img_size, head.shape[0], cfg.model.window_size, 0.0)
    weights = {k.removeprefix("net."): v for k, v in state["model"].items() if k.startswith("net.")}
    net.load_state_dict(weights)
    result = evaluate(net.to(dist.device), loader, dist.device, amp_dtype_for(cfg.train.precision, dist.device))
    cleanup()
    return {**result, "checkpoint": str(path), "data": val}
