"""Runs that survive the user's own world (issue 28): a run folder that cannot be written (before
or during the run), a resume onto a data set that changed, leftovers of a killed run, Ctrl-C.

A folder is made unwritable the way a user's world does it: `chattr +i` (immutable: as root,
permission bits stop nothing) where the test runs as root and chattr works, else chmod 0o555; a
full disk is an OSError(ENOSPC) raised by the write itself (a test hook)."""
import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from simmim.core.errors import ConfigError, UserError
from simmim.core.io import check_folder_writable
from simmim.trainer import loop, runlog
from simmim.trainer import pretrain as pretrain_mod
from simmim.trainer import visualize
from simmim.trainer.checkpoint import checkpoints
from simmim.trainer.config import load_config
from simmim.trainer.pretrain import pretrain

TINY = ["data.val_path=", "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "model.arch=swin_micro",
        "model.window_size=2", "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1",
        "run.log_every=1", "run.knn_every=0"]


def cfg_for(sample_root, out, *extra):
    return load_config("demo", [f"data.path={sample_root / 'train'}", f"run.out_dir={out}", *TINY, *extra])


def _chattr(flag: str, path: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


@contextlib.contextmanager
def unwritable(folder: Path):
    """`folder` cannot take new files (nor lose any) inside the block, whoever the test runs as."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if not _chattr("+i", folder):
            pytest.skip("running as root without a working chattr: no way to make a folder unwritable")
        try:
            yield
        finally:
            _chattr("-i", folder)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)


def test_unwritable_run_folder_is_one_line_before_anything_is_built(sample_root, tmp_path, monkeypatch):
    """Before: a 20-line PermissionError traceback from the lock file (or from mkdir, for a run
    folder to be made inside an unwritable one). After: one ConfigError naming run.out_dir, raised
    before the model or the loaders are built, and nothing written."""
    def build(*a, **kw):
        raise AssertionError("built before run.out_dir was checked")

    monkeypatch.setattr(pretrain_mod.PretrainTask, "build", build)
    frozen = tmp_path / "frozen"
    with unwritable(frozen):
        for out in (frozen, frozen / "run" / "inner"):
            with pytest.raises(ConfigError, match=r"run\.out_dir .* cannot be written") as e:
                pretrain(cfg_for(sample_root, out, "train.epochs=1"))
            assert "\n" not in str(e.value)
        assert list(frozen.iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        pretrain(cfg_for(sample_root, tmp_path / "a-file" / "run", "train.epochs=1"))


def test_check_folder_writable_leaves_nothing_and_makes_no_folder(tmp_path):
    assert check_folder_writable(tmp_path / "a" / "b", "x") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    with unwritable(tmp_path / "ro"):
        with pytest.raises(UserError, match="'.*ro' cannot be written"):
            check_folder_writable(tmp_path / "ro", "x")


def test_refused_writes_of_other_commands_are_one_line(tmp_path, capsys):
    """The same kind outside training: `simmim plot --out` and `simmim sample-data --out` into an
    unwritable folder ended in a PermissionError traceback (sample-data's naming its temporary
    folder); now one line naming the path, exit status 2."""
    from simmim.trainer.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0, "lr": 0.001}\n')
    frozen = tmp_path / "frozen"
    with unwritable(frozen):
        for argv in (["plot", str(run), "--out", str(frozen / "c.png")], ["sample-data", "--out", str(frozen / "s")]):
            with pytest.raises(SystemExit) as e:
                main(argv)
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and "\n" not in err and str(frozen) in err and "Traceback" not in err, err
        assert list(frozen.iterdir()) == []


def test_folder_made_unwritable_mid_run_keeps_the_checkpoint(sample_root, tmp_path, monkeypatch):
    """The run folder turns unwritable at the epoch's end, after the training steps. Before:
    the figure (then curves.png) write raised first, a 58-line traceback, and the epoch's
    checkpoint was never written. After: the checkpoint is written first; the figure and the
    curves that cannot be written are warnings, and the run ends normally."""
    out = tmp_path / "run"
    after_epoch = pretrain_mod.PretrainTask.after_epoch
    frozen = contextlib.ExitStack()

    def freeze_then(self, model, epoch, last, *a, **kw):
        if last:
            frozen.enter_context(unwritable(out))
        return after_epoch(self, model, epoch, last, *a, **kw)

    monkeypatch.setattr(pretrain_mod.PretrainTask, "after_epoch", freeze_then)
    with frozen:
        summary = pretrain(cfg_for(sample_root, out, "train.epochs=1"))
    assert [s for s, _ in checkpoints(out)] == [7] and len(summary["epochs"]) == 1
    text = (out / "log.txt").read_text()  # (an open file is still written in an immutable folder)
    assert "cannot write" in text and "reconstruction.png" in text and "curves.png" in text


def test_failing_soft_writes_are_warnings_never_the_end_of_the_run(sample_root, tmp_path, monkeypatch):
    """A full disk for everything but the checkpoints: figures, curves, TensorBoard, metrics.jsonl
    each say so once (not once per record) and every checkpoint is written."""
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setattr(visualize, "atomic_write", full)
    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    monkeypatch.setattr(runlog.MetricsLog, "__call__", full)
    out = tmp_path / "run"
    summary = pretrain(cfg_for(sample_root, out, "train.epochs=1"))
    assert [s for s, _ in checkpoints(out)] == [7] and len(summary["epochs"]) == 1
    warnings = [line for line in (out / "log.txt").read_text().splitlines() if " cannot write " in line]
    for what in ("metrics.jsonl", "TensorBoard events", "curves.png", "reconstruction.png"):  # 8 records, 1 warning
        written = [w.split(" cannot write ", 1)[1] for w in warnings]
        assert sum(w.startswith(what) or w.startswith(str(out / what)) for w in written) == 1, (what, warnings)


def test_log_file_that_fails_is_said_once(tmp_path, capsys):
    handler = runlog.RunLogFile(tmp_path / "log.txt")
    logger = logging.getLogger("simmim.test_faults")
    logger.addHandler(handler)
    try:
        handler.stream.close()
        handler.stream = open(os.devnull, "w")

        def full(*a):
            raise OSError(errno.ENOSPC, "No space left on device")

        handler.stream.write = full
        for _ in range(3):
            logger.warning("a record")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "No space left" in err and "Traceback" not in err


# ---------------------------------------------------------------- Ctrl-C (issue 28 item 6)

CTRL_C_ARGS = ["--config", "demo", "data.img_size=64", "data.num_workers=2", "model.arch=swin_micro",
               "model.window_size=2", "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1",
               "run.log_every=1", "data.val_path=", "data.batch_size=4", "train.epochs=3", "data.backend=torch",
               "run.knn_every=0"]
# the trainer's CLI, each training forward slowed by SLOW_STEP_S (a slow step to press Ctrl-C twice in)
DRIVER = """
import os, sys, time
from simmim.trainer import model
forward, pause, calls = model.SimMIM.forward, float(os.environ.get("SLOW_STEP_S", "0")), [0]
def slow(self, *a, **kw):
    if self.training and pause:
        calls[0] += 1
        print("training forward", calls[0], flush=True)
        time.sleep(pause)
    return forward(self, *a, **kw)
model.SimMIM.forward = slow
from simmim.trainer.cli import main
main(sys.argv[1:])
"""


def start_trainer(data: Path, out: Path, slow_step_s: float = 0.0) -> subprocess.Popen:
    """`simmim pretrain` in its own session (a terminal's Ctrl-C goes to the whole foreground
    process group: here os.killpg), loader workers included."""
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "SLOW_STEP_S": str(slow_step_s)}
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-c", DRIVER, "pretrain", *CTRL_C_ARGS, f"data.path={data}",
                             f"run.out_dir={out}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_first_ctrl_c_stops_with_a_checkpoint_and_names_it(sample_root, tmp_path):
    """Before: KeyboardInterrupt, "interrupted", exit 130 and no checkpoint (the work since the last
    one lost). After: the step finishes, a checkpoint is written, one line names it, exit 75, and
    the same command resumes from it."""
    import signal

    from helpers import run_until

    out = tmp_path / "run"
    proc = start_trainer(sample_root / "train", out)
    text = run_until(proc, "epoch 0 step 2 ", lambda: os.killpg(proc.pid, signal.SIGINT), timeout=120)
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 75, text[-3000:]
    saved = [s for s, _ in checkpoints(out)]
    assert len(saved) == 1 and saved[0] >= 3, (saved, text[-3000:])
    path = checkpoints(out)[0][1]
    assert lines[-1].startswith("simmim pretrain: stopped by SIGINT") and lines[-1].endswith(f"resume from {path}")
    assert "Traceback" not in text and sum("received SIGINT" in line for line in lines) == 1
    assert "press Ctrl-C again to stop at once" in text
    proc = start_trainer(sample_root / "train", out)
    text = run_until(proc, f"resumed from {path}", lambda: os.killpg(proc.pid, signal.SIGKILL), timeout=120)
    assert f"resumed from {path}: epoch 0, step {saved[0]} of " in text, text[-3000:]


@pytest.mark.slow  # a 30 s step to land the second Ctrl-C in; ~40 s on 2 cores
def test_second_ctrl_c_stops_at_once(sample_root, tmp_path):
    """A second Ctrl-C during the (slow) step the first one waits for: out at once, status 130,
    without a checkpoint. Both land inside step 1's forward (30 s long)."""
    import signal
    import time

    from helpers import run_until

    out = tmp_path / "run"
    proc = start_trainer(sample_root / "train", out, slow_step_s=30)

    start = []

    def twice():
        start.append(time.monotonic())
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(2)  # the first is handled (a flag set), the step goes on sleeping
        os.killpg(proc.pid, signal.SIGINT)

    text = run_until(proc, "training forward 2", twice, timeout=60)
    assert proc.returncode == 130, text[-3000:]
    assert text.rstrip().endswith("simmim pretrain: interrupted") and "Traceback" not in text, text[-3000:]
    assert time.monotonic() - start[0] < 28 and not checkpoints(out)  # within the 30 s step, not after it


def test_stop_flag_counts_a_second_ctrl_c_but_not_torchruns_copy(monkeypatch):
    """Outside torchrun each Ctrl-C press reaches the trainer once: the second stops at once.
    Under torchrun the first arrives twice (terminal and torchrun): the copy is not a second press.
    A repeated SIGTERM within REPEAT_S is one request everywhere (as before)."""
    import signal

    for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    before = signal.getsignal(signal.SIGINT)
    flag = runlog.StopFlag()
    try:
        assert signal.getsignal(signal.SIGINT) == flag._handle
        flag._handle(signal.SIGINT, None)
        assert flag() and "press Ctrl-C again" in flag.again()
        with pytest.raises(KeyboardInterrupt):
            flag._handle(signal.SIGINT, None)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) == before  # a library caller's Ctrl-C is its own again
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    flag = runlog.StopFlag()
    try:
        flag._handle(signal.SIGINT, None)
        flag._handle(signal.SIGINT, None)  # torchrun's copy
        flag.at -= flag.REPEAT_S
        with pytest.raises(KeyboardInterrupt):
            flag._handle(signal.SIGINT, None)
    finally:
        flag.restore()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    flag = runlog.StopFlag()
    try:
        flag._handle(signal.SIGTERM, None)
        flag._handle(signal.SIGTERM, None)  # the group's copy
        flag.at -= flag.REPEAT_S
        with pytest.raises(SystemExit):
            flag._handle(signal.SIGTERM, None)
    finally:
        flag.restore()


