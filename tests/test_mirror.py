"""run.mirror (trainer/mirror.py): checkpoints copied to an S3-compatible store in the background,
the marker written last, keep-last-K there too, and a run folder without a checkpoint resumed from
the store's newest complete one. Against moto's S3 server on 127.0.0.1 (the `s3_bucket` fixture)."""
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import run_sh_env, run_until

pytest.importorskip("boto3", reason="run.mirror needs the stream extra (boto3)")

from botocore.exceptions import EndpointConnectionError  # noqa: E402

from simmim.core.errors import CheckpointError, ConfigError
from simmim.trainer.checkpoint import DCPCheckpointer, TorchSaveCheckpointer, save_checkpoint  # noqa: E402
from simmim.trainer.checkpoint_reader import read_checkpoint  # noqa: E402
from simmim.trainer.config import load_config  # noqa: E402
from simmim.trainer.distributed import DistInfo  # noqa: E402
from simmim.trainer.mirror import (Mirror, MirroredCheckpointer, Upload, check_mirror,  # noqa: E402
                                   restore_from_mirror)

ONE = DistInfo(0, 0, 1, torch.device("cpu"))


def state(step: int) -> dict:
    """A small checkpoint of this project's shape: weights, optimizer, train state."""
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 32, generator=g)}, "optimizer": {"state": {}, "param_groups": []},
            "train_state": {"epoch": 0, "step_in_epoch": step}}


class Recording:
    """A boto3 S3 client that records the keys it writes, in order; `fail`: a key part whose
    upload raises as an unreachable endpoint does; `hold`: an event each upload waits for."""

    def __init__(self, client, fail: str | None = None, hold: threading.Event | None = None, slow_s: float = 0):
        self.client, self.fail, self.hold, self.writes = client, fail, hold, []
        self.slow_s, self.sent = slow_s, []  # slow_s: a pause per chunk sent (a slow link); sent: chunk sizes

    def __getattr__(self, name):
        return getattr(self.client, name)

    def upload_file(self, path, bucket, key, **kw):
        if self.hold is not None:
            self.hold.wait()
        if self.fail and self.fail in key:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        self.writes.append(key)
        if self.slow_s:
            callback = kw["Callback"]

            def slowly(n):
                self.sent.append(n)
                time.sleep(self.slow_s)
                callback(n)
            kw["Callback"] = slowly
        return self.client.upload_file(path, bucket, key, **kw)

    def put_object(self, **kw):
        self.writes.append(kw["Key"])
        return self.client.put_object(**kw)


def keys(mirror: Mirror) -> list[str]:
    return sorted(mirror.objects())


def test_upload_marker_last_and_keep_last(s3_bucket, tmp_path):
    """Each checkpoint: its file, then its marker (listing the file and its size); after the
    marker only the newest keep_last=2 complete ones stay."""
    url = f"{s3_bucket}/runs/a"
    mirror = Mirror(url, keep_last=2)
    mirror.client = Recording(mirror.client)
    for step in (1, 2, 3, 4):
        path = save_checkpoint(tmp_path, step, state(step), keep_last=3)
        mirror.submit(Upload(step, path, sharded=False))
        assert mirror.wait(60)
    assert keys(mirror) == ["checkpoint-00000003.complete.json", "checkpoint-00000003.pt",
                            "checkpoint-00000004.complete.json", "checkpoint-00000004.pt"]
    writes = [k.removeprefix("runs/a/") for k in mirror.client.writes]
    assert writes[-2:] == ["checkpoint-00000004.pt", "checkpoint-00000004.complete.json"]  # the marker last
    manifest = mirror.get_json("checkpoint-00000004.complete.json")
    assert manifest["files"] == {"checkpoint-00000004.pt": (tmp_path / "checkpoint-00000004.pt").stat().st_size}
    assert manifest["step"] == 4 and manifest["format"] == "torch.save"


def test_training_never_waits_for_an_upload_and_the_end_waits_bounded(s3_bucket, tmp_path, caplog):
    """`save` returns while the upload is held back; `wait` gives up after its timeout, said once."""
    hold = threading.Event()
    mirror = Mirror(f"{s3_bucket}/p")
    mirror.client = Recording(mirror.client, hold=hold)
    ckpt = MirroredCheckpointer(TorchSaveCheckpointer(tmp_path, True), mirror, wait_s=0.3)
    model = torch.nn.Linear(3, 2)
    ckpt.save(5, model, torch.optim.SGD(model.parameters(), lr=0.1), {"train_state": {}})
    assert (tmp_path / "checkpoint-00000005.pt").is_file() and keys(mirror) == []
    with caplog.at_level(logging.WARNING, "simmim"):
        ckpt.wait()
    assert "checkpoint-00000005 still uploading after run.mirror_wait_s=0.3 s" in caplog.text
    hold.set()
    assert mirror.wait(60) and "checkpoint-00000005.complete.json" not in keys(mirror)  # abandoned: no marker


