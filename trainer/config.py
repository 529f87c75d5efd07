"""The one config schema: nested typed dataclasses. YAML recipes and `a.b=c` overrides only fill it.

Defaults are the paper's Swin-B 100-epoch recipe. Derived values (effective lr, steps) are
computed by the wiring and logged, never written back here.
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from simmim.pipeline.errors import ConfigError
from simmim.pipeline.options import DataConfig
from simmim.pipeline.io import write_text

RECIPES = Path(__file__).parent / "configs"
log = logging.getLogger("simmim")
__all__ = ["Config", "ConfigError", "RECIPES", "config_from_dict", "load_config", "parse_override", "save_config"]


@dataclass
class ModelConfig:
    arch: str = "swin_base"
    window_size: int = 0  # 0: the arch's own
    drop_path: float = 0.0
    loss: str = "l1"  # l1 (the paper) | l2 | smooth_l1
    loss_beta: float = 1.0  # smooth_l1 only
    loss_all_pixels: bool = False  # ablation: loss on every pixel, not only masked ones
    norm_target: int = 0  # k > 0: per-window normalised targets (SwinV2 variant), k odd
    fused_shuffle: bool = True  # the loss reads the head output before PixelShuffle: no shuffle copy


@dataclass
class OptimConfig:
    base_lr: float = 2e-4  # per 512 images of global batch
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 5.0  # 0 disables
    scheduler: str = "cosine"  # cosine | step
    # cosine: "released" computes it from iteration 0 over the whole run and lets warmup override the
    # first iterations (the released SimMIM code, timm's CosineLRScheduler); "warmup_end" starts it
    # at the end of warmup (reaches the peak lr)
    cosine_anchor: str = "released"
    # "released": what the released code's parameter groups did (its pre-training no-decay keywords
    # never matched: Swin's relative-position tables, ViT's mask token and shared bias table decay);
    # "intended": no decay on any norm, bias, position table or token (see trainer/model.py)
    weight_decay_rule: str = "released"
    milestones: list[int] = field(default_factory=list)  # epochs, for step
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 100
    warmup_epochs: int = 10
    accum_steps: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # activation checkpointing: less memory, ~30% more compute
    channels_last: bool = True  # CUDA only
    max_skipped_steps: int = 20  # consecutive non-finite steps before the run stops
    parallel: str = "ddp"  # ddp (whole model per rank, torch.save checkpoints) | fsdp (FSDP2, DCP checkpoints)
    cpu_offload: bool = False  # fsdp: parameter / gradient / optimizer shards in host memory


@dataclass
class RunConfig:
    out_dir: str = "runs/simmim"
    log_every: int = 100  # optimizer steps
    save_every: int = 5  # epochs
    save_every_minutes: float = 30.0  # also mid-epoch, at the next stop check after this long; 0: off
    keep_last: int = 3  # checkpoints kept
    vis_every: int = 10  # epochs; the final epoch always writes a figure
    progress: bool = True
    stop_check_every: int = 10  # steps between checks for a stop signal across ranks
    val_every: int = 1  # epochs between validation losses on data.val_path (0: never); the last epoch always
    tensorboard: bool = True  # TensorBoard events in out_dir/tensorboard (rank 0)
    wandb: bool = False  # also log to Weights & Biases when installed (WANDB_MODE=offline works offline)
    async_save: bool = False  # fsdp: write checkpoints in the background (DCP async_save)


@dataclass
class FinetuneConfig:
    """`simmim finetune` only (the paper's fine-tuning recipe by default); pre-training ignores it."""
    pretrained: str = ""  # a SimMIM checkpoint; empty: train from scratch
    val_path: str = ""  # validation folder / list / .beton; empty: no evaluation
    num_classes: int = 0  # 0: the number of class folders
    layer_decay: float = 0.9  # Swin-B 100 ep 0.9; ViT-B 0.65
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # empty: off
    crop_scale: float = 0.08  # RandomResizedCrop lower area bound
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    reprob: float = 0.25  # random erasing
    eval_crop_ratio: float = 0.875  # centre crop / resized shorter side (224 / 256)
    eval_every: int = 1  # epochs


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        """Plain YAML-safe values (tuples become lists)."""
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
        return plain(asdict(self))


def _coerce(key: str, value, tp):
    """Checks `value` against the annotation `tp` and converts where lossless (int -> float,
    list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' expects {tp}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}' expects {len(args)} values, got {value!r}")
            return tuple(_coerce(key, v, a) for v, a in zip(value, args))
        return [_coerce(key, v, args[0]) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is type(None) and value is None:
        return None
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}")


def _fill(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(prefix + n for n in names))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section: expected a mapping, got {value!r}")
            _fill(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


# keys of earlier versions (flat backend options) -> where they live now; saved configs and recipes
# that use them still load, with a warning
RENAMED = {"data.order": "data.ffcv.order", "data.os_cache": "data.ffcv.os_cache",
           "data.buffer_pages": "data.ffcv.buffer_pages", "data.dali_device": "data.dali.device",
           "data.dali_hw_decoder_load": "data.dali.hw_decoder_load", "data.dali_prefetch": "data.dali.prefetch",
           "data.dali_threads": "data.dali.threads", "data.dali_preallocate": "data.dali.preallocate"}


def _renamed(values: dict) -> dict:
    """`values` with the `RENAMED` keys moved to their new place (a warning names each)."""
    data = values.get("data")
    if not isinstance(data, dict):
        return values
    data = dict(data)
    for old, new in RENAMED.items():
        name = old.split(".", 1)[1]
        if name in data:
            section, sub = new.split(".")[1:]
            log.warning("config key '%s' is now '%s'", old, new)
            data[section] = {**(data.get(section) or {}), sub: data.pop(name)}
    return {**values, "data": data}


def parse_override(text: str) -> dict:
    """'optim.base_lr=1e-4' -> {'optim': {'base_lr': 1e-4}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def resolve_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = RECIPES / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a packaged recipe ({known})")


def _float_strings(node):
    """YAML 1.1 reads '2e-4' as a string; convert such scalars to float."""
    if isinstance(node, dict):
        return {k: _float_strings(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_float_strings(v) for v in node]
    if isinstance(node, str):
        try:
            return float(node) if any(c in node for c in "eE") and node[0] in "0123456789.-+" else node
        except ValueError:
            return node
    return node


def load_config(recipe: str | None = None, overrides: list[str] = ()) -> Config:
    """The defaults, then the recipe (a packaged name or a YAML path), then `a.b=c` overrides;
    checked whole (`validate_config`). ConfigError naming the key for any mistake."""
    from .validate import validate_config

    cfg = Config()
    if recipe:
        path = resolve_recipe(recipe)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}")
        _fill(cfg, _renamed(_float_strings(values)))
    for text in overrides:
        _fill(cfg, _renamed(_float_strings(parse_override(text))))
    validate_config(cfg)
    return cfg


def config_from_dict(values: dict, overrides: list[str] = ()) -> Config:
    """A Config from a saved one (e.g. a checkpoint's), then `a.b=c` overrides; checked whole."""
    from .validate import validate_config

    cfg = Config()
    _fill(cfg, _renamed(_float_strings(values)))
    for text in overrides:
        _fill(cfg, _renamed(_float_strings(parse_override(text))))
    validate_config(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
