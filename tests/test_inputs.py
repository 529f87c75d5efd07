"""A new user's mistakes (a reviewer's round on main): every input is checked before the run
folder is written, errors name the key that holds the bad value, and the config reads strictly.
Each test builds its own input."""
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from simmim.core.errors import CheckpointError, ConfigError, DatasetError, UserError
from simmim.pipeline.loaders import available
from simmim.pipeline.rand_augment import parse_rand_augment
from simmim.trainer.config import PretrainConfig, load_config
from simmim.trainer.finetune import FinetuneTask, finetune
from simmim.trainer.finetune_options import FinetuneConfig
from simmim.trainer.loop import check_inputs
from simmim.trainer.pretrain import PretrainTask, pretrain
from simmim.trainer.runfolder import RunFolderBusy, RunLock, check_resume_config

TINY = ["data.img_size=64", "data.batch_size=8", "data.num_workers=0", "model.arch=swin_micro", "model.window_size=2",
        "run.progress=false", "run.vis_every=100", "train.warmup_epochs=0", "train.epochs=1", "train.device=cpu"]


def pretrain_cfg(sample_root, out, *extra):
    return load_config("demo", [f"data.path={sample_root / 'train'}", f"data.val_path={sample_root / 'val'}",
                                f"run.out_dir={out}", *TINY, *extra])


def finetune_cfg(sample_root, out, *extra):
    return load_config("finetune_demo", [f"data.path={sample_root / 'train'}", f"finetune.val_path={sample_root / 'val'}",
                                         f"run.out_dir={out}", *TINY, *extra], FinetuneConfig)


def test_empty_data_path_is_refused_and_other_paths_may_be_empty(sample_root, tmp_path):
    """`data.path=` used to train on the current directory."""
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"^data.path is empty: set it to the training images"):
        pretrain(pretrain_cfg(sample_root, out, "data.path="))
    with pytest.raises(DatasetError, match=r"^data.path is empty"):
        finetune(finetune_cfg(sample_root, out, "data.path="))
    assert not out.exists()
    # empty is "not used" for the others
    cfg = pretrain_cfg(sample_root, out, "data.val_path=")
    check_inputs(cfg, PretrainTask(cfg))
    cfg = finetune_cfg(sample_root, out, "finetune.val_path=", "finetune.pretrained=")
    check_inputs(cfg, FinetuneTask(cfg))


def _bad_inputs(root: Path, tmp: Path) -> dict:
    """name -> (command, overrides, error, message pattern): inputs that exist but cannot be used."""
    jpeg = next((root / "train").rglob("*.JPEG"))
    (tmp / "empty").mkdir()
    (tmp / "bad.txt").write_text(f"{jpeg} 0\nthis line is bad\n")
    (tmp / "val.beton").write_bytes(b"not really")
    (tmp / "config.yaml").write_text("model:\n  arch: swin_mini\n")
    torch.save({"model": {}, "config": {"model": {"arch": "swin_mini"}}}, tmp / "mini.pt")
    return {
        "empty folder": ("pretrain", [f"data.path={tmp / 'empty'}"], DatasetError, r"has no images and no class folders"),
        "bad list line": ("pretrain", [f"data.path={tmp / 'bad.txt'}"], DatasetError, r"bad.txt:2: expected"),
        "a JPEG as data.path": ("pretrain", [f"data.path={jpeg}"], DatasetError, r"is a binary file"),
        "beton val_path, torch": ("pretrain", [f"data.val_path={tmp / 'val.beton'}"], DatasetError,
                                  r"^data.val_path '.*val.beton' is an FFCV .beton: use data.backend=ffcv$"),
        "folder val_path, ffcv": ("pretrain", ["data.backend=ffcv", f"data.path={tmp / 'val.beton'}"], DatasetError,
                                  r"^data.backend ffcv reads a .beton file, got data.val_path '.*val'"),
        "folder finetune.val_path, ffcv": ("finetune", ["data.backend=ffcv", f"data.path={tmp / 'val.beton'}"],
                                           DatasetError, r"got finetune.val_path '.*val'"),
        "checkpoint of another arch": ("finetune", [f"finetune.pretrained={tmp / 'mini.pt'}"], CheckpointError,
                                       r"is a swin_mini checkpoint; model.arch is swin_micro$"),
        "a YAML file as checkpoint": ("finetune", [f"finetune.pretrained={tmp / 'config.yaml'}"], CheckpointError,
                                      r"is not a checkpoint \(not a zip or pickle file, as torch.save writes, nor "
                                      r"safetensors\): point finetune.pretrained at another checkpoint of the "
                                      r"pre-training run$"),
        "fewer images than one step": ("pretrain", ["train.accum_steps=1000"], UserError,
                                       r"batches per epoch do not fill one step of 1000 accumulation steps"),
    }


