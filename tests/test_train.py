import json
import os
import subprocess
import sys

import pytest
import torch

from simmim.trainer.checkpoint import checkpoints
from simmim.trainer.checkpoint_reader import read_checkpoint
from simmim.trainer.config import load_config
from simmim.trainer.model import build_simmim
from simmim.trainer.pretrain import pretrain
from simmim.trainer.schedule import LRSchedule

TINY = ["data.val_path=", "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "model.arch=swin_micro",
        "model.window_size=2", "run.progress=false"]


def tiny_overrides(sample_root, out_dir, *extra):
    return [f"data.path={sample_root / 'train'}", f"run.out_dir={out_dir}", *TINY, *extra]


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_lr_schedule():
    s = LRSchedule(lr=1.0, warmup_lr=0.0, min_lr=0.1, warmup_steps=10, total_steps=110, anchor="warmup_end")
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1)
    st = LRSchedule(lr=1.0, warmup_lr=0.0, min_lr=0.0, warmup_steps=2, total_steps=100, kind="step",
                    milestones=(50, 80), gamma=0.1)
    assert st(49) == 1.0 and st(50) == pytest.approx(0.1) and st(99) == pytest.approx(0.01)


def test_short_run_loss_falls_and_writes_outputs(sample_root, tmp_path):
    out = tmp_path / "run"
    cfg = load_config("demo", tiny_overrides(sample_root, out, "train.epochs=8", "train.warmup_epochs=1",
                                             "optim.base_lr=3.2e-2",
                                             "run.log_every=2", "run.save_every=3", "run.vis_every=3"))
    summary = pretrain(cfg)
    epoch_losses = [e["loss"] for e in summary["epochs"]]
    assert len(epoch_losses) == 8
    assert sum(epoch_losses[-2:]) / 2 < 0.9 * epoch_losses[0], epoch_losses
    for name in ("config.yaml", "metrics.jsonl", "log.txt", "reconstruction.png", "reconstruction-0002.png",
                 "checkpoint-00000021.pt", "checkpoint-00000056.pt"):
        assert (out / name).exists(), name
    state = read_checkpoint(checkpoints(out)[-1][1])  # weights_only=True
    train_state = state.train["train_state"]
    assert train_state["epoch"] == 7 and train_state["step_in_epoch"] == 7
    fresh = build_simmim("swin_micro", 64, 32, window_size=2)
    fresh.load_state_dict(state.model)  # strict: every weight, mask token and head included
    trained = fresh.encoder.mask_token.detach()
    assert not torch.equal(trained, build_simmim("swin_micro", 64, 32, window_size=2).encoder.mask_token.detach())
    adam = state.optimizer["state"]
    assert len(adam) == sum(1 for _ in fresh.parameters()) and {int(s["step"]) for s in adam.values()} == {56}
    assert load_config(str(out / "config.yaml")) == cfg
    # a pre-training run carries no finetune section, in its config.yaml or its checkpoints
    import yaml

    sections = {"data", "model", "optim", "train", "run", "loss"}
    assert set(yaml.safe_load((out / "config.yaml").read_text())) == set(state.config) == sections
    log = (out / "log.txt").read_text()
    assert "effective" in log and "img/s" in log and "grad_norm" in log


