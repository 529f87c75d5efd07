"""FSDP2 and sharded (DCP) checkpoints on CPU over gloo: FSDP2 against DDP step for step, a
checkpoint written by 2 ranks resumed by 1 and by 3, SIGKILL in the middle of a save; and, in one
process, the DCP checkpointer's publish / prune / partial-save rules and the reader's view of a folder."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import child_pids
import torch

from simmim.core.errors import CheckpointError
from simmim.trainer.checkpoint import DCPCheckpointer, dcp_checkpoints
from simmim.trainer.checkpoint_reader import is_dcp_checkpoint, read_checkpoint
from simmim.trainer.finetune import build_classifier, load_pretrained
from simmim.trainer.model import build_simmim, param_groups

SMALL = ["--config", "demo", "data.img_size=64", "data.num_workers=0", "model.arch=swinv2_micro",
         "model.window_size=2", "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1",
         "run.log_every=1", "train.precision=fp32", "run.keep_last=10", "optim.clip_grad=0.3"]
# 60 sample images, global batch 12: 5 steps per epoch; clipping at 0.3 is active on most steps
REF = ["data.batch_size=3", "train.accum_steps=2", "train.epochs=3", "run.save_every=1"]


def env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, out: Path, sample_root: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "simmim.trainer.cli", "pretrain", *SMALL, f"data.path={sample_root}/train",
           f"data.val_path={sample_root}/val", f"run.out_dir={out}",
           *extra]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        signal_all([*child_pids(proc.pid), proc.pid], signal.SIGKILL)
        pytest.fail(f"timed out:\n{proc.communicate()[0][-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def fsdp_reference(sample_root, tmp_path_factory):
    """FSDP2, 2 ranks x 2 accumulation steps x 3 images, 3 epochs, a DCP checkpoint after each."""
    out = tmp_path_factory.mktemp("fsdp_ref")
    text = finish(torchrun(2, out, sample_root, "train.parallel=fsdp", *REF))
    assert "world size 2 (FSDP2)" in text
    return out


@pytest.mark.slow
def test_fsdp_matches_ddp(sample_root, tmp_path, fsdp_reference):
    """Same seed, data, accumulation and float32 arithmetic: FSDP2's losses equal DDP's at every
    step, up to summation order (reduce-scatter vs all-reduce, the grad norm summed over shards)."""
    out = tmp_path / "ddp"
    text = finish(torchrun(2, out, sample_root, "train.parallel=ddp", *REF))
    assert "world size 2 (DDP)" in text
    ddp, fsdp = losses(out), losses(fsdp_reference)
    assert sorted(ddp) == sorted(fsdp) and len(ddp) >= 10
    steps = sorted(ddp)
    diff = max(abs(ddp[s] - fsdp[s]) for s in steps)
    print(f"FSDP2 vs DDP over {len(steps)} steps: max |loss difference| {diff:.3g}")
    torch.testing.assert_close([fsdp[s] for s in steps], [ddp[s] for s in steps], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,batch", [(1, 6), (3, 2)])
def test_dcp_resumes_at_another_world_size(sample_root, tmp_path, fsdp_reference, nproc, batch):
    """The 2-rank run's checkpoint after epoch 0 (2 ranks x 2 accumulation steps x 3 images),
    resumed by 1 rank (2 x 6) or 3 ranks (2 x 2 each): the same global batch of 12 and micro-batch
    of 6 (masks are drawn per global micro-batch), so the same losses for epochs 1 and 2."""
    ref = losses(fsdp_reference)
    out = tmp_path / f"resume{nproc}"
    shutil.copytree(fsdp_reference, out)
    found = dcp_checkpoints(out)
    first = found[0][0]
    for _, path in found[1:]:
        shutil.rmtree(path)
    text = finish(torchrun(nproc, out, sample_root, "train.parallel=fsdp", *REF, f"data.batch_size={batch}"))
    assert f"checkpoint-{first:08d}: epoch 1, step 0" in text
    assert f"global batch 12 ({batch} x {nproc} ranks x 2 accum)" in text
    got = losses(out)
    assert sorted(got) == sorted(ref)
    later = [s for s in sorted(ref) if s >= first]
    torch.testing.assert_close([got[s] for s in later], [ref[s] for s in later], rtol=1e-4, atol=1e-6)
    assert read_checkpoint(dcp_checkpoints(out)[-1][1], tensors=False).train["train_state"]["world_size"] == nproc


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigkill_during_dcp_save_resumes_from_previous(sample_root, tmp_path, fsdp_reference):
    out = tmp_path / "killed"
    proc = torchrun(2, out, sample_root, "train.parallel=fsdp", *REF)
    deadline, complete_before = time.time() + 600, None
    while True:  # kill the whole job while a .tmp folder (a save in progress) exists
        if dcp_checkpoints(out) and any(out.glob(".checkpoint-*.tmp")):
            job = [proc.pid, *child_pids(proc.pid)]  # torchrun starts each rank in its own session
            signal_all(job, signal.SIGSTOP)  # freeze every rank, then look again
            if any(out.glob(".checkpoint-*.tmp")):
                complete_before = [s for s, _ in dcp_checkpoints(out)]
                signal_all(job, signal.SIGKILL)
                break
            signal_all(job, signal.SIGCONT)  # that save finished meanwhile: catch the next one
        if proc.poll() is not None or time.time() > deadline:
            signal_all([*child_pids(proc.pid), proc.pid], signal.SIGKILL)
            pytest.fail(f"no save caught in progress:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.002)
    proc.communicate()
    assert any(out.glob(".checkpoint-*.tmp"))
    assert [s for s, _ in dcp_checkpoints(out)] == complete_before  # the partial save is not a checkpoint
    text = finish(torchrun(2, out, sample_root, "train.parallel=fsdp", *REF))
    assert f"resumed from {out}/checkpoint-{complete_before[-1]:08d}" in text
    assert not any(out.glob(".checkpoint-*.tmp"))
    ref, got = losses(fsdp_reference), losses(out)
    assert sorted(got) == sorted(ref)
    torch.testing.assert_close([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-5, atol=1e-6)


def test_dcp_checkpointer_single_process(tmp_path):
    """Publish by rename, keep-last-K, a stale .tmp ignored and removed, resume through the
    checkpointer, and the one reader's view of the folder for fine-tuning and export."""
    torch.manual_seed(0)
    model = build_simmim("swinv2_micro", 64, 32, window_size=2)
    opt = torch.optim.AdamW(param_groups(model, 0.05, "swinv2"), lr=1e-3)
    ck = DCPCheckpointer(tmp_path, True, keep_last=2)
    (tmp_path / ".checkpoint-00000099.tmp").mkdir()  # a save that never finished
    assert ck.checkpoints() == []
    cfg = {"model": {"arch": "swinv2_micro", "window_size": 2}, "data": {"img_size": 64}}
    model(torch.randn(1, 3, 64, 64), torch.ones(1, 2, 2, dtype=torch.bool)).backward()
    opt.step()
    for step in (1, 2, 3):
        ck.save(step, model, opt, {"train_state": {"epoch": 0, "step_in_epoch": step}, "scaler": {}, "config": cfg})
    assert [s for s, _ in dcp_checkpoints(tmp_path)] == [2, 3] and not any(tmp_path.glob(".*.tmp"))
    latest = ck.checkpoints()[-1][1]
    contents, bad = ck.newest_readable()
    assert contents.path == latest and not bad and is_dcp_checkpoint(latest)
    assert contents.train["train_state"]["step_in_epoch"] == 3 and contents.model == {}  # tensors: read sharded
    fresh = build_simmim("swinv2_micro", 64, 32, window_size=2)
    fresh_opt = torch.optim.AdamW(param_groups(fresh, 0.05, "swinv2"), lr=1e-3)
    train = ck.load(contents, fresh, fresh_opt)
    assert train["config"] == cfg
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    net = build_classifier("swinv2_micro", 64, 5, 2, 0.0)
    report = load_pretrained(net, latest, "swinv2_micro")
    assert report["missing"] == ["head.fc.weight", "head.fc.bias"] and report["unexpected"] == []
    from simmim.trainer.export import build_encoder, read_pretraining_checkpoint

    state, config = read_pretraining_checkpoint(latest)  # simmim export reads the folder too
    assert config == cfg and build_encoder(config, state)[1] == "swinv2"
    whole = read_checkpoint(latest)  # gathered in memory: the weights a torch.save checkpoint holds
    assert whole.format == "dcp" and whole.config == cfg and whole.train["train_state"]["step_in_epoch"] == 3
    assert whole.model.keys() == model.state_dict().keys()
    assert all(torch.equal(whole.model[k], v) for k, v in model.state_dict().items())


