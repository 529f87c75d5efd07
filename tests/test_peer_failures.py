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

SMALL = ["--config", "demo", "data.img_size=64", "data.num_workers=0", "model.arch=swinv2_micro",
         "model.window_size=2", "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1",
         "run.log_every=1", "train.precision=fp32", "data.batch_size=3", "train.epochs=2", "run.save_every=1",
         "data.val_path=", "run.stop_check_every=1"]
# 60 sample images, 2 ranks x 3 images: 10 steps per epoch

LAUNCHER = '''
import os, signal
from simmim.pipeline.errors import DatasetError
from simmim.trainer import pretrain as task_module


class Failing:
    """The real loader; on rank FAIL_RANK its FAIL_AT-th batch raises a loader's DatasetError
    (MODE=data) or kills the process (MODE=kill)."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == int(os.environ["FAIL_AT"]):
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
    from simmim.trainer.checkpoint import load_checkpoint, read_dcp_train_state

    proc = torchrun(tmp_path, sample_root, "data", 1, 4, f"train.parallel={parallel}")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    ckpt = tmp_path / "run" / ("checkpoint-00000004" if parallel == "fsdp" else "checkpoint-00000004.pt")
    assert ckpt.exists(), text[-4000:]  # steps 0-3 done on both ranks, the failed step 4 not taken
    state = (read_dcp_train_state(ckpt) if parallel == "fsdp" else load_checkpoint(ckpt))["train_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (0, 4)
    errors = [line for line in text.splitlines() if line.startswith("simmim pretrain: error:")]
    assert len(errors) == 1 and "gone.JPEG" in errors[0] and "rank 1," in errors[0] and str(ckpt) in errors[0], \
        text[-4000:]  # said once (rank 0), naming the failing rank's file
    assert "]: Traceback" not in text and "gloo" not in text, text[-4000:]  # no rank's traceback (torchrun's own: run.sh)