def test_accumulation_matches_larger_batch(sample_root, tmp_path):
    """2 micro-batches of 4 with accumulation are the same training as one batch of 8 over a whole
    run (1 epoch, 7 steps): same images and masks per step (masks are drawn per optimizer step's
    global batch), so per-step losses, gradient norms and final weights agree to fp32 reduction
    order (measured: losses 1.3e-7 relative, grad norms 8.8e-7, weights 1.2e-7 absolute; the gap
    grows with steps as AdamW amplifies it). Without the division by accum_steps the gradient norms
    double (and weights move 1.3e-4); with masks drawn per micro-batch (before) losses differed by
    4.9%, grad norms by 11%, weights by 1.2e-3."""
    common = ("train.epochs=1", "run.log_every=1", "run.vis_every=100", "train.warmup_epochs=1")
    pretrain(load_config("demo", tiny_overrides(sample_root, tmp_path / "a", *common)))
    pretrain(load_config("demo", tiny_overrides(sample_root, tmp_path / "b", *common, "data.batch_size=4",
                                                "train.accum_steps=2")))
    ra, rb = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(7))
    torch.testing.assert_close([r["loss"] for r in rb], [r["loss"] for r in ra], rtol=1e-6, atol=0)
    torch.testing.assert_close([r["grad_norm"] for r in rb], [r["grad_norm"] for r in ra], rtol=1e-4, atol=0)
    wa = read_checkpoint(checkpoints(tmp_path / "a")[-1][1]).model
    wb = read_checkpoint(checkpoints(tmp_path / "b")[-1][1]).model
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)


def run_cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "simmim.trainer.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_cli_error_is_one_line_and_exit_2(tmp_path, sample_root):
    """The whole process: a user mistake found while building (a missing data folder) ends with
    one line on stderr, exit status 2, no traceback."""
    proc = run_cli(["pretrain", "--config", "demo", "data.val_path=", f"run.out_dir={tmp_path}",
                    "data.path=/no/such/folder"])
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1].startswith("simmim pretrain: error:") and "data.path '/no/such/folder' does not exist" in lines[-1]
    assert "Traceback" not in out


@pytest.mark.parametrize("args,message", [
    (["train.epochz=3"], "unknown config key 'train.epochz'"),
    (["optim.base_lr=fast"], "config key 'optim.base_lr' expects float"),
    (["model.arch=resnet"], "config key 'model.arch' must be one of"),
    (["data.batch_size=0"], "config key 'data.batch_size' must be > 0, got 0"),  # was a ZeroDivisionError
    (["train.accum_steps=0"], "config key 'train.accum_steps' must be > 0, got 0"),  # was a ZeroDivisionError
    (["optim.base_lr=0"], "config key 'optim.base_lr' must be > 0, got 0.0"),  # trained at lr 0
])
def test_cli_config_errors_are_one_line(args, message, tmp_path, capsys):
    """Config mistakes stop the command at load, before anything is built (in process: no set-up cost)."""
    from simmim.trainer import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--config", "demo", f"run.out_dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("simmim pretrain: error:") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_cli_keeps_tracebacks_of_bugs(monkeypatch, capsys):
    """Only a UserError becomes one line; a ValueError from a bug propagates with its traceback."""
    from simmim.core.errors import DatasetError
    from simmim.trainer import cli

    def user_mistake(args):
        raise DatasetError("data path '/x' does not exist")

    def bug(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(cli, "cmd_sample_data", user_mistake)
    with pytest.raises(SystemExit) as e:
        cli.main(["sample-data"])
    assert e.value.code == 2 and capsys.readouterr().err == "simmim sample-data: error: data path '/x' does not exist\n"
    monkeypatch.setattr(cli, "cmd_sample_data", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["sample-data"])


@pytest.mark.slow
def test_compiled_training_matches_eager(sample_root, tmp_path):
    """train.compile=true (inductor on CPU) trains a tiny model to the same losses as eager."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        pretrain(load_config("demo", tiny_overrides(sample_root, out, "train.epochs=1", "run.log_every=1",
                                                    "model.arch=vit_micro", f"train.compile={str(compiled).lower()}")))
        runs[compiled] = losses(out)
    assert [s for s, _ in runs[True]] == [s for s, _ in runs[False]] and len(runs[True]) >= 3
    torch.testing.assert_close([v for _, v in runs[True]], [v for _, v in runs[False]], rtol=1e-3, atol=1e-4)


def noise_pngs(folder, n: int):
    """n 48 x 40 RGB PNGs of noise in a new flat folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_an_in_process_run_leaves_no_handler_on_a_closed_stream(tmp_path, capsys):
    """A run inside a process that goes on (a test, a notebook) logs to stdout and its log.txt. Its
    caller may swap sys.stdout for the run and close that stream afterwards, as pytest does with each
    test's captured output: no handler of the root or project loggers may still write to it (the next
    test's log lines failed with "I/O operation on closed file"), and log.txt is closed and detached."""
    import contextlib
    import io
    import logging

    from simmim.trainer.cli import main

    folder = noise_pngs(tmp_path / "images", 8)
    out, stdout = tmp_path / "run", io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["pretrain", "--config", "demo", f"data.path={folder}", f"run.out_dir={out}", *TINY, "data.batch_size=4",
              "train.epochs=1", "train.warmup_epochs=0", "train.device=cpu", "run.knn_every=0"])
    stdout.close()
    assert "data torch:" in (out / "log.txt").read_text()
    loggers = [logging.getLogger()] + [logger for name, logger in logging.Logger.manager.loggerDict.items()
                                       if name.startswith("simmim") and isinstance(logger, logging.Logger)]
    handlers = [h for logger in loggers for h in logger.handlers]
    assert not [h for h in handlers if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False)]
    assert not [h for h in handlers if isinstance(h, logging.FileHandler)]
    logging.getLogger("simmim.pipeline.convert").info("logged after the run")
    captured = capsys.readouterr()
    assert "Logging error" not in captured.err and "logged after the run" in captured.out
    assert "logged after the run" not in (out / "log.txt").read_text()