def test_dcp_run_folder_rules(tmp_path):
    """runloop's rules for DCP folders: the newest readable folder is resumed (a truncated one set
    aside as .corrupt, a .tmp folder never a checkpoint), and a write that fails (the file-size
    limit, as a full disk would) is one CheckpointError line, the partial folder removed."""
    import resource

    from simmim.trainer.checkpoint import newest_readable_checkpoint
    from simmim.trainer.runfolder import set_aside

    model = build_simmim("swinv2_micro", 64, 32, window_size=2)
    opt = torch.optim.AdamW(param_groups(model, 0.05, "swinv2"), lr=1e-3)
    ck = DCPCheckpointer(tmp_path, True, keep_last=3)
    for step in (1, 2):
        ck.save(step, model, opt, {"train_state": {"epoch": 0, "step_in_epoch": step}, "scaler": {}, "config": {}})
    (tmp_path / ".checkpoint-00000009.tmp").mkdir()  # an unfinished save: never a checkpoint
    newest = tmp_path / "checkpoint-00000002"
    (newest / ".metadata").write_bytes((newest / ".metadata").read_bytes()[:40])  # truncated
    ckpt, bad = newest_readable_checkpoint(tmp_path)
    path = ckpt.path
    assert path == tmp_path / "checkpoint-00000001" and ckpt.train["train_state"]["step_in_epoch"] == 1
    assert [p for p, _ in bad] == [newest] and "cannot be read" in str(bad[0][1])
    set_aside(bad, path)
    assert (tmp_path / "checkpoint-00000002.corrupt").is_dir() and not newest.exists()
    assert [p.name for _, p in dcp_checkpoints(tmp_path)] == ["checkpoint-00000001"]

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 12, hard))
        with pytest.raises(CheckpointError) as e:
            ck.save(3, model, opt, {"train_state": {}, "scaler": {}, "config": {}})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    msg = str(e.value)
    assert "\n" not in msg and "cannot write checkpoint 'checkpoint-00000003'" in msg and "intact" in msg
    assert not any(tmp_path.glob(".checkpoint-*.tmp")) and not (tmp_path / "checkpoint-00000003").exists()
    assert [p.name for _, p in dcp_checkpoints(tmp_path)] == ["checkpoint-00000001"]