def test_a_timed_out_wait_stops_the_transfer(s3_bucket, tmp_path, caplog):
    """run.mirror_wait_s caps the exit: once `wait` gives up, the slow transfer stops at its next
    chunk (s3transfer's pool threads are joined at interpreter exit: one left running would hold
    the process until it ends), leaves no marker, and the next checkpoint goes up as usual."""
    mirror = Mirror(f"{s3_bucket}/p")
    mirror.client = Recording(mirror.client, slow_s=0.05)
    big = tmp_path / "checkpoint-00000003.pt"
    big.write_bytes(os.urandom(8 << 20))  # 8 MB: hundreds of chunks, minutes at the pause per chunk
    mirror.submit(Upload(3, big, sharded=False))
    with caplog.at_level(logging.INFO, "simmim"):
        assert not mirror.wait(0.5)
        assert mirror.wait(120)  # the thread is idle again: the transfer stopped
    assert 0 < sum(mirror.client.sent) < big.stat().st_size  # stopped mid-file, not run to its end
    assert "failed" not in caplog.text and keys(mirror) == []  # said once (by wait), no marker
    mirror.client.slow_s = 0
    mirror.submit(Upload(4, save_checkpoint(tmp_path, 4, state(4)), sharded=False))
    assert mirror.wait(60) and "checkpoint-00000004.complete.json" in keys(mirror)


def test_failed_upload_is_a_warning_and_the_next_checkpoint_goes_up(s3_bucket, tmp_path, caplog):
    mirror = Mirror(f"{s3_bucket}/p")
    mirror.client = Recording(mirror.client, fail="checkpoint-00000001")
    first = save_checkpoint(tmp_path, 1, state(1))
    with caplog.at_level(logging.WARNING, "simmim"):
        mirror.submit(Upload(1, first, sharded=False))
        assert mirror.wait(60)
    assert "uploading checkpoint-00000001 failed (EndpointConnectionError" in caplog.text
    assert "the local checkpoint is intact" in caplog.text and first.is_file()
    assert keys(mirror) == []  # no marker for it
    mirror.submit(Upload(2, save_checkpoint(tmp_path, 2, state(2)), sharded=False))
    assert mirror.wait(60)
    assert keys(mirror) == ["checkpoint-00000002.complete.json", "checkpoint-00000002.pt"]


def fake_dcp(folder: Path, ranks: list[int], metadata: bool) -> None:
    """The files one node's ranks write into a DCP folder (their shards; rank 0 the .metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    for r in ranks:
        (folder / f"__{r}_0.distcp").write_bytes(bytes([r]) * (1000 + r))
    if metadata:
        (folder / ".metadata").write_bytes(b"m" * 10)


def test_dcp_ranks_upload_their_own_shards_and_rank0_marks_after_all(s3_bucket, tmp_path):
    """Two ranks on two nodes without a shared file system: rank 0's node holds its shard and the
    .metadata, rank 1's node its shard alone. Each uploads its own files; the marker waits for
    rank 1's part."""
    url = f"{s3_bucket}/fsdp"
    fake_dcp(tmp_path / "node0" / "checkpoint-00000007", [0], metadata=True)
    fake_dcp(tmp_path / "node1" / "checkpoint-00000007", [1], metadata=False)
    rank0, rank1 = Mirror(url, 0, 2), Mirror(url, 1, 2)
    rank0.submit(Upload(7, tmp_path / "node0" / "checkpoint-00000007", sharded=True))
    time.sleep(1.0)
    assert not rank0.wait(0) and "checkpoint-00000007.complete.json" not in keys(rank0)  # waiting for rank 1
    rank1.submit(Upload(7, tmp_path / "node1" / "checkpoint-00000007", sharded=True))
    assert rank1.wait(60) and rank0.wait(60)
    assert keys(rank0) == ["checkpoint-00000007.complete.json", "checkpoint-00000007/.metadata",
                           "checkpoint-00000007/__0_0.distcp", "checkpoint-00000007/__1_0.distcp"]  # parts removed
    manifest = rank0.get_json("checkpoint-00000007.complete.json")
    assert manifest["files"] == {"checkpoint-00000007/.metadata": 10, "checkpoint-00000007/__0_0.distcp": 1000,
                                 "checkpoint-00000007/__1_0.distcp": 1001}
    # a fresh node (empty run folder) gets every rank's shards and the .metadata
    fresh = tmp_path / "node2"
    assert rank0.download(manifest, fresh) == 2011
    assert sorted(p.name for p in (fresh / "checkpoint-00000007").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                "__1_0.distcp"]