# ---------------------------------------------------------------- resume onto other data (issue 28 item 4)

def subset(src: Path, dst: Path, per_class: int) -> Path:
    """The first `per_class` images of each class folder of `src`, copied to `dst`."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


def test_resume_onto_a_smaller_data_set_never_goes_back(sample_root, tmp_path, monkeypatch):
    """Stopped at step 4 of 7 (60 images), resumed on 20 (2 steps per epoch). Before: the global step
    fell from 4 to 2, metrics.jsonl lost records, the new checkpoints were numbered below the stale
    one, and every rerun resumed from that stale one. After: a warning names what changed, the run
    goes on at the same share of the epoch with the global step counting on from 4; the newest
    checkpoint is the new run's and a rerun resumes from it."""
    from simmim.trainer import model as model_mod

    out, small = tmp_path / "run", subset(sample_root / "train", tmp_path / "small", per_class=4)
    forward, calls = model_mod.SimMIM.forward, {"n": 0}

    def killed(self, *a, **kw):
        calls["n"] += self.training
        if calls["n"] == 5:
            raise KeyboardInterrupt  # no checkpoint on the way out, like SIGKILL
        return forward(self, *a, **kw)

    monkeypatch.setattr(model_mod.SimMIM, "forward", killed)
    extra = ("train.epochs=2", "run.save_every=1", "run.save_every_minutes=1e-9", "run.keep_last=2")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg_for(sample_root, out, *extra))
    monkeypatch.undo()
    assert [s for s, _ in checkpoints(out)] == [3, 4]
    before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    again = ("train.epochs=2", "run.save_every=1", "run.keep_last=2")
    pretrain(load_config("demo", [f"data.path={small}", f"run.out_dir={out}", *TINY, *again]))
    text = (out / "log.txt").read_text()
    assert "the data changed since checkpoint-00000004.pt (60 -> 20 samples, 7 -> 2 steps per epoch)" in text
    assert "resuming at epoch 0, step 1 of 2" in text and "the global step goes on from 4" in text
    saved = [s for s, _ in checkpoints(out)]
    assert saved == [5, 7], saved  # epoch 0's end (4 + 1 step), epoch 1's end (+ 2 steps)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[:len(before)] == before  # nothing before the resumed step dropped
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[-1] == 6
    pretrain(load_config("demo", [f"data.path={small}", f"run.out_dir={out}", *TINY, "train.epochs=3", *again[1:]]))
    assert "checkpoint-00000007.pt: epoch 2, step 0 of 2" in (out / "log.txt").read_text()
    assert [s for s, _ in checkpoints(out)] == [7, 9]