def test_fsdp_swinv2_view_warning_ignored_narrowly(tmp_path):
    """FSDP2 warned at every forward that timm's SwinV2 block returns a view: that one warning is
    ignored once sharded (see parallel.ignore_swinv2_view_warning); the same warning for another
    module still shows. One rank over gloo: fully_shard runs, nothing is split."""
    import warnings

    import torch.distributed as dist

    from simmim.trainer.parallel import apply_fsdp

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model = apply_fsdp(build_simmim("swinv2_micro", 64, 32, window_size=2), param_dtype=None)
            for _ in range(2):
                model(torch.randn(2, 3, 64, 64), torch.ones(2, 2, 2, dtype=torch.bool)).backward()
            warnings.warn("FSDP2-wrapped module (FSDPOther) returned a view tensor. ...", UserWarning)
    finally:
        dist.destroy_process_group()
    views = [str(w.message) for w in seen if "returned a view tensor" in str(w.message)]
    assert views == ["FSDP2-wrapped module (FSDPOther) returned a view tensor. ..."]


def test_dcp_one_process_warns_nothing(tmp_path):
    """DCP's "assuming the intent is to save in a single process" warning came at every save of
    a one-process run; it is ignored exactly where no_dist=True is asked for."""
    import warnings

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ck = DCPCheckpointer(tmp_path, True, keep_last=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        path = ck.save(1, model, opt, {"train_state": {"epoch": 0}, "config": {}})
        ck.load(read_checkpoint(path, tensors=False), model, opt)
        assert read_checkpoint(path).model.keys() == {"weight", "bias"}  # gathered in one process
    assert [str(w.message) for w in seen if "single process" in str(w.message)] == []


# ---------------------------------------------------------------- an FSDP run's checkpoint, used

def probe_run(nproc: int, out: Path, sample_root: Path, checkpoint: Path, parallel: str) -> dict[int, float]:
    """`simmim probe CHECKPOINT` of the FSDP run's encoder (swinv2_micro, 64 px) on `nproc` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "simmim.trainer.cli", "probe", str(checkpoint), "--config", "probe_demo",
           f"data.path={sample_root}/train", f"probe.val_path={sample_root}/val", "data.img_size=64",
           "model.arch=swinv2_micro", "model.window_size=2", "data.num_workers=0", "data.batch_size=4",
           "train.epochs=2", "run.save_every=1", f"run.out_dir={out}", f"train.parallel={parallel}",
           "run.progress=false", "run.log_every=1"]
    finish(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True))
    return losses(out)


@pytest.mark.slow
def test_fsdp_checkpoint_probed_and_knn_evaluated(sample_root, tmp_path, fsdp_reference):
    """The FSDP run's DCP folder, used as every consumer uses it: `simmim probe` over FSDP2 (its
    frozen encoder's patch embedding and norms are sharded, and the probe calls them outside the
    encoder's forward) gives DDP's losses step for step, with the checkpoint's encoder frozen in
    it; and the run's own k-NN figure (run.knn_every, last epoch, features computed sharded) equals
    one process's on the gathered weights."""
    from simmim.trainer.distributed import DistInfo
    from simmim.trainer.knn import KNNMonitor
    from simmim.trainer.model import ARCHS

    final = dcp_checkpoints(fsdp_reference)[-1][1]
    weights = read_checkpoint(final)
    fsdp = probe_run(2, tmp_path / "fsdp", sample_root, final, "fsdp")
    ddp = probe_run(2, tmp_path / "ddp", sample_root, final, "ddp")
    assert sorted(fsdp) == sorted(ddp) and len(ddp) >= 10
    torch.testing.assert_close([fsdp[s] for s in sorted(ddp)], [ddp[s] for s in sorted(ddp)], rtol=1e-4, atol=1e-6)
    probed = read_checkpoint(dcp_checkpoints(tmp_path / "fsdp")[-1][1]).model
    frozen = {k.removeprefix("net."): v for k, v in probed.items() if k.startswith("net.") and "head" not in k}
    for k, v in frozen.items():
        if not k.endswith(("relative_position_index", "relative_coords_table", "attn_mask")):
            assert torch.equal(v, weights.model[f"encoder.swin.{k}"]), k

    logged = [json.loads(line) for line in (fsdp_reference / "metrics.jsonl").read_text().splitlines()]
    knn = [r["knn_top1"] for r in logged if "knn_top1" in r]
    assert len(knn) == 1  # the last epoch's (the demo's run.knn_every is 8)
    model = build_simmim("swinv2_micro", 64, 32, window_size=2)
    model.load_state_dict(weights.model)
    cfg = weights.config
    one = KNNMonitor(str(sample_root / "train"), str(sample_root / "val"), 64, ARCHS["swinv2_micro"].patch_size,
                     cfg["run"]["knn_train_samples"], cfg["data"]["batch_size"], 0, cfg["train"]["seed"],
                     DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))(model)
    assert one == pytest.approx(knn[0], abs=1e-9)