def test_a_rank_whose_upload_fails_leaves_no_marker(s3_bucket, tmp_path, caplog):
    url = f"{s3_bucket}/fsdp"
    fake_dcp(tmp_path / "checkpoint-00000003", [0, 1], metadata=True)  # a shared folder
    rank0, rank1 = Mirror(url, 0, 2), Mirror(url, 1, 2)
    rank1.client = Recording(rank1.client, fail="__1_")
    with caplog.at_level(logging.WARNING, "simmim"):
        for m in (rank0, rank1):
            m.submit(Upload(3, tmp_path / "checkpoint-00000003", sharded=True))
        assert rank1.wait(60) and rank0.wait(60)
    assert "checkpoint-00000003 not marked complete: rank 1's upload failed (EndpointConnectionError" in caplog.text
    assert not any(k.endswith(".complete.json") for k in keys(rank0))
    assert Mirror(url).newest_complete() is None  # never resumed from


def test_resume_takes_the_newest_complete_and_ignores_incomplete(s3_bucket, tmp_path, caplog):
    """Complete 2 and 3, then 5 uploaded without its marker (a node died mid-upload): an empty run
    folder gets checkpoint 3; 5's objects are removed at that start; one line says what was taken."""
    url = f"{s3_bucket}/run"
    mirror = Mirror(url)
    for step in (2, 3):
        mirror.submit(Upload(step, save_checkpoint(tmp_path / "old", step, state(step)), sharded=False))
        assert mirror.wait(60)
    partial = save_checkpoint(tmp_path / "old", 5, state(5))
    mirror.client.upload_file(str(partial), mirror.bucket, mirror.key(partial.name))
    out = tmp_path / "new"
    out.mkdir()
    with caplog.at_level(logging.INFO, "simmim"):
        restore_from_mirror(Mirror(url), out, ONE)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-00000003.pt"]
    assert (out / "checkpoint-00000003.pt").read_bytes() == (tmp_path / "old" / "checkpoint-00000003.pt").read_bytes()
    line = [r.getMessage() for r in caplog.records if "resuming from the mirror" in r.getMessage()]
    assert len(line) == 1 and f"checkpoint-00000003.pt from {url}" in line[0] and "newest: none" in line[0], line
    assert "checkpoint-00000005.pt" not in keys(mirror)  # the stale partial upload is cleaned at the start


def test_a_local_checkpoint_as_new_is_kept_and_a_newer_mirror_wins(s3_bucket, tmp_path):
    url = f"{s3_bucket}/run"
    mirror = Mirror(url)
    mirror.submit(Upload(4, save_checkpoint(tmp_path / "up", 4, state(4)), sharded=False))
    assert mirror.wait(60)
    out = tmp_path / "run"
    save_checkpoint(out, 6, state(6))  # newer than the mirror's (its upload was cut short): kept, nothing fetched
    restore_from_mirror(mirror, out, ONE)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-00000006.pt"]
    (out / "checkpoint-00000006.pt").rename(out / "checkpoint-00000002.pt")  # older than the mirror's
    restore_from_mirror(mirror, out, ONE)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-00000002.pt", "checkpoint-00000004.pt"]