CASES = ["fewer images than one step", "empty folder", "bad list line", "a JPEG as data.path", "beton val_path, torch", "folder val_path, ffcv",
         "folder finetune.val_path, ffcv", "checkpoint of another arch", "a YAML file as checkpoint"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("folder", ["new", "existing"])
def test_an_unusable_input_leaves_the_run_folder_as_it_was(sample_root, tmp_path, case, folder):
    """These were found after the run folder, its lock, config.yaml and an empty log.txt were written."""
    command, overrides, error, pattern = _bad_inputs(sample_root, tmp_path)[case]
    if "ffcv" in overrides[0] and not available("ffcv"):
        pytest.skip("ffcv is not installed")
    out = tmp_path / "runs" / "x"
    if folder == "existing":
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
    cfg = (pretrain_cfg if command == "pretrain" else finetune_cfg)(sample_root, out, *overrides)
    with pytest.raises(error) as e:
        (pretrain if command == "pretrain" else finetune)(cfg)
    msg = str(e.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
    if folder == "new":
        assert not (tmp_path / "runs").exists()  # the lock's file and the folders it made are gone again
    else:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_provisional_lock_is_removed_on_refusal_and_never_lets_two_jobs_in(tmp_path):
    out = tmp_path / "a" / "b"
    with RunLock(out, "job"):
        assert (out / ".lock").exists()
    assert not (tmp_path / "a").exists()  # released before commit: lock file and made folders removed
    with RunLock(out, "job") as lock:
        lock.commit()
    assert (out / ".lock").exists()  # a committed run keeps it

    # a restart of the same job waits on the lock; the holder is refused and removes the file: the
    # waiter must lock the new file, so that a third job is refused, not let in beside it
    first = RunLock(out, "job")
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("lock", RunLock(out, "job", wait_s=30)))
    waiter.start()
    time.sleep(0.3)
    first.release()
    waiter.join()
    with pytest.raises(RunFolderBusy):
        RunLock(out, "other", wait_s=0)
    got["lock"].release()


def test_build_time_messages_reach_log_txt_and_one_epoch_reads_right(sample_root, tmp_path):
    out = tmp_path / "run"
    finetune(finetune_cfg(sample_root, out, "finetune.val_path=", "finetune.mixup=0", "finetune.cutmix=0"))
    text = (out / "log.txt").read_text()
    assert "no finetune.pretrained: training from scratch" in text  # logged by the build, before log.txt existed
    assert re.search(r"finished 1 epoch in [\d.]+ s", text)


@pytest.mark.parametrize("spec, n_m", [("rand-m9-mstd0.5-inc1", (2, 9)), ("rand", (2, 10)), ("rand-n3-m7", (3, 7)),
                                       ("rand-m9-mstd101-mmax10-p0.3-inc0", (2, 9))])
def test_rand_augment_spec_that_timm_reads(spec, n_m):
    from timm.data.auto_augment import rand_augment_transform

    s = parse_rand_augment(spec, "finetune.rand_augment")
    assert (s.num_ops, s.magnitude) == n_m
    rand_augment_transform(spec, {})  # timm agrees


@pytest.mark.parametrize("spec", ["rand-bogus", "rand-m9-mstd0.5-ic1", "rand-mX", "rand--m9", "rand-m9.5", "rand-w0",
                                  "randaug-m9", "rand-p2"])
def test_rand_augment_spec_is_parsed_strictly(spec):
    """These were accepted (and trained with the parts ignored) or ended in timm's assert traceback."""
    with pytest.raises(ConfigError, match=r"^finetune.rand_augment"):
        parse_rand_augment(spec, "finetune.rand_augment")
    with pytest.raises(ConfigError, match=r"^config key 'finetune.rand_augment' must be"):
        load_config("finetune_demo", [f"finetune.rand_augment={spec}"], FinetuneConfig)


def test_a_key_of_no_current_section_is_unknown(tmp_path):
    """Keys are only ever the schema's own (the project keeps no renamed keys): one line naming it."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text("data: {order: random}\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'data.order' \(known: data.backend, "):
        load_config(str(recipe))
    with pytest.raises(ConfigError, match=r"^unknown config key 'model.loss' \(known: model.arch, "):
        load_config(None, ["model.loss=l2"])


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  # path: x\ntrain:\n  epochs: 3\n")
    assert load_config(str(recipe)) == load_config(None, ["train.epochs=3"])
    recipe.write_text("data:\n  ffcv:\n  dali:\n")
    assert load_config(str(recipe)) == PretrainConfig()
    recipe.write_text("data:\n  path:\n")  # a value, not a section: still refused
    with pytest.raises(ConfigError, match="data.path"):
        load_config(str(recipe))


def test_resume_refusal_lists_only_this_configs_keys(tmp_path):
    for schema, task_key in ((PretrainConfig, "finetune."), (FinetuneConfig, "loss.")):
        old, new = schema().to_dict(), schema().to_dict()
        new["model"]["arch"] = "swin_tiny"
        with pytest.raises(ConfigError) as e:
            check_resume_config(old, new, tmp_path / "checkpoint-00000001.pt")
        allowed = str(e.value).split("only ")[1]
        assert "train.epochs" in allowed and task_key not in allowed
    assert "finetune.val_path" in allowed  # a fine-tuning run may change it


def test_ffcv_hint_points_at_convert(tmp_path):
    cfg = load_config(None, ["data.backend=ffcv", f"data.path={tmp_path / 'nope.beton'}", "train.device=cpu"])
    with pytest.raises(UserError, match=r"does not exist: write it from class folders or a list with "
                                        r"`simmim convert SRC .*nope.beton`$"):
        check_inputs(cfg, PretrainTask(cfg))
