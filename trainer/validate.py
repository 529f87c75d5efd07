"""One check of the whole config, before anything is built.

`load_config` and `config_from_dict` call `validate_config` after filling the schema, so a value
that would fail late (`data.batch_size=0` as a ZeroDivisionError after the model is built), or
not at all (`optim.base_lr=0` trains at lr 0), stops the command with one line naming the key.
Types are already checked by the schema; here: ranges, choices and the relations between keys
(image size, mask cell, patch size, Swin window).
"""
from __future__ import annotations

import os
from typing import Callable

from simmim.pipeline.errors import ConfigError


def _rule(test: Callable[[object], bool], what: str) -> tuple[Callable[[object], bool], str]:
    return test, what


POSITIVE = _rule(lambda v: v > 0, "> 0")
NON_NEGATIVE = _rule(lambda v: v >= 0, ">= 0")
OPEN_UNIT = _rule(lambda v: 0 < v < 1, "in (0, 1)")
UNIT = _rule(lambda v: 0 <= v <= 1, "in [0, 1]")
HALF_OPEN_UNIT = _rule(lambda v: 0 <= v < 1, "in [0, 1)")
UP_TO_ONE = _rule(lambda v: 0 < v <= 1, "in (0, 1]")


def one_of(*choices) -> tuple[Callable[[object], bool], str]:
    return _rule(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def rules() -> dict[str, tuple[Callable[[object], bool], str]]:
    """key -> (test, what the value must be), for every key with a constraint beyond its type."""
    from simmim.kernels.masked_l1 import LOSSES
    from simmim.pipeline.dali_loader import DEVICES
    from simmim.pipeline.ffcv_loader import ORDERS
    from simmim.pipeline.loaders import BACKENDS

    from .model import ARCHS, WEIGHT_DECAY_RULES
    from .parallel import PARALLEL
    from .schedule import ANCHORS
    return {
        "data.backend": one_of(*BACKENDS), "data.img_size": POSITIVE, "data.mask_patch_size": POSITIVE,
        "data.mask_ratio": OPEN_UNIT, "data.batch_size": POSITIVE, "data.num_workers": NON_NEGATIVE,
        "data.ffcv.order": one_of(*ORDERS), "data.ffcv.buffer_pages": POSITIVE, "data.ffcv.batches_ahead": POSITIVE,
        "data.dali.device": one_of(*DEVICES), "data.dali.hw_decoder_load": UNIT, "data.dali.prefetch": POSITIVE,
        "data.dali.threads": NON_NEGATIVE, "data.dali.preallocate": NON_NEGATIVE,
        "model.arch": one_of(*ARCHS), "model.window_size": NON_NEGATIVE, "model.drop_path": HALF_OPEN_UNIT,
        "model.loss": one_of(*LOSSES), "model.loss_beta": POSITIVE,
        "model.norm_target": _rule(lambda v: v == 0 or (v >= 3 and v % 2 == 1), "0 or an odd window >= 3"),
        "optim.base_lr": POSITIVE, "optim.warmup_lr": NON_NEGATIVE, "optim.min_lr": NON_NEGATIVE,
        "optim.weight_decay": NON_NEGATIVE, "optim.betas": _rule(lambda v: all(0 <= b < 1 for b in v), "in [0, 1)"),
        "optim.eps": POSITIVE, "optim.clip_grad": NON_NEGATIVE, "optim.scheduler": one_of("cosine", "step"),
        "optim.milestones": _rule(lambda v: all(m > 0 for m in v) and list(v) == sorted(set(v)),
                                  "increasing epochs > 0"),
        "optim.gamma": POSITIVE, "optim.cosine_anchor": one_of(*ANCHORS),
        "optim.weight_decay_rule": one_of(*WEIGHT_DECAY_RULES),
        "train.epochs": POSITIVE, "train.warmup_epochs": NON_NEGATIVE, "train.accum_steps": POSITIVE,
        "train.seed": NON_NEGATIVE, "train.device": one_of("auto", "cpu", "cuda"),
        "train.precision": one_of("auto", "bf16", "fp16", "fp32"), "train.max_skipped_steps": POSITIVE,
        "train.parallel": one_of(*PARALLEL),
        "run.out_dir": _rule(bool, "a folder"), "run.log_every": POSITIVE, "run.save_every": POSITIVE,
        "run.keep_last": NON_NEGATIVE, "run.vis_every": POSITIVE, "run.stop_check_every": POSITIVE,
        "run.val_every": NON_NEGATIVE, "run.save_every_minutes": NON_NEGATIVE,
        "finetune.num_classes": NON_NEGATIVE, "finetune.layer_decay": UP_TO_ONE, "finetune.crop_scale": UP_TO_ONE,
        "finetune.mixup": NON_NEGATIVE, "finetune.cutmix": NON_NEGATIVE, "finetune.mixup_switch_prob": UNIT,
        "finetune.label_smoothing": HALF_OPEN_UNIT, "finetune.reprob": UNIT, "finetune.eval_crop_ratio": UP_TO_ONE,
        "finetune.eval_every": POSITIVE,
    }


def _value(cfg, key: str):
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def validate_config(cfg) -> None:
    """Raises ConfigError naming the first key (in schema order) whose value is out of range, or
    a relation between keys that does not hold; the environment's SIMMIM_KERNELS too."""
    for key, (test, what) in rules().items():
        value = _value(cfg, key)
        if not test(value):
            raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")
    d, m, t, o = cfg.data, cfg.model, cfg.train, cfg.optim
    if d.img_size % d.mask_patch_size:
        raise ConfigError(f"data.img_size {d.img_size} must be a multiple of data.mask_patch_size {d.mask_patch_size}")
    if o.scheduler == "step" and o.milestones and o.milestones[-1] >= t.epochs:
        raise ConfigError(f"optim.milestones {o.milestones} must lie before train.epochs {t.epochs}")
    from simmim.pipeline.decode import check_max_pixels

    try:
        check_max_pixels(d.max_pixels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.finetune.rand_augment:
        from simmim.pipeline.rand_augment import parse_rand_augment

        parse_rand_augment(cfg.finetune.rand_augment, "finetune.rand_augment")
    from .model import check_model_options

    check_model_options(m.arch, d.img_size, d.mask_patch_size, m.window_size)
    from simmim.kernels.dispatch import MODES

    kernels = os.environ.get("SIMMIM_KERNELS", "auto")
    if kernels not in MODES:
        raise ConfigError(f"environment variable SIMMIM_KERNELS must be one of {', '.join(MODES)}, got '{kernels}'")