def test_another_runs_mirror_is_refused_before_anything_is_downloaded(s3_bucket, tmp_path):
    url = f"{s3_bucket}/run"
    mirror = Mirror(url)
    mirror.submit(Upload(1, save_checkpoint(tmp_path / "a", 1, state(1)), sharded=False,
                         config={"model": {"arch": "swin_base"}, "run": {"out_dir": "a"}}))
    assert mirror.wait(60)
    out = tmp_path / "b"
    with pytest.raises(ConfigError, match=rf"^run.mirror '{url}' holds another run \(checkpoint-00000001.pt\): "
                                          r"model.arch 'swin_base' -> 'vit_base' cannot change on resume .*set another "
                                          r"run.mirror, or set them back"):
        restore_from_mirror(mirror, out, ONE, {"model": {"arch": "vit_base"}, "run": {"out_dir": "b"}})
    assert not out.exists()
    restore_from_mirror(mirror, out, ONE, {"model": {"arch": "swin_base"}, "run": {"out_dir": "b"}})  # the same run
    assert (out / "checkpoint-00000001.pt").is_file()
    # a run folder ahead of the mirror downloads nothing, but another run's mirror is still refused:
    # its uploads and keep-last-K would replace that run's checkpoints
    ahead = tmp_path / "c"
    save_checkpoint(ahead, 9, state(9))
    with pytest.raises(ConfigError, match=rf"^run.mirror '{url}' holds another run \(checkpoint-00000001.pt\)"):
        restore_from_mirror(mirror, ahead, ONE, {"model": {"arch": "vit_base"}, "run": {"out_dir": "c"}})
    assert mirror.marked(mirror.objects()) == [1]


RESTORE = """
import logging, os, sys
from pathlib import Path
import torch, torch.distributed as dist
from simmim.trainer.distributed import DistInfo
from simmim.trainer.mirror import Mirror, restore_from_mirror
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
restore_from_mirror(Mirror(sys.argv[1], rank, 2), Path(sys.argv[2 + rank]), DistInfo(rank, 0, 2, torch.device("cpu")))
dist.destroy_process_group()
"""


