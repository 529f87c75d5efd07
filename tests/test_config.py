import pytest
import yaml

from simmim.core.errors import ConfigError
from simmim.trainer.config import RECIPES, PretrainConfig, config_from_dict, load_config, save_config
from simmim.trainer.finetune_options import FinetuneConfig


def test_defaults_are_paper_recipe():
    c = PretrainConfig()
    assert (c.data.img_size, c.data.mask_patch_size, c.data.mask_ratio) == (192, 32, 0.6)
    assert (c.optim.base_lr, c.optim.weight_decay, c.optim.clip_grad, c.optim.betas) == (2e-4, 0.05, 5.0, (0.9, 0.999))


@pytest.mark.parametrize("name", ["swin_base_100ep", "swin_base_800ep", "swin_large_800ep", "vit_base_800ep", "demo"])
def test_recipes_load(name):
    c = load_config(name)
    assert c.train.epochs > 0 and isinstance(c.optim.base_lr, float)


def test_recipe_values():
    c = load_config("swin_base_100ep")
    assert (c.model.arch, c.optim.base_lr, c.train.epochs, c.train.warmup_epochs) == ("swin_base", 2e-4, 100, 10)
    assert c.data.batch_size * 16 == 2048
    v = load_config("vit_base_800ep")
    assert (v.model.arch, v.data.img_size, v.optim.scheduler, v.optim.milestones) == ("vit_base", 224, "step", [700])
    assert load_config("swin_large_800ep").model.window_size == 12


def test_overrides_and_types():
    c = load_config("demo", ["optim.base_lr=1e-3", "train.epochs=3", "optim.milestones=[1,2]",
                             "optim.betas=[0.9,0.95]", "data.path=/x y", "run.progress=false"])
    assert c.optim.base_lr == 1e-3 and c.train.epochs == 3 and c.optim.milestones == [1, 2]
    assert c.optim.betas == (0.9, 0.95) and c.data.path == "/x y" and c.run.progress is False
    assert load_config(None, ["optim.base_lr=2"]).optim.base_lr == 2.0  # int accepted for float


