"""FFCV: `simmim convert` / `inspect`, the FFCV loader, and our traversal orders."""
import json
import re
import threading

import numpy as np
import pytest
import torch

from simmim.core.errors import DatasetError
from simmim.pipeline import Augmentation, MaskGenerator, ReferenceLoader, ShardedSampler
from simmim.pipeline.convert import convert, inspect  # noqa: E402
from simmim.pipeline.ffcv_loader import ShardedOrder
from simmim.pipeline.ffcv_loader import FFCVLoader  # noqa: E402

from helpers import HOSTILE_BAD, HOSTILE_GOOD, assert_same_augmentation, loader_crop_stats, make_loader

ffcv = pytest.importorskip("ffcv")


@pytest.fixture(scope="module")
def sample_beton(sample_root, tmp_path_factory):
    dst = tmp_path_factory.mktemp("beton") / "train.beton"
    convert(str(sample_root / "train"), str(dst), workers=2, progress=False)
    return dst


def test_convert_sample(sample_root, sample_beton):
    report = json.loads(sample_beton.with_name("train.report.json").read_text())
    classes = json.loads(sample_beton.with_name("train.classes.json").read_text())
    n = sum(1 for _ in (sample_root / "train").rglob("*.JPEG"))
    assert report["written"] == n and report["bad"] == 0 and report["images_per_sec"] > 0
    assert classes == sorted(d.name for d in (sample_root / "train").iterdir())
    info = inspect(str(sample_beton), workers=2)
    assert info["samples"] == n and info["classes"] == len(classes) and info["decode_failures"] == []
    assert info["labels"]["distinct"] == len(classes) and info["longer_side"]["max"] <= 256
    assert info["jpeg_fraction"] == 1.0


@pytest.mark.slow
def test_convert_hostile(hostile, tmp_path):
    dst = tmp_path / "out" / "h.beton"
    report = convert(str(hostile), str(dst), max_resolution=64, workers=2, progress=False)
    bad = {b["path"].split("/")[-1] for b in report["bad_files"]}
    assert bad == set(HOSTILE_BAD)
    assert report["written"] == len(HOSTILE_GOOD)
    saved = json.loads(dst.with_name("h.report.json").read_text())
    assert {b["path"].split("/")[-1] for b in saved["bad_files"]} == bad
    info = inspect(str(dst), workers=2)
    assert info["samples"] == len(HOSTILE_GOOD) and info["decode_failures"] == []
    assert info["longer_side"]["max"] <= 64 and info["width"]["min"] >= 1 and info["height"]["min"] >= 1
    # they load through the training pipeline too, extreme aspect ratios and 1x1 included
    loader = make_loader(FFCVLoader, str(dst), Augmentation(size=32), MaskGenerator(32, 32, 0.6), len(HOSTILE_GOOD), 1)
    images, masks = next(iter(loader))
    assert images.shape == (len(HOSTILE_GOOD), 3, 32, 32) and torch.isfinite(images).all()

    with pytest.raises(DatasetError, match="exists; pass --force"):
        convert(str(hostile), str(dst), workers=1, progress=False)
    with pytest.raises(DatasetError, match=r"cannot decode .*(\._ok|empty|text|truncated).JPEG"):
        convert(str(hostile), str(tmp_path / "f.beton"), workers=1, on_error="fail", progress=False)
    assert not (tmp_path / "f.beton").exists()