def test_two_nodes_without_a_shared_folder_resume_from_the_mirror(s3_bucket, tmp_path):
    """Two ranks, each its own node and run folder (local rank 0 both): node 0 has checkpoints 4
    and 6 (6 never reached the mirror), node 1 has none. Both resume from the mirror's 4: node 1
    downloads it, node 0 keeps its copy and sets 6 aside (node 1 cannot have it)."""
    url = f"{s3_bucket}/run"
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    mirror = Mirror(url)
    mirror.submit(Upload(4, save_checkpoint(node0, 4, state(4)), sharded=False))
    assert mirror.wait(60)
    save_checkpoint(node0, 6, state(6))
    script = tmp_path / "restore.py"
    script.write_text(RESTORE)
    env = {**run_sh_env(2), "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), url, str(node0), str(node1)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    out = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], out
    assert sorted(p.name for p in node0.iterdir()) == ["checkpoint-00000004.pt", "checkpoint-00000006.pt.local-only"]
    assert sorted(p.name for p in node1.iterdir()) == ["checkpoint-00000004.pt"]
    assert "checkpoint-00000006.pt is newer than the mirror's newest complete checkpoint" in out[0], out[0]
    assert "resuming from the mirror: checkpoint-00000004.pt" in out[0] and "step 6 (not on every rank)" in out[0]


def test_dcp_checkpoint_round_trip_through_the_mirror(s3_bucket, tmp_path):
    """A real DCP checkpoint (train.parallel=fsdp's format, one process): uploaded through the
    checkpointer, restored into an empty run folder, read and loaded as a local one."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    mirror = Mirror(f"{s3_bucket}/dcp")
    ckpt = MirroredCheckpointer(DCPCheckpointer(tmp_path / "a", True), mirror, wait_s=60)
    ckpt.save(9, model, opt, {"train_state": {"epoch": 1}})
    ckpt.wait()
    assert "checkpoint-00000009.complete.json" in keys(mirror)
    out = tmp_path / "b"
    restore_from_mirror(Mirror(f"{s3_bucket}/dcp"), out, ONE)
    contents = read_checkpoint(out / "checkpoint-00000009")
    assert contents.format == "dcp" and contents.train["train_state"] == {"epoch": 1}
    assert all(torch.equal(contents.model[k], v) for k, v in model.state_dict().items())
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    DCPCheckpointer(out, True).load(read_checkpoint(out / "checkpoint-00000009", tensors=False), fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_an_async_dcp_save_is_uploaded_once_written(s3_bucket, tmp_path):
    """run.async_save: the upload thread waits for DCP's write to finish before it reads the files."""
    model = torch.nn.Linear(4, 2)
    mirror = Mirror(f"{s3_bucket}/async")
    ckpt = MirroredCheckpointer(DCPCheckpointer(tmp_path, True, async_save=True), mirror, wait_s=60)
    ckpt.save(3, model, torch.optim.SGD(model.parameters(), lr=0.1), {"train_state": {}})
    ckpt.wait()
    files = mirror.get_json("checkpoint-00000003.complete.json")["files"]
    assert files == {f"checkpoint-00000003/{p.name}": p.stat().st_size for p in (tmp_path / "checkpoint-00000003").iterdir()}


def test_a_node_without_rank_0s_folder_publishes_its_own_share(tmp_path):
    """No shared file system: on another node than rank 0's, nobody renamed DCP's `.tmp` folder
    (their shards stayed in it, one per save, never pruned). Its local rank 0 publishes and prunes
    its node's share, and removes a killed save's `.tmp`."""
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / ".checkpoint-00000001.tmp").mkdir(parents=True)  # a killed save's
    node = DCPCheckpointer(tmp_path, is_main=False, keep_last=2, node_main=True)
    for step in (2, 3, 4):
        node.save(step, model, opt, {"train_state": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003", "checkpoint-00000004"]


def test_preflight_names_the_url_and_what_to_do(s3_bucket, monkeypatch):
    check_mirror(f"{s3_bucket}/ok")  # reachable and writable: nothing said
    with pytest.raises(ConfigError, match=r"^run.mirror 's3://no-such-bucket-x/p' cannot be written \(NoSuchBucket"):
        check_mirror("s3://no-such-bucket-x/p")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConfigError, match=r"cannot be written \(EndpointConnectionError.*AWS_ENDPOINT_URL"):
        check_mirror(f"{s3_bucket}/p")
    with pytest.raises(ConfigError, match=r"config key 'run.mirror' must be empty or s3://bucket/prefix"):
        load_config("demo", ["run.mirror=/local/folder"])


def test_a_bad_mirror_stops_the_command_before_anything_is_written(s3_bucket, sample_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "simmim.trainer.cli", "pretrain", "--config", "demo",
                           f"data.path={sample_root}/train", f"run.out_dir={out}", "run.mirror=s3://no-such-bucket-q/r"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("simmim pretrain: error: run.mirror 's3://no-such-bucket-q/r' cannot be written "
                                "(NoSuchBucket"), lines[-3:]
    assert not any("Found credentials" in line or "endpoint for s3" in line for line in lines), lines  # boto3's
    assert not out.exists()


def test_no_credentials_is_one_line(s3_bucket, monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match=r"cannot be written \(NoCredentialsError.*AWS_ACCESS_KEY_ID"):
        check_mirror(f"{s3_bucket}/p")


def test_a_failed_download_is_one_line(s3_bucket, tmp_path):
    mirror = Mirror(f"{s3_bucket}/run")
    mirror.submit(Upload(1, save_checkpoint(tmp_path / "a", 1, state(1)), sharded=False))
    assert mirror.wait(60)
    mirror.delete(["checkpoint-00000001.pt"])  # the marker stays: an object deleted by hand
    with pytest.raises(CheckpointError, match=r"cannot download s3://.*/run/checkpoint-00000001.pt \("):
        restore_from_mirror(mirror, tmp_path / "b", ONE)
    assert not any((tmp_path / "b").glob("*checkpoint*"))  # nothing half-written left


# ---------------------------------------------------------------- a whole run: 2 ranks over gloo, SIGTERM, resume
RUN_SH = Path(__file__).resolve().parents[1] / "trainer" / "run.sh"
TINY = ["--config", "demo", "data.val_path=", "data.img_size=64", "data.num_workers=0", "model.arch=swin_micro",
        "model.window_size=2", "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1", "run.log_every=1",
        "data.batch_size=4", "train.epochs=2", "run.save_every=1", "run.stop_check_every=1", "data.backend=torch"]


def start_run(sample_root, out, *extra):
    return subprocess.Popen(["bash", str(RUN_SH), *TINY, f"data.path={sample_root}/train", f"run.out_dir={out}",
                             *extra], env=run_sh_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def losses(out: Path) -> dict[int, float]:
    import json
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def shard_to_s3(sample_root, url: str) -> list[str]:
    """`simmim shard` of the sample set into the bucket; the options that train from it."""
    proc = subprocess.run([sys.executable, "-m", "simmim.trainer.cli", "shard", f"{sample_root}/train", url,
                           "--shard-size", "200kb", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return ["data.backend=stream", f"data.path={url}", "data.stream.canonical_nodes=4", "data.stream.predownload=8"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel,backend", [("ddp", "torch"), ("fsdp", "torch"), ("ddp", "stream")])
def test_sigterm_then_resume_from_the_mirror_in_an_empty_folder(sample_root, s3_bucket, tmp_path, parallel, backend):
    """The issue's case: 2 ranks over gloo upload each checkpoint to the mirror; SIGTERM mid-epoch
    (the stop checkpoint is uploaded and marked before the ranks exit); a new job in a NEW EMPTY run
    folder (and, reading shards from the bucket, an empty shard cache: another machine) resumes
    from the mirror and gives the uninterrupted run's per-step losses."""
    data = shard_to_s3(sample_root, f"{s3_bucket}/shards/train") if backend == "stream" else []

    def run_sh(sample_root, out, *extra):  # each run its own shard cache, as on its own machine
        cache = [f"data.stream.cache_dir={out}-cache"] if backend == "stream" else []
        return start_run(sample_root, out, *data, *cache, *extra)

    par = f"train.parallel={parallel}"
    ref = tmp_path / "uninterrupted"
    proc = run_sh(sample_root, ref, par)
    text = run_until(proc, "no such line", lambda: None, timeout=600)
    assert proc.returncode == 0, text[-4000:]

    url = f"{s3_bucket}/run"
    first = tmp_path / "first"
    proc = run_sh(sample_root, first, par, f"run.mirror={url}", "run.keep_last=1")
    text = run_until(proc, "epoch 1 step 9 ", lambda: os.killpg(proc.pid, signal.SIGTERM), timeout=300)
    assert proc.returncode == 75, text[-4000:]
    assert "mirrored checkpoint-00000007" in text, text[-4000:]  # the epoch's checkpoint, during training
    stopped = max(losses(first)) + 1  # the stop checkpoint: the steps done
    assert f"mirrored checkpoint-{stopped:08d}" in text, text[-4000:]  # uploaded before the ranks exit
    assert Mirror(url).marked(Mirror(url).objects()) == [stopped]  # keep_last=1 there too: checkpoint 7 deleted
    assert "Found credentials" not in text and "Traceback" not in text, text[-4000:]

    second = tmp_path / "second"  # another machine: an empty run folder
    proc = run_sh(sample_root, second, par, f"run.mirror={url}")
    text = run_until(proc, "no such line", lambda: None, timeout=600)
    assert proc.returncode == 0, text[-4000:]
    assert f"resuming from the mirror: checkpoint-{stopped:08d}" in text, text[-4000:]
    assert "resuming from the mirror" in (second / "log.txt").read_text()  # in the new run folder's log too
    if backend == "stream":  # the shards came from the bucket, into this machine's own cache
        assert "data stream (PIL decoding in the DataLoader workers): " in text and any(Path(f"{second}-cache").rglob("shard.*.mds")), text[-4000:]
    a, b = losses(ref), {**{s: v for s, v in losses(first).items() if s < stopped}, **losses(second)}
    assert sorted(b) == sorted(a) == list(range(14)) and min(losses(second)) == stopped
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]  # the same per-step losses
    assert "checkpoint-00000014.complete.json" in keys(Mirror(url))


def test_a_run_whose_last_upload_failed_ends_with_status_3_and_a_rerun_uploads_it(s3_bucket, tmp_path, monkeypatch,
                                                                                 capsys):
    """The store unreachable for the run's uploads: the run does not say "finished" and exit 0 but
    ends with status 3 and one line naming the local checkpoint, the mirror and what to do;
    run.mirror_allow_missing=true accepts it; the same command again, the store back, uploads it."""
    from test_train import TINY, noise_pngs

    from simmim.trainer.cli import main
    url, out = f"{s3_bucket}/run", tmp_path / "run"
    args = ["pretrain", "--config", "demo", f"data.path={noise_pngs(tmp_path / 'images', 8)}", f"run.out_dir={out}",
            *TINY, "data.batch_size=4", "train.epochs=1", "train.warmup_epochs=0", "train.device=cpu",
            "run.knn_every=0", f"run.mirror={url}"]
    real_upload = Mirror.upload

    def unreachable(self, up):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    monkeypatch.setattr(Mirror, "upload", unreachable)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 3, err
    ckpt = out / "checkpoint-00000002.pt"
    assert f"error: the newest checkpoint {ckpt} is not in run.mirror {url}" in err and "run the same command" in err
    main([*args, "run.mirror_allow_missing=true"])  # accepted: no exit status
    monkeypatch.setattr(Mirror, "upload", real_upload)
    main(args)  # finished, but its checkpoint goes up first
    assert "checkpoint-00000002.complete.json" in keys(Mirror(url))
