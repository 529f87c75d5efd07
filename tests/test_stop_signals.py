"""Stop signals sent to the whole process group (what SLURM and Kubernetes do on preemption) with
the torch loader's DataLoader workers in the group (issue 15, section 2): the workers used to die
of the SIGTERM and the trainer crashed with "DataLoader worker (pid N) is killed by signal:
Terminated." and no checkpoint. Now the workers ignore the stop signals, the trainer stops after
the step with a checkpoint and one line. Also: an unreadable image is reported once per run, not
once per worker. CPU, one training process, tiny sizes."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import run_sh_env, run_until

ARGS = ["--config", "demo", "data.img_size=64", "data.num_workers=2", "model.arch=swin_micro", "model.window_size=2",
        "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1", "run.log_every=1", "data.val_path=",
        "data.batch_size=4", "train.epochs=3", "data.backend=torch", "run.stop_check_every=2"]


def start(data, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "simmim.trainer.cli", "pretrain", *ARGS,
                             f"data.path={data}", f"run.out_dir={out}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_group_signal_with_loader_workers_stops_with_a_checkpoint(sample_root, tmp_path, sig):
    out = tmp_path / "run"
    proc = start(sample_root / "train", out)
    text = run_until(proc, "epoch 0 step 2 ", lambda: os.killpg(proc.pid, sig))
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 75, text[-3000:]
    assert lines[-1].startswith(f"simmim pretrain: stopped by {sig.name}"), text[-3000:]
    assert "Traceback" not in text and "killed by signal" not in text, text[-3000:]
    assert sum(f"received {sig.name}" in line for line in lines) == 1, text[-3000:]
    assert any(out.glob("checkpoint-*.pt"))


BROKEN = """
import logging, sys
from simmim.pipeline import Augmentation, LoaderSpec, MaskGenerator, build_loader
logging.basicConfig(level=logging.WARNING, format="%(process)d %(message)s", stream=sys.stdout)
loader = build_loader(LoaderSpec(backend="torch", path=sys.argv[1], aug=Augmentation(size=32), batch_size=1,
                                 num_workers=2, train=False), MaskGenerator(32, 32, 0.6), "cpu")
for epoch in range(3):
    loader.set_epoch(epoch)
    print("images", sum(len(images) for images, _ in loader))
"""


def test_broken_image_is_reported_once_with_two_workers(tmp_path):
    """Two broken files in a row, samples 0 and 1, batches of one in order: worker 0 meets both
    (sample 0 is replaced by 1, then 2), worker 1 meets sample 1 as its own first sample; each file
    is reported once in all. The loader stays alive to the interpreter's exit (a module global):
    the workers, deaf to the stop signals, still end there."""
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0bad.jpg").write_bytes(b"not a jpeg")
    (root / "a" / "1bad.jpg").write_bytes(b"")
    for i in range(6):
        Image.new("RGB", (40, 40), (30 * i, 10, 200)).save(root / "a" / f"{i + 2}.jpg")
    out = subprocess.run([sys.executable, "-c", BROKEN, str(root)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and not out.stderr, out.stderr[-3000:]  # its workers ended quietly at exit
    assert out.stdout.count("images 8") == 3, out.stdout  # the bad image replaced, every epoch whole
    skips = [line for line in out.stdout.splitlines() if "skipping unreadable image" in line]
    assert sorted(line.split()[4].split("/")[-1] for line in skips) == ["0bad.jpg", "1bad.jpg"], out.stdout


def test_group_sigterm_under_run_sh_with_loader_workers(sample_root, tmp_path):
    """Two ranks through trainer/run.sh, each with two DataLoader workers, SIGTERM to the whole
    group: a checkpoint, one "received SIGTERM" line (rank 0's), no rank's traceback, and none of
    torchrun's "Sending process N closing signal SIGTERM" warnings. ~12 s on 2 cores."""

    out = tmp_path / "run"
    env = run_sh_env(2)
    run_sh = Path(__file__).resolve().parents[1] / "trainer" / "run.sh"
    proc = subprocess.Popen(["bash", str(run_sh), *ARGS[:-1], "run.stop_check_every=1", f"data.path={sample_root}/train",
                             f"run.out_dir={out}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    text = run_until(proc, "epoch 0 step 2 ", lambda: os.killpg(proc.pid, signal.SIGTERM))
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 75, text[-4000:]
    assert lines[-1].startswith("simmim pretrain: stopped by SIGTERM at epoch 0"), text[-4000:]
    assert sum("received SIGTERM: stopping" in line for line in lines) == 1, text[-4000:]
    assert "Traceback" not in text and "killed by signal" not in text and "closing signal" not in text, text[-4000:]
    assert any(out.glob("checkpoint-*.pt"))
