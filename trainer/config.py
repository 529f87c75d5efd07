"""The run config: nested typed dataclasses, filled from YAML and `a.b=c` overrides by OmegaConf.

Each module owns the options it reads: `data` is pipeline's `DataConfig` (with `data.ffcv.*`,
`data.dali.*`), `loss` is kernels' `LossOptions`, `finetune` is trainer/finetune_options.py's; the
sections every task shares (model, optim, train, run) are here. `Config` composes the shared
sections; `PretrainConfig` adds `loss` (what `simmim pretrain` runs) and `FinetuneConfig`
(finetune_options.py) adds `finetune`, so a pre-training run's config.yaml has no `finetune`
section and a fine-tuning run's no `loss`.

Loading: the schema's defaults (the paper's Swin-B 100-epoch recipe), then a recipe (a packaged name
or a YAML path, read with yaml.safe_load), then the overrides, each key set on an
`OmegaConf.structured` config (type checks and conversions: '2e-4' into a float field is 2e-4, a
list into a tuple of fixed length), then `OmegaConf.to_object` back to the dataclasses and
`validate_config` (ranges and relations). Every mistake (unknown key, wrong type, not a mapping,
bad YAML, missing recipe) is one `ConfigError` line naming the key.

Derived values (effective lr, steps) are computed by the wiring and logged, never written back here.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simmim.core.errors import ConfigError
from simmim.core.io import write_text
from simmim.core.rules import HALF_OPEN_UNIT, NON_NEGATIVE, POSITIVE, Rule, one_of
from simmim.kernels import LossOptions
from simmim.pipeline.options import DataConfig

from .distributed import DEVICES
from .heads import HEADS
from .model import ARCHS, WEIGHT_DECAY_RULES
from .parallel import PARALLEL
from .precision import PRECISIONS
from .schedule import ANCHORS, KINDS
from .validate import validate_config

RECIPES = Path(__file__).parent / "configs"
# run.mirror: s3://bucket[/prefix], S3's bucket naming (3-63 of a-z 0-9 . -)
S3_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?$")
__all__ = ["Config", "ConfigError", "PretrainConfig", "RECIPES", "config_from_dict", "flatten", "load_config",
           "parse_override", "save_config"]


@dataclass
class ModelConfig:
    arch: str = "swin_base"
    window_size: int = 0  # 0: the arch's own
    drop_path: float = 0.0
    fused_shuffle: bool = True  # the loss reads the head output before PixelShuffle: no shuffle copy
    head: str = "linear"  # linear (the paper) | mlp | inverse_swin_t | inverse_swin_b (Table 3; trainer/heads.py)
    # continued pre-training: the weights a fresh `simmim pretrain` starts from (a checkpoint of this
    # project, a released SimMIM one, or an exported encoder); empty: random weights. A resume ignores it
    init_from: str = ""  # a path, or timm's local-dir:FOLDER for an exported encoder

    @staticmethod
    def rules() -> dict[str, Rule]:
        return {"arch": one_of(*ARCHS), "window_size": NON_NEGATIVE, "drop_path": HALF_OPEN_UNIT,
                "head": one_of(*HEADS),
                "init_from": (lambda v: not v.startswith(("hf-hub:", "hf_hub:", "timm/")),
                              "a local checkpoint file or folder, or local-dir:FOLDER (a hub name: download it "
                              "first; empty: random weights)")}


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

    @staticmethod
    def rules() -> dict[str, Rule]:
        return {"base_lr": POSITIVE, "warmup_lr": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
                "betas": (lambda v: all(0 <= b < 1 for b in v), "in [0, 1)"), "eps": POSITIVE,
                "clip_grad": NON_NEGATIVE, "scheduler": one_of(*KINDS),
                "milestones": (lambda v: all(m > 0 for m in v) and list(v) == sorted(set(v)), "increasing epochs > 0"),
                "gamma": POSITIVE, "cosine_anchor": one_of(*ANCHORS), "weight_decay_rule": one_of(*WEIGHT_DECAY_RULES)}


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

    @staticmethod
    def rules() -> dict[str, Rule]:
        return {"epochs": POSITIVE, "warmup_epochs": NON_NEGATIVE, "accum_steps": POSITIVE, "seed": NON_NEGATIVE,
                "device": one_of(*DEVICES), "precision": one_of("auto", *PRECISIONS),
                "max_skipped_steps": POSITIVE, "parallel": one_of(*PARALLEL)}


@dataclass
class RunConfig:
    out_dir: str = "runs/simmim"
    log_every: int = 100  # optimizer steps
    save_every: int = 5  # epochs
    save_every_minutes: float = 30.0  # also mid-epoch, at the next stop check after this long; 0: off
    keep_last: int = 3  # checkpoints kept (0: every one)
    vis_every: int = 10  # epochs; the final epoch always writes a figure
    progress: bool = True
    stop_check_every: int = 10  # steps between checks for a stop signal across ranks
    val_every: int = 1  # epochs between validation losses on data.val_path (0: never); the last epoch always
    knn_every: int = 0  # epochs between weighted k-NN top-1 evaluations on data.val_path (0: never; trainer/knn.py)
    knn_train_samples: int = 10000  # training images (a fixed random subset) whose features the k-NN votes with
    tensorboard: bool = True  # TensorBoard events in out_dir/tensorboard (rank 0)
    wandb: bool = False  # also log to Weights & Biases when installed (WANDB_MODE=offline works offline)
    async_save: bool = False  # fsdp: write checkpoints in the background (DCP async_save)
    # s3://bucket/prefix: each checkpoint also uploaded there in the background, and a run folder without
    # a checkpoint resumes from its newest complete one (trainer/mirror.py); empty: off
    mirror: str = ""
    mirror_wait_s: float = 300.0  # at the end of a run and after a stop signal: the longest wait for its upload
    # end with status 0 even when the newest checkpoint did not reach run.mirror (else status 3, one line)
    mirror_allow_missing: bool = False

    @staticmethod
    def rules() -> dict[str, Rule]:
        return {"out_dir": (bool, "a folder"), "log_every": POSITIVE, "save_every": POSITIVE,
                "save_every_minutes": NON_NEGATIVE, "keep_last": NON_NEGATIVE, "vis_every": POSITIVE,
                "stop_check_every": POSITIVE, "val_every": NON_NEGATIVE,
                "knn_every": NON_NEGATIVE, "knn_train_samples": POSITIVE,
                "mirror": (lambda v: not v or bool(S3_URL.match(v)), "empty or s3://bucket/prefix (an S3 bucket "
                           "name: 3-63 characters of a-z 0-9 . -)"), "mirror_wait_s": NON_NEGATIVE}


@dataclass
class Config:
    """The sections every task shares; a task's config adds its own (`PretrainConfig`: loss,
    `finetune_options.FinetuneConfig`: finetune)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        """Plain YAML-safe values (tuples become lists)."""
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
        return plain(asdict(self))


