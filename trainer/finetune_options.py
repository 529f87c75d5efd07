"""Fine-tuning's own options (the `finetune:` section) and the config `simmim finetune` / `simmim
evaluate` load: the shared sections (data, model, optim, train, run) plus `finetune`.

Defaults are the paper's fine-tuning recipe (SimMIM appendix; trainer/finetune.py's docstring).
A pre-training config has no `finetune` section (trainer/config.py `PretrainConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from simmim.core.errors import ConfigError
from simmim.core.rules import HALF_OPEN_UNIT, NON_NEGATIVE, POSITIVE, UNIT, UP_TO_ONE, Rule
from simmim.pipeline.rand_augment import parse_rand_augment

from .config import Config

__all__ = ["FinetuneConfig", "FinetuneOptions"]


def _is_rand_augment(spec: str) -> bool:
    try:
        parse_rand_augment(spec)
    except ConfigError:
        return False
    return True


@dataclass
class FinetuneOptions:
    """`finetune.*`: what fine-tuning starts from, evaluates on, and its regularisation."""
    pretrained: str = ""  # a SimMIM checkpoint; empty: train from scratch
    # what finetune.pretrained was pre-trained at, where its own record does not say (SwinV2's position
    # bias needs both; 0: as the checkpoint records)
    pretrained_img_size: int = 0
    pretrained_window_size: int = 0
    val_path: str = ""  # validation folder / list / .beton; empty: no evaluation
    num_classes: int = 0  # 0: the number of class folders
    layer_decay: float = 0.9  # Swin-B 100 ep 0.9; ViT-B 0.65
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; empty: off
    crop_scale: float = 0.08  # RandomResizedCrop lower area bound
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    reprob: float = 0.25  # random erasing
    eval_crop_ratio: float = 0.875  # centre crop / resized shorter side (224 / 256)
    eval_every: int = 1  # epochs

    @staticmethod
    def rules() -> dict[str, Rule]:
        return {"num_classes": NON_NEGATIVE, "pretrained_img_size": NON_NEGATIVE, "pretrained_window_size": NON_NEGATIVE, "layer_decay": UP_TO_ONE,
                "rand_augment": (lambda v: not v or _is_rand_augment(v), "empty or like rand-m9-mstd0.5-inc1"),
                "crop_scale": UP_TO_ONE, "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "mixup_switch_prob": UNIT,
                "label_smoothing": HALF_OPEN_UNIT, "reprob": UNIT, "eval_crop_ratio": UP_TO_ONE,
                "eval_every": POSITIVE}


@dataclass
class FinetuneConfig(Config):
    """`simmim finetune` / `simmim evaluate`: the shared sections and `finetune`."""
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
