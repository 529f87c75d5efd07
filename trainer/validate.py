"""One check of the whole config, before anything is built.

`load_config` and `config_from_dict` call `validate_config` after filling the schema, so a value
that would fail late (`data.batch_size=0` as a ZeroDivisionError after the model is built), or
not at all (`optim.base_lr=0` trains at lr 0), stops the command with one line naming the key.
Types are already checked by the schema. Ranges and choices live beside the options they check:
each options class has `rules()` (field -> (test, what)): pipeline's `DataConfig` and its backend
sections, kernels' `LossOptions`, the shared sections in trainer/config.py, `FinetuneOptions`; this
module walks a config's sections and composes them, then checks the relations between keys (image
size, mask cell, patch size, Swin window, milestones, parallelism and precision) and the
environment's SIMMIM_KERNELS. Every rule a user can break is checked here, once: the functions that
take these values later (the schedule, the parallel wrapper, the loaders) do not check them again.
"""
from __future__ import annotations

import dataclasses
import os
import typing

from simmim.core.errors import ConfigError
from simmim.core.rules import Rule
from simmim.kernels.dispatch import MODES
from simmim.pipeline.decode import check_max_pixels
from simmim.pipeline.options import check_channels

from .model import check_model_options


def rules(schema) -> dict[str, Rule]:
    """Dotted key -> (test, what the value must be), for every key of `schema` (a config class or
    instance) whose section states a rule, in schema order."""
    schema = schema if isinstance(schema, type) else type(schema)
    out: dict[str, Rule] = {}

    def walk(section: type, prefix: str) -> None:
        if hasattr(section, "rules"):
            out.update({prefix + name: rule for name, rule in section.rules().items()})
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(schema, "")
    return out


def _value(cfg, key: str):
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def validate_config(cfg) -> None:
    """Raises ConfigError naming the first key (in schema order) whose value is out of range, or
    a relation between keys that does not hold; the environment's SIMMIM_KERNELS too."""
    for key, (test, what) in rules(cfg).items():
        value = _value(cfg, key)
        if not test(value):
            raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")
    d, m, t, o = cfg.data, cfg.model, cfg.train, cfg.optim
    if d.img_size % d.mask_patch_size:
        raise ConfigError(f"data.img_size {d.img_size} must be a multiple of data.mask_patch_size {d.mask_patch_size}")
    if o.scheduler == "step" and o.milestones and o.milestones[-1] >= t.epochs:
        raise ConfigError(f"optim.milestones {o.milestones} must lie before train.epochs {t.epochs}")
    if t.cpu_offload and t.parallel != "fsdp":
        raise ConfigError("train.cpu_offload needs train.parallel=fsdp")
    if t.parallel == "fsdp" and t.precision == "fp16":
        raise ConfigError("train.parallel=fsdp trains in bf16 or fp32 (no fp16 loss scaling): set train.precision=bf16")
    f = getattr(cfg, "finetune", None)
    if f is not None and f.rand_augment and d.channels != 3 and (d.channels != 1 or d.backend != "torch"):
        # RandAugment's ops are colour-image ops: PIL's on grey (mode L) images, nothing for N channels
        raise ConfigError(f"finetune.rand_augment works on RGB images, and on grey ones with data.backend=torch; "
                          f"set finetune.rand_augment='' for data.channels={d.channels} with data.backend={d.backend}")
    if f is not None and m.init_from:
        raise ConfigError("model.init_from is for simmim pretrain: fine-tuning starts from finetune.pretrained")
    if f is not None and (f.mixup > 0 or f.cutmix > 0) and d.batch_size % 2:
        # timm's batch mixup pairs each image with the batch reversed: an odd batch cannot be mixed
        raise ConfigError(f"data.batch_size {d.batch_size} must be even with finetune.mixup / finetune.cutmix on "
                          f"(timm's Mixup pairs images): use an even batch, or set finetune.mixup=0 finetune.cutmix=0")

    check_channels(d.channels, d.mean, d.std, d.backend)
    try:
        check_max_pixels(d.max_pixels)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    check_model_options(m.arch, d.img_size, d.mask_patch_size, m.window_size, m.head, getattr(cfg, "loss", None))

    kernels = os.environ.get("SIMMIM_KERNELS", "auto")
    if kernels not in MODES:
        raise ConfigError(f"environment variable SIMMIM_KERNELS must be one of {', '.join(MODES)}, got '{kernels}'")