def test_resume_onto_a_changed_list_of_the_same_size_warns(tmp_path):
    """Same size and steps per epoch, other files: the fingerprint tells, the run goes on where it
    stopped, with a warning."""
    old = loop.TrainState(epoch=1, step_in_epoch=3, steps_per_epoch=7, num_samples=56, data_fingerprint="aaaa")
    new = loop.TrainState(steps_per_epoch=7, num_samples=56, data_fingerprint="bbbb")
    with pytest.MonkeyPatch.context() as mp:
        said = []
        mp.setattr(loop.log, "warning", lambda msg, *a: said.append(msg % a))
        assert loop.resume_point(old, new, Path("checkpoint-00000010.pt")) == (1, 3, (0.0, 0), 0)
    assert len(said) == 1 and "the sample list differs (fingerprint aaaa -> bbbb)" in said[0]
    same = loop.TrainState(steps_per_epoch=7, num_samples=56, data_fingerprint="aaaa")
    assert loop.resume_point(old, same, Path("c")) == (1, 3, (0.0, 0), 0)
    # the same data at half the batch (data.batch_size is resumable): step 3 of 7 -> 6 of 14, and
    # the global step goes on from 7 + 3 = 10
    half = loop.TrainState(steps_per_epoch=14, num_samples=56, data_fingerprint="aaaa")
    epoch, step, _, offset = loop.resume_point(old, half, Path("c"))
    assert (epoch, step) == (1, 6) and offset + epoch * 14 + step == 10