def test_an_in_process_command_leaves_no_handler_on_a_closed_stream(tmp_path, capsys, monkeypatch):
    """The same for a command that sets up its own console logging (`simmim scan`, in a process
    with no logging set up yet) while sys.stderr is a stream its caller closes afterwards."""
    import contextlib
    import io
    import logging

    from simmim.trainer.cli import main

    folder = noise_pngs(tmp_path / "images", 2)
    (folder / "empty.png").write_bytes(b"")  # logged as skipped
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh process
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        main(["scan", str(folder), "--workers", "1"])
    assert "skipping" in stderr.getvalue() and "empty.png" in stderr.getvalue()
    stderr.close()
    logging.getLogger("simmim.pipeline.folder").warning("logged after the command")
    err = capsys.readouterr().err
    assert "Logging error" not in err and "logged after the command" in err


def test_the_s3_libraries_info_lines_stay_out_of_a_runs_log(tmp_path):
    """boto3's "Found credentials in environment variables." (INFO, logged by the stream backend's
    client and the mirror's alike) reaches neither the console nor log.txt; its warnings do."""
    import logging

    from simmim.trainer.runlog import close_run_log, setup_logging
    for name in ("boto3", "botocore", "s3transfer"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # as a fresh process has them
    setup_logging(tmp_path, is_main=True)
    try:
        logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
        logging.getLogger("botocore.credentials").warning("a botocore warning")
    finally:
        close_run_log()
    text = (tmp_path / "log.txt").read_text()
    assert "Found credentials" not in text and "a botocore warning" in text


def test_rerunning_a_finished_run_says_so(tmp_path):
    """The same command again on a finished run folder trains nothing and says so in one line
    naming its step, its checkpoint and the options that would go on (not the lr line last)."""
    from simmim.trainer.cli import main

    folder = noise_pngs(tmp_path / "images", 8)
    out = tmp_path / "run"
    args = ["pretrain", "--config", "demo", f"data.path={folder}", f"run.out_dir={out}", *TINY, "data.batch_size=4",
            "train.epochs=1", "train.warmup_epochs=0", "train.device=cpu", "run.knn_every=0"]
    main(args)
    main(args)
    last = (out / "log.txt").read_text().strip().splitlines()[-1]
    assert "run already finished at step 2 (" in last and "checkpoint-00000002" in last, last
    assert "raise train.epochs to continue or use a new run.out_dir" in last