@dataclass
class PretrainConfig(Config):
    """`simmim pretrain`: the shared sections and the masked loss's options."""
    loss: LossOptions = field(default_factory=LossOptions)


# Sections only one task has: in a recipe or override for the other task they are a mistake
TASK_SECTIONS = {"loss": "pre-training (simmim pretrain)", "finetune": "fine-tuning (simmim finetune)"}


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are values, an empty mapping has no keys."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fields(schema) -> dict[str, Any]:
    """name -> resolved annotation of a dataclass's fields."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp)


def _explain(schema: type[Config], key: str, value) -> str:
    """Why `key = value` does not fit `schema` (OmegaConf refused it), in one line naming the key."""
    tp, path = schema, []
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return f"config key '{'.'.join(path)}' expects {_type_name(tp)}, got sub-key '{key}'"
        fields = _fields(tp)
        if part not in fields:
            where = ".".join(path + [part])
            known = ", ".join(".".join(path + [n]) for n in fields)
            return f"unknown config key '{where}' (known: {known})"
        path.append(part)
        tp = fields[part]
    if dataclasses.is_dataclass(tp):
        return f"config key '{key}' is a section: expected a mapping, got {value!r}"
    return f"config key '{key}' expects {_type_name(tp)}, got {value!r}"


def _is_section(schema: type[Config], key: str) -> bool:
    """Whether dotted `key` names a section (a nested dataclass) of `schema`."""
    tp = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp) or part not in (fields := _fields(tp)):
            return False
        tp = fields[part]
    return dataclasses.is_dataclass(tp)


def _set(node, schema: type[Config], key: str, value) -> None:
    """`key = value` on the OmegaConf config `node` of `schema` (typed: converted or refused). A
    section set to None (YAML `data:` with every key commented out) is an empty section."""
    if value is None and _is_section(schema, key):
        return
    section = key.split(".", 1)[0]
    if section in TASK_SECTIONS and section not in _fields(schema):
        raise ConfigError(f"config key '{key}' belongs to {TASK_SECTIONS[section]}: this command's config "
                          f"has no '{section}' section")
    try:
        OmegaConf.update(node, key, value, merge=True)
    except OmegaConfBaseException:
        raise ConfigError(_explain(schema, key, value)) from None


def _build(schema: type[Config], layers: list[dict[str, Any]]) -> Config:
    """The schema's defaults with each layer's flat keys set in order, as the dataclasses; checked whole."""
    node = OmegaConf.structured(schema)
    for layer in layers:
        for key, value in layer.items():
            _set(node, schema, key, value)
    try:
        cfg = OmegaConf.to_object(node)  # interpolations (${model.arch}) resolve here
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key '{e.full_key}': {str(e).splitlines()[0]}") from None
    validate_config(cfg)
    return cfg


def parse_override(text: str) -> dict[str, Any]:
    """'optim.base_lr=1e-4' -> {'optim.base_lr': 1e-4}: the value is read as YAML (a list, a
    number, true/false), an unreadable one is kept as text, and 'key=' is the empty string (where
    OmegaConf.from_dotlist would give None)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return {key.strip(): value}


def resolve_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = RECIPES / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a packaged recipe ({known})")


def read_recipe(name_or_path: str) -> dict:
    """The mapping a recipe holds (yaml.safe_load); ConfigError if it is missing, not YAML or not a mapping."""
    path = resolve_recipe(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}")
    return values


def load_config(recipe: str | None = None, overrides: list[str] = (), schema: type[Config] = PretrainConfig):
    """The `schema`'s defaults (PretrainConfig, or finetune_options.FinetuneConfig), then the recipe (a
    packaged name or a YAML path), then `a.b=c` overrides; checked whole (`validate_config`).
    ConfigError naming the key for any mistake."""
    layers = [flatten(read_recipe(recipe))] if recipe else []
    return _build(schema, layers + [parse_override(text) for text in overrides])


def config_from_dict(values: dict, overrides: list[str] = (), schema: type[Config] = PretrainConfig):
    """A `schema` config from a saved one (`Config.to_dict()`, e.g. a checkpoint's), then `a.b=c`
    overrides; checked whole."""
    return _build(schema, [flatten(values)] + [parse_override(text) for text in overrides])


def save_config(cfg: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
