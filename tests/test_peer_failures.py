"""Failures of one rank seen by the others (issue 15, section 2): a data file failing on one rank
mid-run stops every rank with a checkpoint and one line (DDP and FSDP2); a rank killed with
SIGKILL gives the others one line naming it and the checkpoint to resume from, not a gloo
traceback. 2 processes on CPU over gloo, each started by torchrun from a small launcher written
here, which makes one rank's loader fail or one rank kill itself."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_sh_env

SMALL = ["--config", "demo", "data.img_size=64", "data.num_workers=0", "model.arch=swinv2_micro",
         "model.window_size=2", "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1",
         "run.log_every=1", "train.precision=fp32", "data.batch_size=3", "train.epochs=2", "run.save_every=1",
         "data.val_path=", "run.stop_check_every=1"]
# 60 sample images, 2 ranks x 3 images: 10 steps per epoch

LAUNCHER = '''
import os, signal
from simmim.core.errors import DatasetError
from simmim.trainer import pretrain as task_module


class Failing:
    """The real loader; on rank FAIL_RANK its FAIL_AT-th batch (from 0, over all epochs) raises a loader's DatasetError
    (MODE=data) or kills the process (MODE=kill)."""

    def __init__(self, loader):
        self.loader, self.seen = loader, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.seen += 1  # batches over all epochs
            if self.seen == int(os.environ["FAIL_AT"]) + 1:
                if os.environ["MODE"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise DatasetError("cannot decode '/data/train/n01/gone.JPEG' (FileNotFoundError)")
            yield batch


build = task_module.PretrainTask.build


def failing_build(self, dist):
    model, loader = build(self, dist)
    return model, Failing(loader) if dist.rank == int(os.environ["FAIL_RANK"]) else loader


task_module.PretrainTask.build = failing_build
from simmim.trainer.cli import main
main()
'''


def torchrun(tmp_path: Path, sample_root: Path, mode: str, fail_rank: int, fail_at: int, *extra: str):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MODE": mode,
           "FAIL_RANK": str(fail_rank), "FAIL_AT": str(fail_at)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(launcher),
           "pretrain", *SMALL, f"data.path={sample_root}/train", f"run.out_dir={tmp_path / 'run'}", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])  # ~15 s each
def test_data_failure_on_one_rank_stops_all_with_a_checkpoint(sample_root, tmp_path, parallel):
    from simmim.trainer.checkpoint_reader import read_checkpoint

    proc = torchrun(tmp_path, sample_root, "data", 1, 4, f"train.parallel={parallel}")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    ckpt = tmp_path / "run" / ("checkpoint-00000004" if parallel == "fsdp" else "checkpoint-00000004.pt")
    assert ckpt.exists(), text[-4000:]  # steps 0-3 done on both ranks, the failed step 4 not taken
    state = read_checkpoint(ckpt, tensors=False).train["train_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (0, 4)
    errors = [line for line in text.splitlines() if line.startswith("simmim pretrain: error:")]
    assert len(errors) == 1 and "gone.JPEG" in errors[0] and "rank 1," in errors[0] and str(ckpt) in errors[0], \
        text[-4000:]  # said once (rank 0), naming the failing rank's file
    assert "]: Traceback" not in text and "gloo" not in text, text[-4000:]  # no rank's traceback (torchrun's own: run.sh)


def test_killed_rank_gives_the_others_one_line(sample_root, tmp_path):
    """Rank 1 SIGKILLed mid-epoch 1: rank 0's collective fails; it ends with one line naming the
    lost peer and the checkpoint to resume from (epoch 0's), not gloo's traceback."""
    proc = torchrun(tmp_path, sample_root, "kill", 1, 14, "train.parallel=ddp", "train.epochs=3",
                    "run.log_every=5")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("simmim pretrain: error:")]
    assert len(errors) == 1 and "rank 0 lost the rank at" in errors[0], text[-4000:]
    assert f"resumes from {tmp_path / 'run' / 'checkpoint-00000010.pt'}" in errors[0]
    assert "]: Traceback" not in text and "pair.cc" not in text, text[-4000:]


def test_peer_gone_only_for_a_peer_gone():
    """A collective's error becomes one line only when it says a peer went away (gloo, NCCL);
    anything else (a bug) keeps its traceback."""
    from simmim.trainer.distributed import peer_gone

    assert peer_gone("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.1.2.3]:11943. This is typically "
                     "caused by a remote worker crashing.") == "the rank at 10.1.2.3"
    assert peer_gone("[pair.cc:534] Connection reset by peer") == "another rank"
    assert peer_gone("NCCL error: remote process exited or there was a network error, NCCL version 2.21") \
        == "another rank"
    for bug in ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", "CUDA out of memory",
                "Expected all tensors to be on the same device"):
        assert peer_gone(bug) is None


@pytest.mark.parametrize("to", ["run.sh", pytest.param("group", marks=pytest.mark.slow)])  # ~14 s each
def test_sigterm_under_run_sh_ends_with_our_line(sample_root, tmp_path, to):
    """SIGTERM to run.sh (or its whole process group, as a scheduler sends it): the ranks
    checkpoint, and the job's output ends with the trainer's one line: no SignalException
    traceback from torchrun after it, no duplicate signal taken for "stop at once"."""
    import signal
    import time

    out = tmp_path / "run"
    env = run_sh_env(2)
    run_sh = Path(__file__).resolve().parents[1] / "trainer" / "run.sh"
    proc = subprocess.Popen(["bash", str(run_sh), *SMALL, "train.epochs=3", f"data.path={sample_root}/train",
                             f"run.out_dir={out}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 200
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    if to == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        text = proc.communicate(timeout=200)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(proc.communicate()[0][-4000:])
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 75, text[-4000:]
    assert lines[-1].startswith("simmim pretrain: stopped by SIGTERM at epoch 0"), text[-4000:]
    assert sum(line.startswith("simmim pretrain:") for line in lines) == 1  # rank 0 says it for the job
    assert "Traceback" not in text and any(out.glob("checkpoint-*.pt"))


def test_launch_names_the_rank_that_died():
    """run.sh's launcher ends a failed job with one line naming the first rank to fail and how,
    and that rank's exit status (128 + signal for a signal), instead of torchrun's traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from simmim.trainer.launch import failure_line

    killed = ChildFailedError("launch.py", {1: ProcessFailure(local_rank=1, pid=314, exitcode=-9, error_file="<N/A>")})
    assert failure_line(killed) == ("launch: rank 1 (local rank 1, pid 314) ended first, with signal SIGKILL", 137)
    user = ChildFailedError("launch.py", {0: ProcessFailure(local_rank=0, pid=7, exitcode=2, error_file="<N/A>")})
    assert failure_line(user) == ("launch: rank 0 (local rank 0, pid 7) ended first, with status 2", 2)
