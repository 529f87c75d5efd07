import pytest
import yaml

from simmim.trainer.config import RECIPES, Config, ConfigError, load_config, save_config


def test_defaults_are_paper_recipe():
    c = Config()
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