@pytest.mark.slow
def test_init_from_an_fsdp_runs_dcp_folder(sample_root, tmp_path, fsdp_reference):
    """model.init_from=<the FSDP run's DCP folder>: the encoder `simmim pretrain` starts from is the
    run's (gathered), at another image size and window, SwinV2's position bias normalised by the
    window 2 its config records; mask token and head fresh."""
    from simmim.trainer.config import load_config
    from simmim.trainer.distributed import DistInfo
    from simmim.trainer.pretrain import PretrainTask

    final = dcp_checkpoints(fsdp_reference)[-1][1]
    theirs = read_checkpoint(final).model
    cfg = load_config("demo", ["data.img_size=128", "model.arch=swinv2_micro", "model.window_size=4",
                               f"data.path={sample_root}/train", "data.val_path=", f"run.out_dir={tmp_path}",
                               f"model.init_from={final}", "run.knn_every=0"])
    model, _ = PretrainTask(cfg).build(DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    ours = model.state_dict()
    loaded = [k for k in theirs if k.startswith("encoder.swin.") and not k.endswith(("relative_position_index",
                                                                                     "relative_coords_table"))]
    assert len(loaded) > 50
    for k in loaded:
        assert torch.equal(ours[k], theirs[k]), k
    assert not torch.equal(ours["encoder.mask_token"], theirs["encoder.mask_token"])
    attn = model.encoder.swin.layers[0].blocks[0].attn
    assert attn.pretrained_window_size == (2, 2) and attn.window_size == (4, 4)
