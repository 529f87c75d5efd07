"""DALI's Python workers dying (issue 15, section 2): a worker killed with SIGKILL mid-epoch, or
all of them by a SIGTERM sent to the whole process group right after an epoch end, used to leave
the trainer blocked forever in DALI's shared_queue.put, deaf to SIGTERM, and a stale
/dev/shm/simmim-dali-epochs-* file. Now the run ends with a checkpoint and one line (or stops as
the signal asked), and nothing is left in /dev/shm. CPU-only DALI, one training process."""
import glob
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_until

pytest.importorskip("nvidia.dali")

from simmim.pipeline import Augmentation, LoaderSpec, MaskGenerator, build_loader  # noqa: E402
from simmim.pipeline.dali_watchdog import how_ended, remove_orphans, worker_pids  # noqa: E402

ARGS = ["--config", "demo", "data.img_size=64", "data.num_workers=2", "model.arch=swin_micro", "model.window_size=2",
        "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1", "run.log_every=1", "data.val_path=",
        "data.batch_size=4", "train.epochs=3", "data.backend=dali"]


def test_worker_pids_finds_the_live_workers(sample_root):
    """The adapter over DALI's private pool attribute still finds the workers."""
    loader = build_loader(LoaderSpec(backend="dali", path=str(sample_root / "train"), aug=Augmentation(size=32),
                                     batch_size=2, num_workers=2), MaskGenerator(32, 32, 0.6), "cpu")
    loader.set_epoch(0)
    next(iter(loader))
    pids = worker_pids(loader.pipe)
    assert len(pids) == 2 and all(how_ended(p) is None for p in pids)
    assert how_ended(2 ** 22 + 12345) == "ended"  # no such process


def test_remove_orphans_keeps_live_owners(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f"simmim-dali-epochs-{dead}-x").write_bytes(b"")
    (tmp_path / f"simmim-dali-epochs-{os.getppid()}-y").write_bytes(b"")
    assert remove_orphans(tmp_path, "simmim-dali-epochs-") == [tmp_path / f"simmim-dali-epochs-{dead}-x"]
    assert (tmp_path / f"simmim-dali-epochs-{os.getppid()}-y").exists()


def dali_workers(pid: int) -> list[int]:
    """The forked children of `pid` that run its own command line (DALI's workers; not
    multiprocessing's resource tracker)."""
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
            child = int(stat.split("/")[2])
            if int(text[text.rindex(")") + 2:].split()[1]) == pid and Path(f"/proc/{child}/cmdline").read_bytes() == cmd:
                out.append(child)
        except (OSError, ValueError):
            continue
    return out


def start(sample_root, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "simmim.trainer.cli", "pretrain", *ARGS,
                             f"data.path={sample_root}/train", f"run.out_dir={out}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_killed_worker_ends_the_run_with_a_checkpoint(sample_root, tmp_path):
    out = tmp_path / "run"
    proc = start(sample_root, out)
    victim = []

    def kill_one():
        victim.append(dali_workers(proc.pid)[0])
        os.kill(victim[0], signal.SIGKILL)

    text = run_until(proc, "epoch 0 step 5 ", kill_one)
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 2, text[-3000:]
    assert lines[-1].startswith(f"simmim pretrain: error: DALI's Python worker process {victim[0]} "), text[-3000:]
    assert "saved in" in lines[-1] and "run the same command again to resume" in lines[-1]
    assert "simmim scan" not in lines[-1] and any(out.glob("checkpoint-*.pt"))
    assert not glob.glob(f"/dev/shm/simmim-dali-epochs-{proc.pid}-*")


def test_group_sigterm_after_an_epoch_end_stops_with_a_checkpoint(sample_root, tmp_path):
    out = tmp_path / "run"
    proc = start(sample_root, out)
    text = run_until(proc, "epoch 0 done", lambda: os.killpg(proc.pid, signal.SIGTERM))
    assert proc.returncode == 75, text[-3000:]
    assert text.splitlines()[-1].startswith("simmim pretrain: stopped by SIGTERM"), text[-3000:]
    assert any(out.glob("checkpoint-*.pt")) and not glob.glob(f"/dev/shm/simmim-dali-epochs-{proc.pid}-*")