@pytest.mark.parametrize("override,match", [
    ("data.bath_size=4", "unknown config key 'data.bath_size'"),
    ("nope.x=1", "unknown config key 'nope'"),
    ("train.epochs=ten", "config key 'train.epochs' expects int"),
    ("train.epochs=1.5", "config key 'train.epochs' expects int"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("data=3", "section"),
    ("train.epochs", "not of the form"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a packaged recipe"):
        load_config("no_such_recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(str(bad))


def test_resolved_config_round_trips(tmp_path):
    c = load_config("demo", ["train.epochs=7"])
    save_config(c, tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]["epochs"] == 7
    assert load_config(str(tmp_path / "c.yaml")) == c
    assert sorted(p.stem for p in RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("override,match", [
    ("data.batch_size=0", "'data.batch_size' must be > 0, got 0"),  # was a ZeroDivisionError
    ("train.accum_steps=0", "'train.accum_steps' must be > 0, got 0"),  # was a ZeroDivisionError
    ("optim.base_lr=0", "'optim.base_lr' must be > 0, got 0.0"),  # trained silently at lr 0
    ("optim.base_lr=-1e-4", "'optim.base_lr' must be > 0"),
    ("data.mask_ratio=1", "'data.mask_ratio' must be in (0, 1), got 1.0"),
    ("data.mask_ratio=0", "'data.mask_ratio' must be in (0, 1)"),
    ("data.img_size=200", "data.img_size 200 must be a multiple of data.mask_patch_size 32"),
    ("data.mask_patch_size=40", "data.img_size 192 must be a multiple of data.mask_patch_size 40"),
    ("data.mask_patch_size=6", "data.mask_patch_size 6 must divide data.img_size 192 and be a multiple of the swin_base patch size 4"),
    ("data.backend=tf", "'data.backend' must be one of torch, ffcv, dali, stream, got 'tf'"),
    ("data.ffcv.order=shuffled", "'data.ffcv.order' must be one of"),
    ("data.dali.hw_decoder_load=1.5", "'data.dali.hw_decoder_load' must be in [0, 1]"),
    ("data.stream.cache_limit=lots", "'data.stream.cache_limit' must be a size such as 20gb"),
    ("data.stream.canonical_nodes=0", "'data.stream.canonical_nodes' must be > 0"),
    ("data.stream.shuffle_algo=random", "'data.stream.shuffle_algo' must be one of py1e"),
    ("model.arch=resnet", "'model.arch' must be one of swin_base"),
    ("model.window_size=5", "Swin window 5 does not tile stage 0"),
    ("loss.norm_target=4", "'loss.norm_target' must be 0 or an odd window >= 3, got 4"),
    ("loss.kind=l3", "'loss.kind' must be one of l1, l2, smooth_l1"),
    ("loss.beta=0", "'loss.beta' must be > 0"),
    ("model.drop_path=1", "'model.drop_path' must be in [0, 1)"),
    ("optim.betas=[0.9,1.0]", "'optim.betas' must be in [0, 1)"),
    ("optim.scheduler=linear", "'optim.scheduler' must be one of cosine, step"),
    ("optim.milestones=[5,3]", "'optim.milestones' must be increasing epochs > 0"),
    ("train.warmup_epochs=-1", "'train.warmup_epochs' must be >= 0"),
    ("train.precision=fp8", "'train.precision' must be one of auto, bf16, fp16, fp32"),
    ("train.device=tpu", "'train.device' must be one of auto, cpu, cuda"),
    ("train.epochs=0", "'train.epochs' must be > 0"),
    ("run.log_every=0", "'run.log_every' must be > 0"),
    ("finetune.label_smoothing=1", "'finetune.label_smoothing' must be in [0, 1)"),
    ("finetune.rand_augment=autoaug", "'finetune.rand_augment' must be empty or like rand-m9-mstd0.5-inc1"),
])
def test_values_are_validated_at_load(override, match):
    """Every value is checked when the config is loaded, before anything is built; one line naming the key."""
    schema = FinetuneConfig if override.startswith("finetune.") else PretrainConfig
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], schema)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_validation_reads_the_kernel_environment(monkeypatch):
    monkeypatch.setenv("SIMMIM_KERNELS", "fast")
    with pytest.raises(ConfigError, match="SIMMIM_KERNELS must be one of auto, triton, reference, got 'fast'"):
        load_config("demo")


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_packaged_recipe_passes_validation(name):
    from simmim.trainer.probe import ProbeConfig

    schema = FinetuneConfig if name.startswith("finetune") else ProbeConfig if name.startswith("probe") else PretrainConfig
    assert load_config(name, [], schema).train.epochs > 0


@pytest.mark.parametrize("schema", [PretrainConfig, FinetuneConfig, "ProbeConfig"])
def test_every_numeric_option_has_a_range(schema):
    """A new int / float option cannot slip past validation: each has a rule beside it (`rules()` of
    its options class, composed by trainer/validate.py) or a check of its own there, listed here."""
    import dataclasses
    import typing

    from simmim.trainer.validate import rules

    def numeric(section, prefix=""):
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from numeric(hints[f.name], f"{prefix}{f.name}.")
            elif any(t in str(hints[f.name]) for t in ("int", "float")):
                yield prefix + f.name

    if schema == "ProbeConfig":
        from simmim.trainer.probe import ProbeConfig as schema
    checked_apart = {"data.max_pixels"}  # decode.check_max_pixels
    keys = list(numeric(schema))
    assert {"data.ffcv.buffer_pages", "loss.beta", "optim.betas"} & set(keys)
    assert not [k for k in keys if k not in set(rules(schema)) | checked_apart]


def test_parallel_is_checked_at_load():
    with pytest.raises(ConfigError, match="train.parallel"):
        load_config("demo", ["train.parallel=zero3"])
    # relations between keys: one line at load, not a ValueError from inside the loop
    with pytest.raises(ConfigError, match="^train.cpu_offload needs train.parallel=fsdp$"):
        load_config("demo", ["train.cpu_offload=true"])
    with pytest.raises(ConfigError, match="^train.parallel=fsdp trains in bf16 or fp32"):
        load_config("demo", ["train.parallel=fsdp", "train.precision=fp16"])
    for key, value in (("train.device", "tpu"), ("train.precision", "fp8"), ("optim.scheduler", "linear")):
        with pytest.raises(ConfigError, match=f"^config key '{key}' must be one of"):
            load_config("demo", [f"{key}={value}"])
    assert load_config("demo", ["train.parallel=fsdp", "train.cpu_offload=true"]).train.cpu_offload
    assert load_config("demo", ["train.parallel=fsdp"]).train.parallel == "fsdp"


@pytest.mark.parametrize("override,match", [
    ("data.ffcv.ordr=random", "unknown config key 'data.ffcv.ordr' (known: data.ffcv.order, "),
    ("loss.knd=l2", "unknown config key 'loss.knd' (known: loss.kind, loss.beta"),
    ("data.dali.prefetch=two", "config key 'data.dali.prefetch' expects int, got 'two'"),
    ("data.ffcv=1", "config key 'data.ffcv' is a section: expected a mapping, got 1"),
    ("data.path.x=1", "config key 'data.path' expects str"),
    ("finetune.mixup=0", "config key 'finetune.mixup' belongs to fine-tuning (simmim finetune)"),
])
def test_nested_mistakes_are_one_line_naming_the_key(override, match):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert match in str(e.value) and "\n" not in str(e.value)


def test_a_nested_typo_in_a_recipe_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dali:\n    prefech: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert "unknown config key 'data.dali.prefech'" in str(e.value) and "\n" not in str(e.value)


def test_yaml_1_1_floats_and_tuples():
    """yaml.safe_load reads '2e-4' as a string: a float field takes it as a float; betas is a tuple."""
    cfg = load_config(None, ["optim.base_lr=2e-4", "optim.betas=[0.9, 9e-1]", "optim.eps=1e-6"])
    assert cfg.optim.base_lr == 2e-4 and cfg.optim.eps == 1e-6 and cfg.optim.betas == (0.9, 0.9)
    assert isinstance(cfg.optim.betas, tuple)
    assert load_config(None, ["run.out_dir=1e-4"]).run.out_dir == "1e-4"  # a str field keeps the text


def test_the_task_sections_belong_to_their_command():
    """A pre-training config has a loss section and no finetune section; a fine-tuning config the
    reverse; both share data, model, optim, train, run."""
    pre, fine = load_config("demo"), load_config("finetune_demo", [], FinetuneConfig)
    assert set(pre.to_dict()) == {"data", "model", "optim", "train", "run", "loss"}
    assert set(fine.to_dict()) == {"data", "model", "optim", "train", "run", "finetune"}
    with pytest.raises(ConfigError, match="config key 'finetune.val_path' belongs to fine-tuning"):
        load_config("finetune_demo")  # a fine-tuning recipe given to pretrain
    with pytest.raises(ConfigError, match="config key 'loss.norm_target' belongs to pre-training"):
        load_config("swinv2_base_800ep", [], FinetuneConfig)
    with pytest.raises(ConfigError, match="config key 'loss.kind' belongs to pre-training"):
        load_config("demo", ["loss.kind=l1"], FinetuneConfig)  # an override is never left out


def test_an_odd_batch_with_mixup_is_refused():
    """timm's batch mixup pairs images: an odd per-process batch would silently train without
    mixup / cutmix, so it is one line naming data.batch_size; with both off it is fine."""
    from simmim.trainer.finetune_options import FinetuneConfig

    with pytest.raises(ConfigError, match="data.batch_size 15 must be even"):
        load_config("finetune_demo", ["data.batch_size=15"], schema=FinetuneConfig)
    cfg = load_config("finetune_demo", ["data.batch_size=15", "finetune.mixup=0", "finetune.cutmix=0"],
                      schema=FinetuneConfig)
    assert cfg.data.batch_size == 15
    assert load_config("demo", ["data.batch_size=15"]).data.batch_size == 15  # pre-training has no mixup
