"""`simmim probe CKPT --config PROBE_RECIPE`: a linear probe of a frozen encoder, trained by `loop.fit`.

The protocol of MAE's linear probing (He et al. 2022, Sec. A.2), as SimMIM's Table 6 ran it (ViT-B
56.7%: the features of the 8th block, average-pooled over the patch tokens):
- the encoder is frozen (no gradient, eval mode: no drop path) and runs in every training step, so the
  features are computed in the same pass that trains the classifier (nothing written to disk);
- the features of `probe.layer` (ViT: the output of block `layer`, 1-based; Swin: of stage `layer`;
  0: the encoder's last, after its final norm) are pooled by `probe.pool` ("avg": the mean over the
  patch tokens / the stage's grid; "cls": ViT's class token), then BatchNorm1d without affine
  parameters (eps 1e-6), then the linear layer (weights trunc-normal std 0.01, bias 0), trained with
  cross-entropy on the training view (random resized crop + flip, no other augmentation);
- the optimizer is `probe.optimizer`: "lars" (timm's Lars, momentum 0.9, MAE's) or "sgd" (momentum
  0.9), no weight decay by default, with the run's warmup + cosine schedule (optim.*);
- top-1 / top-5 on `probe.val_path` in the evaluation view after every `probe.eval_every` epochs,
  validation classes mapped by folder name to the training set's (finetune.class_map).
Distribution, checkpoints and resume are `loop.fit`'s, as for pre-training and fine-tuning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import Lars

from simmim.core.errors import CheckpointError, ConfigError
from simmim.core.rules import NON_NEGATIVE, POSITIVE, UP_TO_ONE, Rule, one_of
from simmim.pipeline import Augmentation, LoaderSpec, build_loader
from simmim.pipeline.stats import normalization

from .config import Config
from .distributed import DistInfo
from .finetune import build_classifier, class_map, evaluate, load_pretrained
from .loop import fit
from .model import ARCHS
from .parallel import gathered

log = logging.getLogger("simmim")
POOLS = ("avg", "cls")
OPTIMIZERS = ("lars", "sgd")


@dataclass
class ProbeOptions:
    """`probe.*`: which checkpoint, which features, which optimizer, where to evaluate."""
    pretrained: str = ""  # the checkpoint to probe (`simmim probe CKPT` sets it)
    val_path: str = ""  # validation folder / list; empty: no evaluation
    layer: int = 0  # ViT block / Swin stage (1-based) whose output is probed; 0: the last (after the final norm)
    pool: str = "avg"  # avg (mean over patch tokens / grid) | cls (ViT's class token)
    optimizer: str = "lars"  # lars | sgd (momentum 0.9)
    momentum: float = 0.9
    crop_scale: float = 0.08  # RandomResizedCrop lower area bound (MAE's linear probe)
    eval_crop_ratio: float = 0.875
    eval_every: int = 1  # epochs

    @staticmethod
    def rules() -> dict[str, Rule]:
        return {"layer": NON_NEGATIVE, "pool": one_of(*POOLS), "optimizer": one_of(*OPTIMIZERS),
                "momentum": NON_NEGATIVE, "crop_scale": UP_TO_ONE, "eval_crop_ratio": UP_TO_ONE, "eval_every": POSITIVE}


@dataclass
class ProbeConfig(Config):
    """`simmim probe`: the shared sections and `probe`."""
    probe: ProbeOptions = field(default_factory=ProbeOptions)


class LinearProbe(nn.Module):
    """A frozen timm encoder (`finetune.build_classifier`'s, its head unused), then pool -> BatchNorm1d
    (no affine) -> Linear. forward(images) -> logits (B, classes); forward(images, labels) -> the mean
    cross-entropy (a float32 scalar), as `loop.fit` calls it."""

    def __init__(self, net: nn.Module, family: str, num_classes: int, layer: int = 0, pool: str = "avg"):
        super().__init__()
        self.net, self.family, self.layer, self.pool = net.requires_grad_(False), family, layer, pool
        width = self._width()
        self.norm = nn.BatchNorm1d(width, affine=False, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def _width(self) -> int:
        if self.family == "vit" or self.layer == 0:
            return self.net.num_features
        return self.net.layers[self.layer - 1].blocks[-1].norm1.normalized_shape[0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # frozen: no drop path, whatever the loop asks
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, C) float32: `layer`'s output, pooled."""
        with gathered(self.net):  # train.parallel=fsdp: its patch embedding and norms are sharded
            return self._features(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        n = self.net
        if self.family == "vit":
            x = n.pos_drop(torch.cat((n.cls_token.expand(len(images), -1, -1), n.patch_embed(images)), dim=1))
            bias = n.rel_pos_bias() if n.rel_pos_bias is not None else None
            for blk in n.blocks[:self.layer or len(n.blocks)]:
                x = blk(x, shared_rel_pos_bias=bias)
            x = n.norm(x) if self.layer == 0 else x
            return (x[:, 0] if self.pool == "cls" else x[:, n.num_prefix_tokens:].mean(1)).float()
        x = n.patch_embed(images)  # (B, h, w, C)
        if getattr(n, "absolute_pos_embed", None) is not None:
            x = x + n.absolute_pos_embed
        x = n.layers[:self.layer or len(n.layers)](x)
        x = n.norm(x) if self.layer == 0 else x
        return x.mean(dim=(1, 2)).float()

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(self.norm(self.features(images)))
        return logits if labels is None else F.cross_entropy(logits.float(), labels)


def check_probe(arch: str, layer: int, pool: str) -> None:
    """ConfigError for a layer the architecture lacks, or a cls pool on Swin."""
    a = ARCHS[arch]
    most = a.depths[0] if a.family == "vit" else len(a.depths)
    if layer > most:
        raise ConfigError(f"probe.layer {layer}: {arch} has {most} {'blocks' if a.family == 'vit' else 'stages'}")
    if pool == "cls" and a.family != "vit":
        raise ConfigError(f"probe.pool cls: {arch} has no class token; use avg")


class ProbeTask:
    """For `fit`: the frozen encoder + linear head, the labelled loader, the head's parameters."""

    batch_transform = None  # (images, labels) go to the model as the loader yields them

    def __init__(self, cfg: ProbeConfig):
        self.cfg = cfg
        self.best = 0.0

    def build(self, dist: DistInfo):
        d, m, p, t = self.cfg.data, self.cfg.model, self.cfg.probe, self.cfg.train
        check_probe(m.arch, p.layer, p.pool)
        mean, std, _ = normalization(d.channels, d.mean, d.std, d.path)  # as pre-training normalised this data
        aug = Augmentation(size=d.img_size, scale=(p.crop_scale, 1.0), mean=mean, std=std)
        spec = LoaderSpec.from_config(d, aug, train=True, labels=True)
        # labels=True: unlabeled data is refused in one line by the loader, before any batch-size check
        loader = build_loader(spec, None, dist.device, dist.rank, dist.world_size, t.seed)
        self.class_names = loader.classes
        classes = len(loader.classes) or int(getattr(loader, "num_classes", 0))
        net = build_classifier(m.arch, d.img_size, max(classes, 1), m.window_size, 0.0, d.channels)
        if p.pretrained:
            report = load_pretrained(net, p.pretrained, m.arch, key="probe.pretrained")
            log.info("probing %s (%s layout): %d missing keys %s%s", p.pretrained, report["layout"],
                     len(report["missing"]), report["missing"][:6], f"; {report['adapted']}" if report["adapted"] else "")
        else:
            log.info("no probe.pretrained: probing the encoder at its random initialisation")
        model = LinearProbe(net, ARCHS[m.arch].family, classes, p.layer, p.pool).to(dist.device)
        self.val = None
        if p.val_path:
            spec = LoaderSpec.from_config(d, Augmentation(size=d.img_size, mean=mean, std=std), p.val_path,
                                          train=False, labels=True, crop_ratio=p.eval_crop_ratio, drop_last=False)
            self.val = build_loader(spec, None, dist.device, dist.rank, dist.world_size, t.seed)
            self.val_to_head = class_map(self.val.classes, self.class_names, classes, f"probe.val_path '{p.val_path}'")
        self.classes = classes
        return model, loader

    def param_groups(self, model) -> list[dict]:
        return [{"params": list(model.head.parameters()), "weight_decay": self.cfg.optim.weight_decay}]

    def optimizer(self, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        """LARS (timm.optim.Lars) or SGD, both with momentum `probe.momentum`."""
        p = self.cfg.probe
        if p.optimizer == "lars":
            return Lars(groups, lr=lr, momentum=p.momentum)
        return torch.optim.SGD(groups, lr=lr, momentum=p.momentum)

    def describe_data(self) -> str:
        p = self.cfg.probe
        return f"{self.classes} classes, probe layer {p.layer or 'last'}, pool {p.pool}, {p.optimizer}"

    def inputs(self) -> dict[str, tuple[str, str]]:
        p = self.cfg.probe
        return {"data.path": (self.cfg.data.path, "point it at the labelled training images"),
                "probe.val_path": (p.val_path, "point it at the validation images, or set probe.val_path= (empty)"),
                "probe.pretrained": (p.pretrained, "pass a pre-training checkpoint")}

    def prepare(self, model, loader, dist: DistInfo) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        return {"classes": list(self.class_names)} if self.class_names else {}

    def after_epoch(self, model, epoch: int, last: bool, out_dir: Path, dist: DistInfo, amp_dtype) -> dict:
        if self.val is None or not ((epoch + 1) % self.cfg.probe.eval_every == 0 or last):
            return {}
        result = evaluate(model, self.val, dist.device, amp_dtype, self.val_to_head)
        self.best = max(self.best, result["top1"])
        return {"top1": result["top1"], "top5": result["top5"], "val_loss": result["val_loss"],
                "best_top1": self.best}


def probe(cfg: ProbeConfig) -> dict:
    """`simmim probe` (see the module docstring)."""
    if cfg.probe.pretrained and not Path(cfg.probe.pretrained).exists():
        raise CheckpointError(f"probe: checkpoint '{cfg.probe.pretrained}' does not exist")
    return fit(cfg, ProbeTask(cfg))
