"""The run folder stays consistent (issue 15, section 3, and the resume cases of section 2): a
resume with another config refuses before writing, unreadable checkpoints are stepped over, a
mid-epoch resume reports the whole epoch's loss, time-based checkpoints, a data file failing
mid-run, one job per folder, torch.distributed.launch's --local-rank, command-fit messages."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simmim.core.errors import CheckpointError, ConfigError, DatasetError, UserError
from simmim.trainer import loop, runlog
from simmim.trainer import pretrain as pretrain_mod
from simmim.trainer.checkpoint import checkpoints
from simmim.trainer.checkpoint_reader import read_checkpoint
from simmim.trainer.config import PretrainConfig, load_config
from simmim.trainer.finetune_options import FinetuneConfig
from simmim.trainer.pretrain import pretrain
from simmim.trainer.runfolder import RunFolderBusy, RunLock

TINY = ["data.val_path=", "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "model.arch=swin_micro",
        "model.window_size=2", "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1",
        "run.log_every=1"]


def cfg_for(sample_root, out, *extra):
    return load_config("demo", [f"data.path={sample_root / 'train'}", f"run.out_dir={out}", *TINY, *extra])


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_losses(out):
    return [(r["step"], r["loss"]) for r in records(out) if "loss" in r]


def epoch_losses(out):
    return [(r["epoch"], r["epoch_loss"]) for r in records(out) if "epoch_loss" in r]


@pytest.fixture(scope="module")
def base_run(sample_root, tmp_path_factory):
    """Two uninterrupted epochs (7 steps each), a checkpoint after each."""
    out = tmp_path_factory.mktemp("base") / "run"
    pretrain(cfg_for(sample_root, out, "train.epochs=2", "run.save_every=1"))
    assert [s for s, _ in checkpoints(out)] == [7, 14]
    return out


def copy_run(base, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


def test_resume_with_another_arch_refuses_before_writing(sample_root, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    files = lambda: {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()
    with pytest.raises(ConfigError) as e:
        pretrain(cfg_for(sample_root, out, "train.epochs=3", "model.arch=swin_tiny", "data.mask_ratio=0.5"))
    msg = str(e.value)
    assert "\n" not in msg and "model.arch 'swin_micro' -> 'swin_tiny'" in msg and "data.mask_ratio" in msg
    assert "train.epochs" in msg.split("only ")[1]  # it says what may change, and epochs may
    assert files() == before  # config.yaml, log, metrics, checkpoints untouched (the lock file aside)
    # keys that leave the run the same run may change: a longer run, another log interval
    pretrain(cfg_for(sample_root, out, "train.epochs=3", "run.log_every=3", "run.save_every=1"))
    assert "resuming with changed train.epochs, run.log_every" in (out / "log.txt").read_text()
    assert [s for s, _ in checkpoints(out)][-1] == 21


def test_unreadable_newest_checkpoint_resumes_from_an_older_one(sample_root, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    newest = out / "checkpoint-00000014.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk or a kill mid-copy
    summary = pretrain(cfg_for(sample_root, out, "train.epochs=2", "run.save_every=1"))
    text = (out / "log.txt").read_text()
    assert "checkpoint-00000014.pt' cannot be read" in text and "kept as checkpoint-00000014.pt.corrupt" in text
    assert "resumed from" in text and "epoch 1, step 0 of 7" in text
    assert (out / "checkpoint-00000014.pt.corrupt").stat().st_size == 1000
    assert [e["epoch"] for e in summary["epochs"]] == [1]
    torch.testing.assert_close(step_losses(out), step_losses(base_run), rtol=1e-5, atol=1e-6)
    # none readable: refused in one line, nothing renamed (the files are the user's to judge)
    for _, p in checkpoints(out):
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be read .* move them away") as e:
        pretrain(cfg_for(sample_root, out, "train.epochs=2"))
    assert "delete" not in str(e.value) and len(checkpoints(out)) == 2


class FailingLoader:
    """The real loader, but the `fail_at`-th batch of the first epoch iterated raises the
    DatasetError a loader raises for a file it cannot read."""

    def __init__(self, loader, fail_at: int):
        self.loader, self.fail_at, self.armed = loader, fail_at, True

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.armed and i == self.fail_at:
                self.armed = False
                raise DatasetError("cannot decode '/data/train/n01/gone.JPEG' (FileNotFoundError)")
            yield batch


def test_data_file_failing_mid_run_saves_and_names_it(sample_root, base_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    build = pretrain_mod.PretrainTask.build
    monkeypatch.setattr(pretrain_mod.PretrainTask, "build",
                        lambda self, dist: (lambda m, ld: (m, FailingLoader(ld, 5)))(*build(self, dist)))
    cfg = cfg_for(sample_root, out, "train.epochs=2", "run.save_every=1")
    with pytest.raises(DatasetError) as e:
        pretrain(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "gone.JPEG" in msg and f"simmim scan {sample_root / 'train'}" in msg
    assert "checkpoint-00000005.pt" in msg  # steps 0-4 done, the failed step 5 not taken
    state = read_checkpoint(out / "checkpoint-00000005.pt").train["train_state"]
    assert (state["epoch"], state["step_in_epoch"], state["epoch_good_steps"]) == (0, 5, 5)
    monkeypatch.undo()
    pretrain(cfg)  # the list fixed, the same command resumes and nothing is lost
    torch.testing.assert_close(step_losses(out), step_losses(base_run), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(epoch_losses(out), epoch_losses(base_run), rtol=1e-5, atol=1e-6)


def test_time_based_checkpoints_carry_the_epoch_so_far(sample_root, base_run, tmp_path, monkeypatch):
    """Checkpoints at every stop check (save_every_minutes tiny), then a kill at step 4 with no
    chance to save: the newest checkpoint is step 4's, holding the loss sum of steps 0-3."""
    from simmim.trainer import model as model_mod

    out = tmp_path / "run"
    forward, calls = model_mod.SimMIM.forward, {"n": 0}

    def killed(self, *a, **kw):
        calls["n"] += self.training
        if calls["n"] == 5:
            raise KeyboardInterrupt  # no signal handler, no checkpoint on the way out: like SIGKILL
        return forward(self, *a, **kw)

    monkeypatch.setattr(model_mod.SimMIM, "forward", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg_for(sample_root, out, "train.epochs=2", "run.save_every=1", "run.save_every_minutes=1e-9",
                         "run.keep_last=2"))
    assert [s for s, _ in checkpoints(out)] == [3, 4]  # the newest two of one per step
    state = read_checkpoint(out / "checkpoint-00000004.pt").train["train_state"]
    assert (state["epoch"], state["step_in_epoch"], state["epoch_good_steps"]) == (0, 4, 4)
    assert state["epoch_loss_sum"] == pytest.approx(sum(v for _, v in step_losses(base_run)[:4]), rel=1e-5)