def test_convert_is_atomic(sample_root, tmp_path, monkeypatch):
    from simmim.pipeline.ffcv_writer import CheckedWriter

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckedWriter, "from_indexed_dataset", killed)
    with pytest.raises(KeyboardInterrupt):
        convert(str(sample_root / "val"), str(tmp_path / "v.beton"), workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # no DST, no temp file, no sidecars


def test_inspect_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        inspect(str(tmp_path / "missing.beton"))
    (tmp_path / "x.beton").write_bytes(b"not a beton" * 100)
    with pytest.raises(DatasetError, match="not an FFCV .beton"):
        inspect(str(tmp_path / "x.beton"))


@pytest.mark.slow
def test_loader_contract_and_epochs(sample_beton):
    aug = Augmentation(size=64)
    loader = make_loader(FFCVLoader, str(sample_beton), aug, MaskGenerator(64, 32, 0.6), 8, 2, order="quasi_random",
                        os_cache=False, buffer_pages=2, labels=True)
    n = loader.num_samples
    assert len(loader) == n // 8
    seen = 0
    for images, masks, labels in loader:
        assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert masks.shape == (8, 2, 2) and masks.dtype == torch.bool and int(masks[0].sum()) == 3
        assert labels.shape == (8,) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() < 5
        lo = (0 - max(aug.mean)) / min(aug.std)
        hi = (1 - min(aug.mean)) / min(aug.std)
        assert lo - 1e-4 <= images.min() and images.max() <= hi + 1e-4
        seen += 1
    assert seen == len(loader)
    loader.set_epoch(3, start_batch=len(loader) - 2)  # mid-epoch resume: the last two batches
    assert sum(1 for _ in loader) == 2

    # leaving epochs early (a benchmark, a preemption) leaks no producer thread and no batch memory
    import psutil

    threads = threading.active_count()
    rss = psutil.Process().memory_info().rss
    for epoch in range(12):
        loader.set_epoch(epoch)
        for k, _ in enumerate(loader):
            if k == 1:
                break
    assert threading.active_count() == threads
    assert psutil.Process().memory_info().rss - rss < 64 * 2**20


@pytest.mark.slow
def test_same_augmentation_as_reference(ramps, tmp_path):
    aug = Augmentation(size=48)
    beton = tmp_path / "ramps.beton"
    convert(str(ramps), str(beton), write_mode="raw", workers=2, progress=False)
    assert_same_augmentation(loader_crop_stats(make_loader(FFCVLoader, str(beton), aug, None, 16, 2), aug),
                             loader_crop_stats(make_loader(ReferenceLoader, str(ramps), aug, None, 16, 0), aug))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_random_order_matches_reference_sampler(world_size):
    for rank in range(world_size):
        order = ShardedOrder(103, rank, world_size, seed=5, mode="random")
        sampler = ShardedSampler(103, rank, world_size, seed=5)
        sampler.set_epoch(2)
        assert order.sample_order(2).tolist() == [i for i, _ in sampler]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_distributed_quasi_random(world_size):
    rng = np.random.default_rng(0)
    pages = np.repeat(np.arange(40), rng.integers(3, 12, 40))  # 40 pages of uneven size, in file order
    n = len(pages)
    orders = {}
    for epoch in range(3):
        parts = [ShardedOrder(n, r, world_size, 7, "quasi_random", pages, buffer_pages=4).sample_order(epoch)
                 for r in range(world_size)]
        assert all(len(p) == n // world_size for p in parts)  # same number of batches on every rank
        flat = np.concatenate(parts).astype(np.int64)
        assert len(np.unique(flat)) == len(flat) == n // world_size * world_size  # every sample once, less the remainder
        rank_pages = [set(pages[p.astype(np.int64)]) for p in parts]
        for a in range(world_size):  # disjoint pages but for the pages cut between neighbouring ranks
            for b in range(a + 1, world_size):
                assert len(rank_pages[a] & rank_pages[b]) <= 1
        # page-local: any 4-page window of a rank's stream holds few distinct pages
        for p in parts:
            window = pages[p.astype(np.int64)][: 4 * 3]
            assert len(set(window)) <= 5
        orders[epoch] = flat
    assert not np.array_equal(orders[0], orders[1])  # reseeded per epoch
    again = ShardedOrder(n, 0, world_size, 7, "quasi_random", pages, buffer_pages=4)
    again.start = 5
    assert again.sample_order(1).tolist() == orders[1][: n // world_size][5:].tolist()


@pytest.mark.slow
def test_cli_convert_inspect_and_pretrain(sample_root, tmp_path, simmim_cmd):
    import subprocess

    beton = tmp_path / "val.beton"
    out = subprocess.run([*simmim_cmd, "convert", str(sample_root / "val"), str(beton), "--workers", "2",
                          "--max-resolution", "160"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    again = subprocess.run([*simmim_cmd, "convert", str(sample_root / "val"), str(beton)], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().endswith("exists; pass --force to overwrite it")
    # (the decode check is exercised in-process above; it costs a numba compilation per process)
    out = subprocess.run([*simmim_cmd, "inspect", str(beton), "--no-decode"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "15 samples" in out.stdout and "longer_side" in out.stdout
    run = tmp_path / "run"
    out = subprocess.run([*simmim_cmd, "pretrain", "--config", "demo", "data.val_path=", f"data.path={beton}", "data.backend=ffcv",
                          "data.img_size=64", "data.batch_size=4", "data.num_workers=2", "model.arch=swin_micro",
                          "model.window_size=2", "run.progress=false", "train.epochs=2", "train.warmup_epochs=1",
                          f"run.out_dir={run}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["step"] == 2 * (len(list((sample_root / "val").rglob("*.JPEG"))) // 4) - 1
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert list(run.glob("checkpoint-*.pt")) and list(run.glob("*.png"))
    assert "data ffcv:" in out.stdout + out.stderr


def test_ffcv_internals_the_adapter_relies_on_exist(sample_beton):
    """pipeline/ffcv_compat.py reaches into FFCV's Loader, EpochIterator, Compiler and Reader: every
    attribute it uses exists on a live loader, an epoch runs and stops through it, the numba
    finalizer filter is installed on first use (not at import), once, and torch's thread count
    stays the trainer's (FFCV sets it to num_workers in Loader() and at each epoch start, from its
    producer thread)."""
    import sys

    import numba.core.dispatcher
    from ffcv.pipeline.compiler import Compiler

    from simmim.pipeline import ffcv_compat

    assert numba.core.dispatcher.__file__.endswith("numba/core/dispatcher.py")  # the filter's frame test
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # FFCV would set 1: num_workers
    try:
        loader = make_loader(FFCVLoader, str(sample_beton), Augmentation(size=32), None, 4, 1)
        assert ffcv_compat._hook_installed and sys.unraisablehook.__module__ == ffcv_compat.__name__
        hook = sys.unraisablehook
        make_loader(FFCVLoader, str(sample_beton), Augmentation(size=32), None, 4, 1)
        assert sys.unraisablehook is hook  # not wrapped twice
        for kind, obj in (("Loader", loader.loader), ("Compiler", Compiler), ("Reader", loader.reader)):
            for name in ffcv_compat.ATTRIBUTES[kind]:
                assert hasattr(obj, name), f"ffcv {kind}.{name}"
        assert loader.loader.traversal_order is loader.order
        epoch = iter(loader.loader)
        try:
            for name in ffcv_compat.ATTRIBUTES["EpochIterator"] + (
                    ffcv_compat.ATTRIBUTES["EpochIterator on CUDA"] if torch.cuda.is_available() else ()):
                assert hasattr(epoch, name), f"ffcv EpochIterator.{name}"
            for _ in range(3):  # the producer thread has started (and set FFCV's thread count) by then
                batch = ffcv_compat.next_batch(epoch)  # (images,): no label pipeline
                assert batch[0].shape[:2] == (4, 3) and torch.get_num_threads() == 2
        finally:
            ffcv_compat.close_epoch(epoch)
        assert not epoch.is_alive() and epoch.closed
        assert torch.get_num_threads() == 2 and Compiler.num_threads == 1  # FFCV's own (numba) threads
    finally:
        torch.set_num_threads(threads)


def test_ffcv_import_leaves_torch_thread_count_alone():
    """Importing FFCV sets torch's (process-wide) thread count to 1; ffcv_compat.keep_torch_threads
    imports it keeping the count (a fresh process: this one has imported FFCV already). Loader()
    and epochs: test_ffcv_internals_the_adapter_relies_on_exist."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(2)\n"
            "from simmim.pipeline.ffcv_compat import keep_torch_threads; keep_torch_threads()\n"
            "import ffcv.loader; print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["2"], out.stderr[-2000:]


def test_ffcv_preview_batch_matches_the_reference(sample_root, sample_beton):
    """The figure preview read from the .beton (ffcv_compat.read_image): the same every call, and
    the reference loader's preview of the source folder up to the JPEG decoders' differences."""
    from simmim.pipeline.augment import denormalize

    aug = Augmentation(size=32)
    loader = make_loader(FFCVLoader, str(sample_beton), aug, MaskGenerator(32, 16, 0.5), 4, 1, seed=2)
    images, masks = loader.preview_batch(5)
    again = loader.preview_batch(5)
    assert torch.equal(again[0], images) and torch.equal(again[1], masks) and images.shape == (5, 3, 32, 32)
    ref, ref_masks = make_loader(ReferenceLoader, str(sample_root / "train"), aug, MaskGenerator(32, 16, 0.5), 4,
                                 seed=2).preview_batch(5)
    assert torch.equal(masks, ref_masks)
    diff = (denormalize(images, aug.mean, aug.std) - denormalize(ref, aug.mean, aug.std)).abs().mean().item()
    assert diff < 2 / 255


def test_convert_orientation_and_bit_depth(tmp_path):
    """convert stores what the decode rule gives: EXIF orientation not applied (every value 1..8
    stays 40x20, same pixels), 16-bit grey scaled (the issue: mean 238, 93% at 255)."""
    from simmim.pipeline.decode import decode_rgb

    from helpers import EXIF, RAMP16, add_decode_cases

    cls = tmp_path / "d" / "c"
    cls.mkdir(parents=True)
    add_decode_cases(cls)
    for f in cls.iterdir():
        if f.name not in EXIF + ("gray16.png",):
            f.unlink()
    dst = tmp_path / "d.beton"
    convert(str(tmp_path / "d"), str(dst), max_resolution=None, write_mode="raw", workers=1, progress=False)
    from ffcv.reader import Reader

    meta = Reader(str(dst)).metadata["f0"]
    assert [(int(w), int(h)) for w, h in zip(meta["width"], meta["height"])] == [(40, 20)] * 8 + [(64, 32)]
    loader = make_loader(FFCVLoader, str(dst), Augmentation(size=16), None, 9, 1, train=False, drop_last=False)
    (images,) = next(iter(loader))
    for i in range(1, 8):
        torch.testing.assert_close(images[i], images[0], atol=1e-5, rtol=0)
    from simmim.pipeline import denormalize

    grey = denormalize(images[8:], loader.aug.mean, loader.aug.std) * 255
    ref = np.asarray(decode_rgb(cls / "gray16.png")).astype(float)
    assert 40 < grey.mean() < 90 and abs(ref.mean() - RAMP16.mean() / 257) < 0.5


def test_convert_raw_full_resolution_sizes_the_page(tmp_path, capsys):
    """The issue: `--max-resolution 0 --write-mode raw` with one 1400x1400 JPEG (5,880,000 bytes,
    over the 4 MiB page) printed a worker error and hung. Now the page fits the largest sample; a
    page given too small is refused up front in one line."""
    from PIL import Image

    from simmim.trainer.cli import main

    cls = tmp_path / "src" / "c"
    cls.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1400, 1400, 3), dtype=np.uint8)).save(cls / "big.JPEG")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(cls / "small.JPEG")
    dst = tmp_path / "big.beton"
    main(["convert", str(tmp_path / "src"), str(dst), "--max-resolution", "0", "--write-mode", "raw",
          "--workers", "2"])  # in this process: FFCV is imported once
    report = json.loads(dst.with_name("big.report.json").read_text())
    assert report["written"] == 2 and report["page_size"] == 1 << 23
    from ffcv.reader import Reader

    meta = Reader(str(dst)).metadata["f0"]
    assert sorted(zip(meta["width"].tolist(), meta["height"].tolist())) == [(8, 8), (1400, 1400)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "src"), str(tmp_path / "x.beton"), "--max-resolution", "0",
              "--write-mode", "raw", "--page-size", str(1 << 22)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("scan:")]
    assert e.value.code == 2 and len(err) == 1 and not (tmp_path / "x.beton").exists()  # one line, no traceback
    err = err[0]
    assert re.search(r"big.JPEG needs up to \d+ bytes, more than the page of 4194304: raise --page-size", err)


class _Failing:
    """An indexable dataset whose item 3 raises, as a writer worker's failure."""

    current = ""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        self.current = f"sample-{i}"
        if i == 3:
            raise OSError("disk on fire")
        return (i,)


def test_a_failing_writer_worker_ends_the_run(tmp_path):
    """FFCV's writer waits forever for a worker that raised; ours raises one line naming it."""
    import signal

    from ffcv.fields import IntField

    from ffcv.writer import DatasetWriter

    from simmim.pipeline.ffcv_writer import REQUIRED, CheckedWriter, WriterFailed

    assert all(hasattr(DatasetWriter, name) for name in REQUIRED)  # the private API the adapter overrides
    errors = tmp_path / "errors"
    errors.mkdir()
    writer = CheckedWriter(str(tmp_path / "f.beton"), {"label": IntField()}, errors, 1 << 21, 2, progress=False)
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("the writer hung")))
    signal.alarm(60)
    try:
        with pytest.raises(WriterFailed, match=r"^sample-3: OSError: disk on fire$"):
            writer.from_indexed_dataset(_Failing(), chunksize=2)
    finally:
        signal.alarm(0)


def test_knn_monitor_with_beton_files_is_one_warning(sample_beton, tmp_path, caplog):
    """run.knn_every with data.backend=ffcv: the monitor reads image files, so no monitor and one
    warning saying what it needs (it read the .beton as a list file and called it unlabeled)."""
    from helpers import knn_monitor_warnings

    monitor, said = knn_monitor_warnings("ffcv", sample_beton, tmp_path, caplog)
    assert monitor is None and len(said) == 1 and "\n" not in said[0]
    assert "run.knn_every=1: no k-NN evaluation" in said[0] and ".beton" in said[0] and "class folders" in said[0]


def grey_pngs(root, n: int = 8, size=(72, 80)):
    """n grey PNGs (height, width = size) of distinct levels: pixel statistics that differ per image."""
    from PIL import Image

    root.mkdir(parents=True)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    for i in range(n):
        Image.fromarray(((3 * x + y + 29 * i) % 256).astype(np.uint8), "L").save(root / f"{i:02d}.png")
    return root


def test_convert_measures_grey_statistics_that_pretraining_reads(tmp_path):
    """`simmim convert --channels 1 --stats` on a grey folder (no scan, no statistics file): the
    statistics of every stored pixel, merged over two writer workers, beside the .beton; pre-training
    on the .beton with data.channels=1 normalises by them and its log names the file."""
    from PIL import Image

    from simmim.pipeline.stats import stats_path
    from simmim.trainer.cli import main
    from simmim.trainer.config import load_config
    from simmim.trainer.pretrain import pretrain

    root = grey_pngs(tmp_path / "grey")
    beton = tmp_path / "grey.beton"
    main(["convert", str(root), str(beton), "--channels", "1", "--stats", "--write-mode", "raw", "--workers", "2",
          "--chunk-size", "3"])
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(root.glob("*.png"))]) / 255
    saved = json.loads(stats_path(beton).read_text())
    assert saved["channels"] == 1 and saved["images"] == 8 and saved["pixels"] == pixels.size
    assert np.allclose(saved["mean"], [pixels.mean()], atol=1e-6)
    assert np.allclose(saved["std"], [pixels.std()], atol=1e-6)
    assert json.loads(beton.with_name("grey.report.json").read_text())["stats"] == "measured"
    out = tmp_path / "run"
    overrides = [f"data.path={beton}", "data.backend=ffcv", "data.channels=1", f"run.out_dir={out}", "data.val_path=",
                 "data.img_size=64", "data.batch_size=4", "data.num_workers=1", "model.arch=swin_micro",
                 "model.window_size=2", "run.progress=false", "run.knn_every=0", "train.epochs=1",
                 "train.warmup_epochs=0", "train.device=cpu"]
    summary = pretrain(load_config("demo", overrides))
    assert np.isfinite(summary["epochs"][0]["loss"])
    data_line = next(line for line in (out / "log.txt").read_text().splitlines() if " data ffcv:" in line)
    assert f"1 channel normalised by {stats_path(beton)} mean [{round(saved['mean'][0], 4)}]" in data_line


def test_convert_copies_the_source_statistics(tmp_path, caplog):
    """The statistics file `simmim scan --stats` wrote beside the source is copied beside the .beton
    as it is (and --stats then measures nothing); one for other channels is not (one warning), and a
    former .beton's file is removed rather than left describing other data."""
    import logging

    from simmim.pipeline.scanlist import scan_command
    from simmim.pipeline.stats import stats_path

    root = grey_pngs(tmp_path / "grey", n=4, size=(20, 24))
    scan_command(str(root), None, workers=1, on_error="skip", channels=1, stats=True)
    source = stats_path(root)
    beton = tmp_path / "grey.beton"
    report = convert(str(root), str(beton), workers=1, progress=False, channels=1, stats=True)
    assert report["stats"] == str(source)
    assert json.loads(stats_path(beton).read_text()) == json.loads(source.read_text())
    with caplog.at_level(logging.WARNING, logger="simmim"):
        report = convert(str(root), str(beton), workers=1, progress=False, force=True)  # channels=3
    said = [r.getMessage() for r in caplog.records if "not copied" in r.getMessage()]
    assert len(said) == 1 and f"{source} holds statistics of 1 channel(s), not --channels 3" in said[0]
    assert report["stats"] == "" and not stats_path(beton).exists()
    report = convert(str(root), str(beton), workers=1, progress=False, force=True, stats=True)  # RGB of grey
    saved = json.loads(stats_path(beton).read_text())
    grey = json.loads(source.read_text())
    assert report["stats"] == "measured" and saved["channels"] == 3
    assert np.allclose(saved["mean"], grey["mean"] * 3, atol=1e-6)
    assert np.allclose(saved["std"], grey["std"] * 3, atol=1e-6)
    with pytest.raises(DatasetError, match="--channels must be 1 or 3"):
        convert(str(root), str(tmp_path / "x.beton"), channels=5)
