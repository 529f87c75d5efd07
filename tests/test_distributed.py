"""Distributed training and faults on CPU (gloo): 1 vs 2 processes, a 2-node run simulated on
localhost through trainer/run.sh, SIGTERM with resume, a killed rank, non-finite steps."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import child_pids
import torch

from simmim.trainer.checkpoint import checkpoints
from simmim.trainer.checkpoint_reader import read_checkpoint
from simmim.trainer.config import load_config
from simmim.trainer.loop import Diverged, TrainState, resolve_accumulation
from simmim.trainer.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "trainer" / "run.sh"
TINY = ["--config", "demo", "data.val_path=", "data.img_size=64", "data.num_workers=0", "model.arch=swin_micro",
        "model.window_size=2", "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1",
        "run.log_every=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra):
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
            **{k: str(v) for k, v in extra.items()}}


def cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "simmim.trainer.cli", "pretrain", *args], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def run_sh(args, **extra):
    return subprocess.Popen(["bash", str(RUN_SH), *args], env=env(**extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_and_fail(proc, why: str):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # every process here runs in its own session
    except (ProcessLookupError, PermissionError):
        pass
    pytest.fail(f"{why}:\n{proc.communicate()[0][-6000:]}")


def finish(proc, timeout=300):
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        kill_and_fail(proc, f"timed out after {timeout} s")
    return proc.returncode, out


def wait_for(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            kill_and_fail(proc, f"exited early with {proc.returncode}")
        if time.time() > deadline:
            kill_and_fail(proc, f"condition not met in {timeout} s")
        time.sleep(0.02)


def losses(run_dir):
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def epoch_losses(run_dir):
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["epoch_loss"]) for r in recs if "epoch_loss" in r]


def args_for(sample_root, out, *extra):
    return [*TINY, f"data.path={sample_root}/train", f"run.out_dir={out}", *extra]


@pytest.fixture(scope="module")
def reference_run(sample_root, tmp_path_factory):
    """An uninterrupted single-process run that the fault tests must reproduce step for step."""
    out = tmp_path_factory.mktemp("reference")
    code, text = finish(cli(args_for(sample_root, out, "train.epochs=3", "data.batch_size=8",
                                     "run.save_every=1")))
    assert code == 0, text
    return out


@pytest.mark.slow
def test_two_processes_match_one(sample_root, tmp_path, reference_run):
    """Same global batch (2 x 4 vs 1 x 8): the same loss at every step, within float tolerance.
    Time-based checkpoints at every stop check: the ranks agree on them, and they change nothing."""
    out = tmp_path / "ddp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "simmim.trainer.cli", "pretrain",
         *args_for(sample_root, out, "train.epochs=3", "data.batch_size=4", "run.save_every=1",
                   "run.save_every_minutes=1e-9")],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    code, text = finish(proc)
    assert code == 0, text
    assert "world size 2" in text and "global batch 8 (4 x 2 ranks x 1 accum)" in text
    assert "checkpoint-00000003.pt" in text  # mid-epoch, by time
    one, two = losses(reference_run), losses(out)
    assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 15
    torch.testing.assert_close([v for _, v in two], [v for _, v in one], rtol=2e-4, atol=1e-5)


@pytest.mark.slow
def test_two_nodes_through_run_sh(sample_root, tmp_path):
    out = tmp_path / "two_nodes"
    port = free_port()
    common = dict(NNODES=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GPUS_PER_NODE=1, RDZV_ID="test2n",
                  MAX_RESTARTS=0)
    args = args_for(sample_root, out, "train.epochs=2", "data.batch_size=4", "run.save_every=1")
    nodes = [run_sh(args, NODE_RANK=rank, **common) for rank in (0, 1)]
    results = [finish(n) for n in nodes]
    for code, text in results:
        assert code == 0, text
    text = "".join(t for _, t in results)
    assert "2 node(s) x 1 process(es)" in text and "world size 2" in text
    assert [p.name for _, p in checkpoints(out)][-1] == "checkpoint-00000014.pt"  # 2 epochs x 7 steps
    assert len(losses(out)) == 14


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_trajectory(sample_root, tmp_path, reference_run):
    out = tmp_path / "sigterm"
    args = args_for(sample_root, out, "train.epochs=3", "data.batch_size=8", "run.save_every=1")
    proc = cli(args)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 10, proc)
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc)
    assert code == 75, text
    assert "received SIGTERM" in text and "run the same command to resume" in text
    step = read_checkpoint(checkpoints(out)[-1][1]).train["train_state"]
    assert step["epoch"] == 1 and 0 < step["step_in_epoch"] < 7  # stopped mid-epoch 1
    code, text = finish(cli(args))
    assert code == 0, text
    assert f"epoch 1, step {step['step_in_epoch']} of 7" in text
    a, b = losses(reference_run), losses(out)
    assert [s for s, _ in a] == [s for s, _ in b]  # no step lost or repeated
    torch.testing.assert_close([v for _, v in b], [v for _, v in a], rtol=1e-5, atol=1e-6)
    # the resumed epoch's mean covers the steps before the stop too
    torch.testing.assert_close(epoch_losses(out), epoch_losses(reference_run), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sigkill_and_resume_gives_same_losses(sample_root, tmp_path, reference_run):
    """A run killed outright (no chance to checkpoint) and restarted with the same command resumes
    from its last checkpoint and reproduces the uninterrupted run's losses; the log holds each step once."""
    out = tmp_path / "sigkill"
    args = args_for(sample_root, out, "train.epochs=3", "data.batch_size=8", "run.save_every=1")
    proc = cli(args)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert checkpoints(out) and not (out / "checkpoint-00000021.pt").exists()  # it died mid-run
    code, text = finish(cli(args))
    assert code == 0 and "resumed from" in text, text
    a, b = losses(reference_run), losses(out)
    assert [s for s, _ in a] == [s for s, _ in b]
    torch.testing.assert_close([v for _, v in b], [v for _, v in a], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_killed_rank_is_restarted_and_run_finishes(sample_root, tmp_path):
    out = tmp_path / "killed_rank"
    args = args_for(sample_root, out, "train.epochs=3", "data.batch_size=4", "run.save_every=1")
    proc = run_sh(args, GPUS_PER_NODE=2, MASTER_PORT=free_port(), MAX_RESTARTS=2, RDZV_ID="killtest")
    wait_for(lambda: checkpoints(out), proc)
    agents = [p for p in child_pids(proc.pid)]
    workers = [w for a in agents for w in child_pids(a)]
    assert len(workers) == 2, (agents, workers)
    os.kill(workers[1], signal.SIGKILL)
    code, text = finish(proc)
    assert code == 0, text
    assert "resumed from" in text
    steps = [s for s, _ in losses(out)]
    assert steps == list(range(21))  # 3 epochs x 7 steps, each once
    assert checkpoints(out)[-1][0] == 21


def test_run_sh_help_and_slurm_variables(tmp_path):
    out = subprocess.run(["bash", str(RUN_SH), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "SLURM" in out.stdout and "GPUS_PER_NODE" in out.stdout
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (fake / "python").write_text("#!/bin/sh\necho \"ARGS $*\"\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    e = {k: v for k, v in env().items() if k not in ("MASTER_ADDR", "NNODES", "NODE_RANK", "MASTER_PORT")}
    e.update(PATH=f"{fake}:{os.environ['PATH']}", PYTHON=str(fake / "python"), SLURM_JOB_ID="4242",
             SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu-node-[07-08]", GPUS_PER_NODE="8")
    res = subprocess.run(["bash", str(RUN_SH), "--config", "swin_base_100ep", "train.epochs=1"], env=e,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if l.startswith("ARGS"))
    for part in ("--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=gpu-node-07:29500", "--rdzv-id=4242", "--max-restarts=3",
                 "pretrain --config swin_base_100ep train.epochs=1"):
        assert part in line, (part, line)


def tiny_cfg(sample_root, out, *extra):
    over = [a for a in args_for(sample_root, out, *extra) if "=" in a]
    return load_config("demo", over)


def test_nonfinite_steps_are_skipped(sample_root, tmp_path, monkeypatch):
    from simmim.trainer import model as model_mod

    calls = {"n": 0}
    forward = model_mod.SimMIM.forward

    def flaky(self, images, masks, return_pred=False):
        out = forward(self, images, masks, return_pred)
        if self.training:
            calls["n"] += 1
            if calls["n"] in (3, 4):
                return out * float("nan")
        return out

    monkeypatch.setattr(model_mod.SimMIM, "forward", flaky)
    out = tmp_path / "nan"
    summary = pretrain(tiny_cfg(sample_root, out, "train.epochs=1", "data.batch_size=8"))
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["skipped_steps"] for r in recs][:5] == [0, 0, 1, 2, 2]
    assert [r["loss"] is None for r in recs] == [False, False, True, True, False, False, False]  # JSON null
    finite = [r["loss"] for r in recs if r["loss"] is not None]
    assert math.isfinite(summary["epochs"][0]["loss"])  # the epoch mean skips NaN steps, and only those
    assert summary["epochs"][0]["loss"] == pytest.approx(sum(finite) / len(finite), rel=1e-5)
    state = read_checkpoint(checkpoints(out)[-1][1])
    assert state.train["train_state"]["skipped_steps"] == 2
    adam_steps = {int(s["step"]) for s in state.optimizer["state"].values()}
    assert adam_steps == {7 - 2}  # the optimizer took 5 real steps of 7


def test_divergence_stops_with_checkpoint(sample_root, tmp_path, monkeypatch):
    from simmim.trainer import model as model_mod

    forward = model_mod.SimMIM.forward
    calls = {"n": 0}

    def diverging(self, images, masks, return_pred=False):
        out = forward(self, images, masks, return_pred)
        calls["n"] += self.training
        return out * float("inf") if self.training and calls["n"] > 2 else out

    monkeypatch.setattr(model_mod.SimMIM, "forward", diverging)
    out = tmp_path / "diverge"
    with pytest.raises(Diverged, match="3 consecutive steps had a non-finite loss"):
        pretrain(tiny_cfg(sample_root, out, "train.epochs=2", "data.batch_size=8", "train.max_skipped_steps=3"))
    state = read_checkpoint(checkpoints(out)[-1][1])
    train_state = state.train["train_state"]
    assert train_state["epoch"] == 0 and train_state["step_in_epoch"] == 5 and train_state["skipped_steps"] == 3
    assert all(t.isfinite().all() for t in state.model.values() if t.is_floating_point())


def test_world_size_change_keeps_global_batch(caplog):
    state = TrainState(global_batch=2048, world_size=16)
    with caplog.at_level("WARNING"):
        assert resolve_accumulation(state, 128, 8, 1) == 2
    assert "accum_steps 1 -> 2 keeps the global batch at 2048" in caplog.text
    assert resolve_accumulation(state, 128, 16, 1) == 1
    with caplog.at_level("WARNING"):
        assert resolve_accumulation(state, 128, 24, 1) == 1
    assert "the global batch changes from 2048 to 3072" in caplog.text


def test_train_state_round_trip():
    s = TrainState(epoch=3, step_in_epoch=5, global_batch=64, world_size=2, skipped_steps=1)
    t = TrainState()
    t.load_state_dict(s.state_dict())
    assert t == s and TrainState.from_checkpoint({"train_state": s.state_dict(), "scaler": {}}) == s
