"""`simmim shard` and `data.backend: stream` (issue 27, item 4): shards in a local folder and in a
local S3-compatible server (moto, `s3_bucket`), the stream loader's views against the torch
backend's, its order for any world size and worker count, exact mid-epoch resume, a cache smaller
than the data, and a missing shard named in one line (by the loader and by a run, after its
checkpoint)."""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("streaming", reason="the stream extra (pip install -e '.[stream]')")

from simmim.pipeline import Augmentation, LoaderSpec, MaskGenerator, build_loader  # noqa: E402
from simmim.pipeline.augment import normalize  # noqa: E402
from simmim.core.errors import ConfigError, DatasetError, ShardError  # noqa: E402
from simmim.pipeline.folder import ImageFolder  # noqa: E402
from simmim.pipeline.options import StreamOptions  # noqa: E402
from simmim.core.seeding import derive_seed  # noqa: E402
from simmim.pipeline import shards as shards_mod  # noqa: E402
from simmim.pipeline.shards import shard_command  # noqa: E402

AUG = Augmentation(size=64)
SHARD = "200kb"  # the 60 sample JPEGs (~30 KB each) in 11 shards


@pytest.fixture(scope="module")
def shards(sample_root, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("shards") / "train"
    shard_command(str(sample_root / "train"), str(dest), SHARD, workers=1, progress=False)
    return dest


def loader(path, batch_size=4, workers=0, masks=None, rank=0, world_size=1, seed=3, train=True, dali=None, **stream):
    spec = LoaderSpec("stream", str(path), AUG, batch_size, workers, train=train, drop_last=train,
                      stream=StreamOptions(**{"canonical_nodes": 4, **stream}), **({"dali": dali} if dali else {}))
    return build_loader(spec, masks, "cpu", rank, world_size, seed)


def epoch(ld, e, start=0):
    ld.set_epoch(e, start)
    return list(ld)


def test_shard_stores_each_file_as_it_is_with_its_index_and_label(sample_root, shards):
    from streaming import StreamingDataset

    meta = json.loads((shards / "simmim.json").read_text())
    files = ImageFolder(sample_root / "train", AUG).samples
    assert meta["samples"] == len(files) == 60 and len(meta["classes"]) == 5
    assert meta["fingerprint"] == files.fingerprint()  # the torch backend's over the same list
    assert sorted(p.name for p in shards.iterdir())[-2:] == ["shard.00010.mds", "simmim.json"]
    ds = StreamingDataset(local=str(shards), batch_size=1)
    for i in (0, 17, 59):
        s = ds[i]
        path, label = files[i]
        assert s["image"] == Path(path).read_bytes() and int(s["index"]) == i and int(s["label"]) == label


def test_shard_leaves_out_a_broken_file_and_says_so(sample_root, tmp_path, caplog):
    src = tmp_path / "src"
    shutil.copytree(sample_root / "train", src)
    bad = next((src / "n01_people").iterdir())
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    with caplog.at_level(logging.WARNING):
        meta = shard_command(str(src), str(tmp_path / "out"), SHARD, workers=1, progress=False)
    assert meta["samples"] == 59 and any(bad.name in r.getMessage() for r in caplog.records)


def test_shard_an_unlabeled_list_and_label_batches_of_a_labeled_set(sample_root, shards, tmp_path):
    from streaming import StreamingDataset

    files = ImageFolder(sample_root / "train", AUG).samples
    listed = tmp_path / "unlabeled.txt"
    listed.write_text("".join(f"{files[i][0]}\n" for i in range(0, 60, 5)))  # bare paths: no labels
    meta = shard_command(str(listed), str(tmp_path / "out"), SHARD, workers=1, progress=False)
    sample = StreamingDataset(local=str(tmp_path / "out"), batch_size=1)[3]
    assert meta["classes"] == [] and "label" not in sample and sample["image"] == Path(files[15][0]).read_bytes()
    spec = LoaderSpec("stream", str(shards), AUG, 6, 0, train=False, drop_last=False, labels=True)
    ld = build_loader(spec, None, "cpu")
    assert ld.classes == ImageFolder(sample_root / "train", AUG).classes
    labels = torch.cat([b[1] for b in epoch(ld, 0)])
    assert labels.tolist() == [int(x) for x in files.labels]


def test_shard_command_line_says_one_line_for_a_complete_set(sample_root, shards, simmim_cmd):
    r = subprocess.run([*simmim_cmd, "shard", str(sample_root / "train"), str(shards)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("pass --overwrite to replace it"), \
        r.stderr[-2000:]


def test_an_interrupted_shard_run_never_looks_complete_and_is_cleaned(sample_root, tmp_path, monkeypatch, caplog):
    dest = tmp_path / "out"
    put = shards_mod.ShardDest.put

    def dies_after_three(self, name):
        if len(list(dest.glob("shard.*"))) == 3:
            raise KeyboardInterrupt
        put(self, name)

    monkeypatch.setattr(shards_mod.ShardDest, "put", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        shard_command(str(sample_root / "train"), str(dest), SHARD, workers=1, progress=False)
    assert not (dest / "index.json").exists() and list(dest.glob("shard.*"))
    with pytest.raises(DatasetError, match="not a complete shard set"):
        loader(dest)
    monkeypatch.setattr(shards_mod.ShardDest, "put", put)
    with caplog.at_level(logging.WARNING):
        assert shard_command(str(sample_root / "train"), str(dest), SHARD, workers=1, progress=False)["samples"] == 60
    assert any("partial" in r.getMessage() for r in caplog.records)
    with pytest.raises(DatasetError, match="--overwrite"):
        shard_command(str(sample_root / "train"), str(dest), SHARD, workers=1, progress=False)


def test_stream_views_are_the_torch_backends_for_each_sample(sample_root, shards):
    """Every training view equals, bit for bit, the torch backend's view of one sample (its index
    keys the crop), and each sample is seen once in the epoch."""
    got = torch.cat([b[0] for b in epoch(loader(shards), 2)])
    ds = ImageFolder(sample_root / "train", AUG)
    ref = normalize(torch.stack([ds[(i, derive_seed("sample", 3, 2, i))][0] for i in range(len(ds))]), AUG.mean,
                    AUG.std)
    match = [[j for j in range(len(ref)) if torch.equal(img, ref[j])] for img in got]
    assert all(len(m) == 1 for m in match) and len({m[0] for m in match}) == len(got) == 60


def test_resume_mid_epoch_gives_the_remaining_batches_with_other_workers(shards):
    masks = MaskGenerator(64, 32, 0.6)
    full = epoch(loader(shards, masks=masks), 1)
    rest = epoch(loader(shards, masks=masks, workers=2), 1, start=6)
    assert len(full) == 15 and len(rest) == 9
    for a, b in zip(full[6:], rest):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(full[0][0], epoch(loader(shards), 2)[0][0])  # another epoch, another order


def test_persistent_workers_follow_any_epoch_sequence(shards):
    """Epochs run again, skipped, or left after two batches: 2 persistent workers give what the
    main process gives for each (epoch, start), never the epoch streaming would count itself."""
    workers, main = loader(shards, workers=2, seed=1), loader(shards, seed=1)
    it = iter(workers.set_epoch(6) or workers)
    next(it), next(it)
    del it
    for e, start in [(2, 0), (2, 0), (0, 3), (7, 0)]:
        got, want = epoch(workers, e, start), epoch(main, e, start)
        assert len(got) == len(want) == 15 - start and all(torch.equal(a[0], b[0]) for a, b in zip(got, want))


def test_evaluation_view_reads_every_sample_once(sample_root, shards):
    ld = loader(shards, batch_size=7, train=False)
    got = torch.cat([b[0] for b in epoch(ld, 0)])
    ref = ImageFolder(sample_root / "train", AUG, train=False)
    assert len(got) == 60 and torch.equal(got[13], normalize(ref[(13, 0)][0][None], AUG.mean, AUG.std)[0])


def test_missing_shard_is_one_line_naming_it(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "shard.00003.mds").unlink()
    with pytest.raises(ShardError, match=r"^shard shard\.00003\.mds of .*broken is missing; write the set again"):
        epoch(loader(broken), 0)


def test_a_missing_shard_with_workers_is_one_line(shards, tmp_path):
    """With 2 DataLoader workers, the worker whose samples wait on the shard the other one failed
    on used to wait forever (streaming leaves it marked as being downloaded), and the DataLoader
    with it. (A later epoch of the same loader, which a run never starts after this error, is not
    checked: it can still wait.)"""
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "shard.00003.mds").unlink()
    script = (f"from test_stream import loader, epoch\nfrom simmim.core.errors import ShardError\n"
              f"ld = loader({str(broken)!r}, workers=2)\n"
              f"try:\n    epoch(ld, 0)\nexcept ShardError as x:\n    print('epoch 0', x, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.count("shard.00003.mds of") == 1 and out.stdout.count(" is missing; write the set again") == 1, \
        out.stdout + out.stderr[-2000:]


TINY = ["data.backend=stream", "data.val_path=", "data.img_size=64", "data.batch_size=8", "data.num_workers=0",
        "model.arch=swin_micro", "model.window_size=2", "run.progress=false", "run.vis_every=100",
        "train.warmup_epochs=1", "run.log_every=1", "run.knn_every=0", "data.stream.canonical_nodes=4",
        "data.stream.predownload=8"]


def test_a_run_that_loses_a_shard_stops_with_one_line_after_its_checkpoint(shards, tmp_path):
    """Epoch 0 trains from the shards; one is deleted; the resumed run stops in epoch 1 with one
    line naming it and the checkpoint that holds the steps before it (no `simmim scan` advice)."""
    from simmim.trainer.checkpoint_reader import read_checkpoint
    from simmim.trainer.config import load_config
    from simmim.trainer.pretrain import pretrain

    data, out = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(shards, data)
    args = [f"data.path={data}", f"run.out_dir={out}", *TINY]
    pretrain(load_config("demo", [*args, "train.epochs=1"]))
    (data / "shard.00006.mds").unlink()
    with pytest.raises(DatasetError) as e:
        pretrain(load_config("demo", [*args, "train.epochs=2"]))
    msg = str(e.value)
    assert "shard shard.00006.mds of" in msg and "is missing" in msg and "simmim scan" not in msg, msg
    saved = msg.split("saved in ")[1].split(":")[0]
    state = read_checkpoint(Path(saved), tensors=False).train["train_state"]
    assert state["epoch"] == 1 and f"at step {state['step_in_epoch']} of epoch 1" in msg


def test_pretrain_reads_shards_from_s3_and_refuses_a_url_elsewhere(sample_root, s3_bucket, tmp_path):
    from simmim.trainer.config import load_config
    from simmim.trainer.pretrain import pretrain

    url = f"{s3_bucket}/train"
    shard_command(str(sample_root / "train"), url, SHARD, workers=1, progress=False)
    args = [f"data.path={url}", f"run.out_dir={tmp_path / 'run'}", *TINY, "train.epochs=1",
            f"data.stream.cache_dir={tmp_path / 'cache'}"]
    pretrain(load_config("demo", args))
    assert (tmp_path / "run" / "checkpoint-00000007.pt").exists()  # 60 images, batch 8: 7 steps
    with pytest.raises(DatasetError, match="only data.backend=stream reads from an object store"):
        pretrain(load_config("demo", [*args, "data.backend=torch", f"run.out_dir={tmp_path / 'run2'}"]))
    with pytest.raises(DatasetError, match="not a complete shard set"):
        pretrain(load_config("demo", [*args, f"data.path={s3_bucket}/nothing", f"run.out_dir={tmp_path / 'run3'}"]))


def test_shards_in_s3_train_like_local_ones_within_a_small_cache(sample_root, shards, s3_bucket, tmp_path):
    """Sharded into the local S3 server, read back through a cache of 1.2 MB (the set is ~2 MB): the
    same batches as from the local folder; the cache never held the whole set."""
    url = f"{s3_bucket}/imagenet/train"
    shard_command(str(sample_root / "train"), url, SHARD, workers=1, progress=False)
    cache = tmp_path / "cache"
    # 6 of the 11 shards fit: what one worker with predownload 4 can need at once (the check's floor)
    small = dict(cache_dir=str(cache), shuffle_block_size=16, predownload=4)
    remote = epoch(loader(url, cache_limit="1.2mb", **small), 1)
    local = epoch(loader(shards, shuffle_block_size=16), 1)
    assert len(remote) == len(local) == 15 and all(torch.equal(a[0], b[0]) for a, b in zip(remote, local))
    held = sum(f.stat().st_size for f in cache.glob("*/shard.*"))  # cache/<the set's digest>/
    sizes = [f.stat().st_size for f in shards.glob("shard.*")]
    # streaming evicts before each download; two downloads racing can overshoot by a shard
    assert held <= int(1.2 * (1 << 20)) + 2 * max(sizes) and held < sum(sizes)  # its accounting races by a shard or two
    with pytest.raises(ConfigError, match=r"data.stream.cache_limit=100kb is too small .* 6 shards .* least 1.2mb"):
        loader(url, cache_limit="100kb", **small)


def test_a_cache_that_can_stall_streaming_is_refused_in_one_line(shards):
    """The configuration that once stalled a run here (5 shards' worth of cache, 4 canonical nodes,
    streaming's default shuffle block, predownload = the batch) and the default predownload through
    the same cache: refused when the loader is built, before any batch, naming the option, the
    minimum and both ways out; one worker more than the floor allows is refused too."""
    five = str(5 * max(f.stat().st_size for f in shards.glob("shard.*")) + 4096)
    for extra in ({"predownload": 4}, {"shuffle_block_size": 16}):
        with pytest.raises(ConfigError) as e:
            loader(shards, cache_limit=five, **extra)
        text = str(e.value)
        assert "\n" not in text and f"data.stream.cache_limit={five} is too small" in text
        assert "raise it to at least" in text and "lower data.stream.shuffle_block_size" in text
    enough = str(6 * max(f.stat().st_size for f in shards.glob("shard.*")) + 4096)
    loader(shards, cache_limit=enough, predownload=4, shuffle_block_size=16)  # one worker: 6 shards
    with pytest.raises(ConfigError, match=r"can need 11 shards"):
        loader(shards, cache_limit=enough, predownload=4, shuffle_block_size=16, workers=2)


def test_a_set_written_again_is_never_read_from_the_old_cache(sample_root, s3_bucket, tmp_path):
    """The same URL and cache folder, the set replaced (`--overwrite`) by other images: the loader
    reads the new set (its own cache subfolder), not the shards cached for the old one."""
    url, cache = f"{s3_bucket}/data", str(tmp_path / "cache")
    shard_command(str(sample_root / "train"), url, SHARD, workers=1, progress=False)
    assert len(epoch(loader(url, cache_dir=cache), 0)) == 15
    shard_command(str(sample_root / "val"), url, SHARD, workers=1, progress=False, overwrite=True)
    new = loader(url, batch_size=1, cache_dir=cache, train=False)
    got = torch.cat([b[0] for b in epoch(new, 0)])
    ref = ImageFolder(sample_root / "val", AUG, train=False)
    assert new.num_samples == len(ref) == len(got)
    assert torch.equal(got[0], normalize(ref[(0, 0)][0][None], AUG.mean, AUG.std)[0])


def test_shard_into_a_missing_bucket_is_one_line(sample_root, s3_bucket):
    with pytest.raises(DatasetError, match="cannot write to s3://no-such-bucket-here/x"):
        shard_command(str(sample_root / "train"), "s3://no-such-bucket-here/x", SHARD, workers=1, progress=False)


def test_a_failed_upload_is_one_line_and_leaves_no_index(sample_root, s3_bucket, monkeypatch):
    """An upload refused half-way (here: the server's answer for a missing bucket, from shard 3 on)."""
    from botocore.exceptions import ClientError
    from streaming.base.storage.upload import S3Uploader

    upload = S3Uploader.upload_file

    def refused(self, name):
        if name >= "shard.00003":
            raise ClientError({"Error": {"Code": "NoSuchBucket", "Message": "gone"}}, "PutObject")
        upload(self, name)

    monkeypatch.setattr(S3Uploader, "upload_file", refused)
    with pytest.raises(DatasetError, match=r"cannot write the shard set to s3://.*NoSuchBucket.*run the same command"):
        shard_command(str(sample_root / "train"), f"{s3_bucket}/x", SHARD, workers=1, progress=False)
    with pytest.raises(DatasetError, match="not a complete shard set"):
        loader(f"{s3_bucket}/x")


RANK = """
import os, sys, torch
import torch.distributed as dist
dist.init_process_group("gloo")
sys.path.insert(0, {tests!r})
from test_stream import loader, epoch
from simmim.pipeline import MaskGenerator
ld = loader({path!r}, batch_size=2, workers=int(sys.argv[1]), masks=MaskGenerator(64, 32, 0.6),
            rank=dist.get_rank(), world_size=2)
torch.save([b[:2] for b in epoch(ld, 1, start=2)], sys.argv[2] + f".{{dist.get_rank()}}")
"""


def test_mask_slots_follow_streamings_layout_of_nodes_and_ranks():
    """Rank g's j-th sample of each batch sits at slot(g) + world_size * j of the global batch, in
    streaming's own partition (2 nodes x 2 ranks: slots 0, 2, 1, 3), so `GlobalBatchMasks` gives
    each sample the mask of its place in the global sequence whatever the world size."""
    from streaming.base.partition.orig import get_partitions_orig

    from simmim.pipeline.stream_loader import mask_slot

    seq = get_partitions_orig(64, 4, 1, 1, 1, 8).reshape(-1)  # one process, the global batch of 8
    parts = get_partitions_orig(64, 4, 2, 2, 1, 2)  # (nodes, ranks per node, workers, batches, batch)
    assert [mask_slot(g, 2, 2) for g in range(4)] == [0, 2, 1, 3]
    for g in range(4):
        batches = parts[g // 2, g % 2, 0]
        for k, batch in enumerate(batches):
            assert batch.tolist() == [seq[8 * k + mask_slot(g, 2, 2) + 4 * j] for j in range(2)]


@pytest.mark.slow  # two ranks over gloo, ~25 s on a loaded 2-core machine
def test_order_and_masks_do_not_depend_on_world_size(shards, tmp_path):
    """2 ranks (torchrun's environment, one node) with batch 2 and a worker each read, step by step,
    the same global batches of 4 (images and masks) as one process with batch 4, from a mid-epoch
    start. (Two nodes cannot be simulated on one host: streaming shares its state per host.)"""
    script = tmp_path / "rank.py"
    script.write_text(RANK.format(tests=str(Path(__file__).parent), path=str(shards)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), "1", str(tmp_path / "b")], env=env,
                                      stderr=subprocess.PIPE, text=True))
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
    finally:
        for p in procs:  # a rank left waiting for the other must not outlive the test
            p.kill()
    ranks = [torch.load(tmp_path / f"b.{r}", weights_only=True) for r in range(2)]
    one = epoch(loader(shards, batch_size=4, masks=MaskGenerator(64, 32, 0.6)), 1, start=2)
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 13
    for k, (images, masks) in enumerate(one):  # rank r holds slots r, r + 2 of each global batch (`mask_slot`)
        for r in range(2):
            assert torch.equal(ranks[r][k][0], images[r::2]) and torch.equal(ranks[r][k][1], masks[r::2])


def test_knn_monitor_with_shards_is_one_warning(shards, tmp_path, caplog):
    """run.knn_every with data.backend=stream: the monitor reads image files, so no monitor and one
    warning saying what it needs (it looked for images in the shard folder and stopped the run)."""
    from helpers import knn_monitor_warnings

    monitor, said = knn_monitor_warnings("stream", shards, tmp_path, caplog)
    assert monitor is None and len(said) == 1 and "\n" not in said[0]
    assert "no k-NN evaluation" in said[0] and "shards" in said[0] and "class folders" in said[0]


def test_loaders_bench_streams_from_a_folder_and_its_own_local_s3_server(sample_root, tmp_path):
    """`simmim bench loaders --backends stream`: ours and streaming's plain pipeline on the same
    shards, local and through the moto server the benchmark starts; every loader reads every batch."""
    from simmim.benchmarks import loaders

    out = loaders.main(["--data", str(sample_root / "train"), "--size", "64", "--batch", "4", "--workers", "1",
                        "--rounds", "1", "--backends", "stream", "--out", str(tmp_path)])
    rows = {r["loader"]: r for r in out["rows"]}
    assert list(rows)[2:] == ["stream (plain)", "stream", "stream dali", "stream s3 (plain)", "stream s3", "stream s3 dali"]
    assert rows["stream s3 dali"]["plain"] == "stream s3 (plain)"
    assert all(r["images"] == 60 for r in rows.values())
    assert rows["stream s3"]["plain"] == "stream s3 (plain)" and "x plain" in rows["stream s3"]["ratios"]
    assert "S3_ENDPOINT_URL" not in os.environ  # the benchmark's server and environment are gone