# ---------------------------------------------------------------- nothing left behind (issue 28 item 5)

def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    """Each kind of half-written output a SIGKILL can leave: atomic_write's temporary files (a
    checkpoint's, a figure's, in a subfolder too), a write probe, a DCP save's .tmp folder and a
    replaced one's .old; the run's own files (and a foreign dotfile) stay."""
    from simmim.trainer.runfolder import remove_leftovers

    out = tmp_path / "run"
    left = [out / ".checkpoint-00000004.pt.0a1b2c3d.tmp", out / ".curves.png.deadbeef.tmp",
            out / "tensorboard" / ".x.json.01234567.tmp", out / ".write-probe-89abcdef"]
    kept = [out / "checkpoint-00000003.pt", out / "metrics.jsonl", out / ".lock", out / ".hidden.tmp",
            out / "tensorboard" / "events.out.tfevents.1"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    for name in (".checkpoint-00000008.tmp", ".checkpoint-00000006.old", "checkpoint-00000006"):
        (out / name).mkdir()
        (out / name / "__0_0.distcp").write_bytes(b"x")
    removed = remove_leftovers(out)
    assert sorted(p.name for p in removed) == sorted([p.name for p in left] + [".checkpoint-00000008.tmp",
                                                                             ".checkpoint-00000006.old"])
    assert all(p.exists() for p in kept) and (out / "checkpoint-00000006").is_dir()
    assert not any(p.exists() for p in left)


KILLER = """
import os, signal, sys
n, seen, replace = int(os.environ["KILL_AT_RENAME"]), [0], os.replace
def replace_or_die(src, dst, *a, **kw):  # SIGKILL once the n-th temporary file is written, before its rename
    if str(src).endswith(".tmp"):
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *a, **kw)
os.replace = replace_or_die
from simmim.trainer.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_runs_killed_at_many_points_of_their_writes_leave_nothing_behind(sample_root, tmp_path):
    """SIGKILL at the 1st, 2nd, 4th, 3rd and 6th temporary file a run writes (config.yaml, the
    metrics rewrite, a checkpoint every step, figures, curves), each time resuming in the same
    folder; then a run to the end. Each start removes what the killed one left; at the end no
    temporary file is left, every checkpoint reads and metrics.jsonl holds each step once."""
    import sys

    from simmim.core.io import temporaries
    from simmim.trainer.checkpoint_reader import read_checkpoint

    out = tmp_path / "run"
    args = ["pretrain", "--config", "demo", f"data.path={sample_root / 'train'}", f"run.out_dir={out}", *TINY,
            "train.epochs=2", "run.vis_every=1", "run.save_every_minutes=1e-9", "run.keep_last=2"]
    removed = 0
    for n in (1, 2, 4, 3, 6, 0):  # each run writes n - 2 or so checkpoints before its kill: 14 steps in all
        env = {**os.environ, "KILL_AT_RENAME": str(n), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == (-9 if n else 0), proc.stdout[-2000:] + proc.stderr[-2000:]
        removed += "a stopped run left half-written" in proc.stdout
        if n:
            assert temporaries(out), "the kill came before a rename: a temporary file is left"
    assert removed == 5 and not temporaries(out) and not list(out.glob(".checkpoint-*"))
    for _, path in checkpoints(out):
        read_checkpoint(path)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 13, steps


# ---------------------------------------------------------------- folders written atomically (io.atomic_folder)

KILL_SELF = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"


def _killed_in_child(script: str) -> int:
    """Runs `script` in a new Python process that SIGKILLs itself from inside a write (no cleanup
    can run, as for SIGKILL, SIGTERM's default action or a lost node); returns its exit status."""
    import sys

    return subprocess.run([sys.executable, "-c", script], timeout=300).returncode


def test_killed_sample_data_build_is_cleaned_by_the_next(tmp_path, monkeypatch):
    """sample-data killed half-way leaves its temporary folder (nothing can remove it then); the next
    build removes it and completes, while a partial folder whose writer is alive (flock held) is
    left alone. An exception half-way leaves nothing and the previous build intact."""
    import fcntl

    from simmim.pipeline import sample_data
    from simmim.core.io import remove_stale_partials

    out = tmp_path / "s"
    assert _killed_in_child(f"""
from simmim.pipeline import sample_data
real, calls = sample_data.random_view, []
def view_then_die(img, rng):  # the third image
    calls.append(1)
    if len(calls) == 3:
        {KILL_SELF}
    return real(img, rng)
sample_data.random_view = view_then_die
sample_data.build_sample_dataset({str(out)!r}, per_photo=1, val_per_photo=0)
""") == -9
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".s.")]
    assert len(stale) == 1 and stale[0].name.endswith(".partial") and list(stale[0].rglob("*.JPEG"))
    assert not out.exists()

    live = tmp_path / ".s.livewrtr.partial"  # another build under way: its writer holds the flock
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        sample_data.build_sample_dataset(out, per_photo=1, val_per_photo=0)
        assert (out / sample_data.COMPLETE).exists() and not stale[0].exists() and live.exists()
    finally:
        os.close(fd)
    assert remove_stale_partials(out) == [live] and not live.exists()  # its writer gone: stale now

    def fail(*args):
        raise RuntimeError("disk error")

    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.setattr(sample_data, "random_view", fail)
    with pytest.raises(RuntimeError, match="disk error"):
        sample_data.build_sample_dataset(out, per_photo=1, val_per_photo=0, force=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    assert (out.stat().st_mode & 0o077) != 0  # the usual mode, not mkdtemp's 0700


def test_killed_export_is_cleaned_by_the_next(tmp_path):
    """`simmim export` killed while writing model.safetensors: the next export removes the
    temporary folder and writes the folder whole; a killed --force replacement keeps the previous export."""
    import torch

    from simmim.trainer.checkpoint import TorchSaveCheckpointer
    from simmim.trainer.export import export
    from simmim.trainer.model import build_simmim

    model = build_simmim("swin_micro", 64, 32, window_size=2)
    cfg = {"model": {"arch": "swin_micro", "window_size": 2}, "data": {"img_size": 64, "mask_patch_size": 32}}
    ck = TorchSaveCheckpointer(tmp_path / "run", True, keep_last=1)
    ckpt = ck.save(1, model, torch.optim.AdamW(model.parameters()), {"train_state": {}, "scaler": {}, "config": cfg})
    out = tmp_path / "exp"

    killed = f"""
import importlib
from pathlib import Path
export = importlib.import_module("simmim.trainer.export")  # the module (the package also names its function)
def write_then_die(model, folder, **kwargs):
    (Path(folder) / "model.safetensors").write_bytes(b"half")
    {KILL_SELF}
export.save_for_hf = write_then_die
export.export({str(ckpt)!r}, {str(out)!r}, force=FORCE)
"""
    assert _killed_in_child(killed.replace("FORCE", "False")) == -9
    assert [p.name for p in tmp_path.glob(".exp.*.partial")] and not out.exists()
    export(ckpt, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "run"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    first = (out / "model.safetensors").read_bytes()

    assert _killed_in_child(killed.replace("FORCE", "True")) == -9
    assert (out / "model.safetensors").read_bytes() == first  # the previous export, whole
    export(ckpt, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "run"]
