import csv
import os
import shutil
import signal
import subprocess

import pytest

from simmim.core.errors import ConfigError
from simmim.trainer.sweep import expand, finished, format_markdown, parse_grid, variant_name

TINY = ["data.val_path=", "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "model.arch=swin_micro",
        "model.window_size=2", "run.progress=false", "train.epochs=1", "train.warmup_epochs=0", "run.vis_every=100"]


def test_grid_expands_to_every_combination_in_order():
    grid = parse_grid(["data.mask_strategy=random,block", "data.mask_ratio=0.4, 0.6"])
    assert grid == {"data.mask_strategy": ["random", "block"], "data.mask_ratio": ["0.4", "0.6"]}
    variants = expand(grid)
    assert [v.overrides() for v in variants] == [
        ["data.mask_strategy=random", "data.mask_ratio=0.4"], ["data.mask_strategy=random", "data.mask_ratio=0.6"],
        ["data.mask_strategy=block", "data.mask_ratio=0.4"], ["data.mask_strategy=block", "data.mask_ratio=0.6"]]
    assert variants[2].name == "mask_strategy-block_mask_ratio-0.4"
    # clashing last parts keep the whole key; odd characters become '_'
    assert variant_name((("data.path", "a/b c"), ("model.path", "x"))) == "data.path-a_b_c_model.path-x"


@pytest.mark.parametrize("specs,match", [
    ([], "at least one --grid"), (["data.mask_ratio"], "must be KEY=V1,V2"), (["data.mask_ratio=0.4,"], "must be"),
    (["=1,2"], "must be"), (["a=1", "a=2"], "names 'a' twice"), (["a=1,1"], "repeats a value")])
def test_bad_grid_is_a_config_error(specs, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(specs)


def test_table_has_a_row_per_variant_and_a_matrix_for_two_keys():
    grid = {"data.mask_ratio": ["0.4", "0.6"], "data.mask_patch_size": ["16", "32"]}
    rows = [["0.4", "16", 0.9, None, None, None], ["0.4", "32", 0.8, None, None, None],
            ["0.6", "16", 0.7, None, None, None], ["0.6", "32", 0.6, None, None, None]]
    header = list(grid) + ["train loss", "val loss", "fine-tune top-1", "best top-1"]
    md = format_markdown(header, rows, grid, "note")
    assert "| data.mask_ratio | data.mask_patch_size | train loss |" in md and "val loss" not in md  # empty: left out
    assert "| 0.6 | 0.7000 | 0.6000 |" in md  # the matrix row of ratio 0.6


def test_bad_variant_value_stops_before_any_run(tmp_path, sample_root):
    from simmim.trainer.sweep import SweepSpec, sweep

    spec = SweepSpec("demo", parse_grid(["data.mask_strategy=random,central"]), tmp_path / "sw",
                     (f"data.path={sample_root / 'train'}", *TINY))
    with pytest.raises(ConfigError, match="variant mask_strategy-central: config key 'data.mask_strategy' must be"):
        sweep(spec)
    assert not (tmp_path / "sw").exists()


def test_refused_under_torchrun(tmp_path, monkeypatch):
    from simmim.trainer.sweep import SweepSpec, sweep

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="trainer/run.sh job"):
        sweep(SweepSpec("demo", parse_grid(["data.mask_ratio=0.4,0.6"]), tmp_path))


def test_finished_needs_the_last_epoch_and_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not finished(run, 1)
    (run / "metrics.jsonl").write_text('{"epoch": 0, "step": 3, "epoch_loss": 0.5}\n')
    assert not finished(run, 1)  # killed between the record and the checkpoint
    (run / "checkpoint-00000004.pt").write_bytes(b"")
    assert finished(run, 1) and not finished(run, 2)


def thirty_two_images(sample_root, dst):
    """The sample set's first 32 training images, in their class folders."""
    files = sorted(p for p in (sample_root / "train").rglob("*") if p.is_file())[:32]
    for f in files:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / f.parent.name / f.name)
    return dst