HOLD = "import sys, time; from simmim.trainer.runfolder import RunLock; l = RunLock(sys.argv[1], sys.argv[2]); " \
       "print('locked', flush=True); time.sleep(120)"


def test_one_job_per_run_folder(sample_root, tmp_path, capsys):
    from simmim.trainer.cli import main

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "job-a"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "--config", "demo", f"data.path={sample_root / 'train'}", f"run.out_dir={out}", *TINY])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0], err
        assert "is in use by another job" in err[0] and "another run.out_dir" in err[0]
        assert not (out / "config.yaml").exists()
        t = time.monotonic()
        with pytest.raises(RunFolderBusy):  # a restart of the same job waits for the old rank 0, then gives up
            RunLock(out, "job-a", wait_s=1.0)
        assert time.monotonic() - t >= 1.0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(out, "job-b", wait_s=0):  # a killed holder leaves nothing stuck
        pass


@pytest.mark.slow  # a launcher and a worker process, each importing torch
def test_torch_distributed_launch_local_rank_is_accepted(tmp_path):
    """torch.distributed.launch adds --local-rank=N to the command: accepted, ignored, with a note."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.launch", "--nproc-per-node=1",
                           "--master-port=0", "-m", "simmim.trainer.cli", "pretrain", "--config", "demo",
                           "data.path=/no/such/folder", f"run.out_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert "unrecognized arguments" not in text
    assert "--local-rank ignored" in text and "torchrun or trainer/run.sh" in text
    assert "data.path '/no/such/folder' does not exist" in text  # it got as far as the data


def test_drop_local_rank():
    from simmim.trainer.cli import drop_local_rank

    assert drop_local_rank(["--local-rank=3", "pretrain", "a=1"]) == ["pretrain", "a=1"]
    assert drop_local_rank(["--local_rank", "0", "pretrain"]) == ["pretrain"]
    assert drop_local_rank(["pretrain", "a=1"]) == ["pretrain", "a=1"]


def test_checkpoint_messages_fit_the_command(tmp_path):
    from simmim.trainer.finetune import evaluate_checkpoint

    bad = tmp_path / "checkpoint-00000007.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError) as e:
        evaluate_checkpoint(str(bad))
    msg = str(e.value)
    assert "\n" not in msg and "cannot be read" in msg and "evaluate another checkpoint" in msg
    assert "delete" not in msg and "resume" not in msg


def test_worker_error_message_is_one_line():
    e = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                     "last):\n  File \"x.py\", line 1, in f\nsimmim.core.errors.DatasetError: cannot decode 'a.JPEG'")
    assert runlog.one_line(e) == "cannot decode 'a.JPEG'"
    assert runlog.one_line(DatasetError("cannot decode 'b.JPEG'")) == "cannot decode 'b.JPEG'"


def test_dali_file_deleted_after_the_scan_saves_and_resumes(sample_root, tmp_path, monkeypatch):
    """The real case: DALI reads a scanned list, files deleted during the run (after the loader's
    check of the list before the first epoch, which finds files deleted earlier, and after the
    figure preview, read before training); the run ends with a
    checkpoint and one line naming a file and `simmim scan`; after the scan the same command resumes."""
    pytest.importorskip("nvidia.dali")
    from simmim.pipeline.dali_loader import DALILoader
    from simmim.pipeline.scanlist import scan_command

    train = tmp_path / "train"
    shutil.copytree(sample_root / "train", train)
    scan_command(str(train), None, 1, "skip")
    listed = tmp_path / "train.clean.txt"
    gone = sorted(train.rglob("*.JPEG"))[::12]  # 5 of 60: more than the 4 an epoch leaves out
    preview = DALILoader.preview_batch

    def then_delete(*args, **kwargs):
        result = preview(*args, **kwargs)
        for p in gone:
            p.unlink(missing_ok=True)
        return result

    monkeypatch.setattr(DALILoader, "preview_batch", then_delete)
    out = tmp_path / "run"
    cfg = cfg_for(sample_root, out, "data.backend=dali", f"data.path={listed}", "train.epochs=1")
    with pytest.raises(DatasetError) as e:
        pretrain(cfg)
    msg = str(e.value)
    assert "\n" not in msg and any(f"cannot decode '{p}'" in msg for p in gone) and f"simmim scan {train}" in msg
    assert "saved in" in msg and "run the same command again to resume" in msg
    (ckpt,) = [p for _, p in checkpoints(out)]
    assert str(ckpt) in msg
    scan_command(str(train), None, 1, "skip")  # the fix the message names
    summary = pretrain(cfg)
    assert [e["epoch"] for e in summary["epochs"]] == [0] and "resumed from" in (out / "log.txt").read_text()


def test_checkpoint_on_a_full_disk_is_one_line(tmp_path):
    """A write that fails (here the file-size limit, as a full disk or a quota would) leaves the
    older checkpoints and no partial file, and says so in one line."""
    import resource

    from simmim.trainer.checkpoint import save_checkpoint

    state = {"model": {"w": torch.zeros(1 << 20)}}  # 4 MiB
    save_checkpoint(tmp_path, 1, {"model": {}})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        with pytest.raises(CheckpointError) as e:
            save_checkpoint(tmp_path, 2, state)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    msg = str(e.value)
    assert "\n" not in msg and "cannot write checkpoint" in msg and "checkpoints before it are intact" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001.pt"]


def test_metrics_log_drops_a_torn_line(tmp_path):
    """A process killed while writing metrics.jsonl leaves half a line; the resumed run drops it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    log = runlog.MetricsLog(path, keep_before_step=2)
    log({"step": 2, "loss": 0.8})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize("command, key, error", [
    ("pretrain", "data.path", DatasetError), ("pretrain", "data.val_path", DatasetError),
    ("finetune", "data.path", DatasetError), ("finetune", "finetune.val_path", DatasetError),
    ("finetune", "finetune.pretrained", CheckpointError)])
def test_missing_input_refused_before_anything_is_written(sample_root, tmp_path, command, key, error):
    """Every path a run reads is checked before the run folder (and its lock) is made."""
    from simmim.trainer.finetune import finetune

    out = tmp_path / "run"
    recipe, fn, schema = (("demo", pretrain, PretrainConfig) if command == "pretrain" else
                          ("finetune_demo", finetune, FinetuneConfig))
    cfg = load_config(recipe, [f"data.path={sample_root / 'train'}", f"run.out_dir={out}", *TINY,
                               f"{key}={tmp_path / 'no' / 'such'}", "run.val_every=1"], schema)
    with pytest.raises(error, match=rf"^{key}:? '.*no/such' does not exist"):
        fn(cfg)
    assert not out.exists()