@pytest.mark.slow
def test_two_by_two_sweep_resumes_after_a_kill(sample_root, tmp_path, simmim_cmd):
    from helpers import run_until

    data = thirty_two_images(sample_root, tmp_path / "data")
    out = tmp_path / "sweep"
    cmd = [*simmim_cmd, "sweep", "--config", "demo", "--grid", "data.mask_strategy=random,block",
           "--grid", "data.mask_ratio=0.4,0.6", "--out", str(out), f"data.path={data}", *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    run_until(proc, "sweep [2/4]", lambda: os.killpg(proc.pid, signal.SIGKILL), timeout=300)
    assert proc.returncode == -signal.SIGKILL
    first = out / "mask_strategy-random_mask_ratio-0.4" / "pretrain"
    assert finished(first, 1) and (out / "results.csv").exists()  # the table follows each variant
    before = (first / "metrics.jsonl").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep [1/4] mask_strategy-random_mask_ratio-0.4: pretrain finished, skipped" in again.stdout
    assert (first / "metrics.jsonl").read_text() == before
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert len(rows) == 4 and all(float(r["train loss"]) > 0 for r in rows)
    assert [(r["data.mask_strategy"], r["data.mask_ratio"]) for r in rows] == [
        ("random", "0.4"), ("random", "0.6"), ("block", "0.4"), ("block", "0.6")]
    assert (out / "results.png").stat().st_size > 0 and "| block | 0.6 |" in (out / "results.md").read_text()
    assert "4 variants done" in again.stdout


@pytest.mark.slow
def test_sweep_with_finetuning_fills_the_top1_column(sample_root, tmp_path):
    from simmim.trainer.sweep import SweepSpec, sweep

    ft = (f"data.path={sample_root / 'train'}", f"finetune.val_path={sample_root / 'val'}", "train.epochs=1",
          "train.warmup_epochs=0", "data.img_size=64", "data.batch_size=8", "data.num_workers=0",
          "run.progress=false", "model.window_size=2")  # model.arch: the pre-training's (swin_micro)
    spec = SweepSpec("demo", parse_grid(["data.mask_ratio=0.5"]), tmp_path / "sw",
                     (f"data.path={sample_root / 'train'}", *TINY), "finetune_demo", ft)
    sweep(spec)
    row = next(csv.DictReader((tmp_path / "sw" / "results.csv").read_text().splitlines()))
    assert 0 <= float(row["fine-tune top-1"]) <= 100 and row["val loss"] == ""  # no data.val_path: no figure
    assert finished(tmp_path / "sw" / "mask_ratio-0.5" / "finetune", 1, key="top1")
    assert "fine-tune top-1" in (tmp_path / "sw" / "results.md").read_text()


def test_jobs_and_table_for_variants_run_elsewhere(tmp_path, sample_root):
    """--jobs lists one trainer/run.sh argument line per variant; --table gathers what their run
    folders hold (here written by hand), running nothing."""
    import shlex

    from simmim.trainer.sweep import SweepSpec, sweep

    out = tmp_path / "sw"
    spec = SweepSpec("demo", parse_grid(["data.mask_ratio=0.4,0.6"]), out, (f"data.path={sample_root / 'train'}",))
    lines = sweep(spec, jobs_only=True).read_text().splitlines()
    assert len(lines) == 2 and shlex.split(lines[1])[:2] == ["--config", "demo"]
    assert f"run.out_dir={out / 'mask_ratio-0.6' / 'pretrain'}" in shlex.split(lines[1])
    assert not any(arg.startswith("run.mirror") for arg in shlex.split(lines[1]))
    # a mirror given to the sweep: one prefix per run under it, as one run folder each
    mirrored = SweepSpec("demo", spec.grid, out, (*spec.overrides, "run.mirror=s3://bucket/sweep/"))
    lines = [shlex.split(line) for line in sweep(mirrored, jobs_only=True).read_text().splitlines()]
    assert [line[-1] for line in lines] == ["run.mirror=s3://bucket/sweep/mask_ratio-0.4/pretrain",
                                            "run.mirror=s3://bucket/sweep/mask_ratio-0.6/pretrain"]
    run = out / "mask_ratio-0.6" / "pretrain"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 0, "step": 9, "epoch_loss": 0.25, "val_loss": 0.5}\n')
    sweep(spec, table_only=True)
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [(r["data.mask_ratio"], r["train loss"], r["val loss"]) for r in rows] == [
        ("0.4", "", ""), ("0.6", "0.25", "0.5")]
    assert not (out / "mask_ratio-0.4").exists()  # nothing ran


def test_a_diverged_variant_leaves_a_gap_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    from simmim.trainer import sweep as sweep_module
    from simmim.trainer.loop import Diverged

    ran = []

    def fake_run(spec, v, pre, ft, say):
        ran.append(v.name)
        if v.name == "mask_ratio-0.4":
            raise Diverged("loss not finite")

    monkeypatch.setattr(sweep_module, "run_variant", fake_run)
    spec = sweep_module.SweepSpec("demo", parse_grid(["data.mask_ratio=0.4,0.6"]), tmp_path / "sw")
    with pytest.raises(Diverged, match=r"1 variant\(s\) diverged \(mask_ratio-0.4\)"):
        sweep_module.sweep(spec)
    assert ran == ["mask_ratio-0.4", "mask_ratio-0.6"] and (tmp_path / "sw" / "results.csv").exists()
    assert "mask_ratio-0.4: diverged, going on" in capsys.readouterr().out
