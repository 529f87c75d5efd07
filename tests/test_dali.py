"""DALI in CPU-only mode (device_id=None): `simmim scan`, the DALI loader's contract, sharding and
augmentation statistics, and a pre-training run."""
import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.pipeline import Augmentation, MaskGenerator, ReferenceLoader
from simmim.pipeline.decode import DALI_DECODE_ARGS, decode_rgb

from helpers import (EXIF, HOSTILE_BAD, HOSTILE_GOOD, add_decode_cases, assert_same_augmentation, loader_crop_stats,
                     make_loader)

pytest.importorskip("nvidia.dali")
from simmim.pipeline.dali_graph import DALIGraph  # noqa: E402
from simmim.pipeline.dali_loader import DALILoader  # noqa: E402


def dali_decode_all(paths) -> list[np.ndarray]:
    """DALI's CPU decoder, with our decode arguments, on every file in one batch (raises if one fails)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def pipe():
        data, _ = fn.readers.file(files=[str(p) for p in paths])
        return fn.decoders.image(data, device="cpu", output_type=types.RGB, **DALI_DECODE_ARGS)

    p = pipe()
    p.build()
    out = p.run()[0]
    return [np.array(out.at(i)) for i in range(len(paths))]


def test_scan_and_hostile_files(hostile, simmim_cmd):
    out = subprocess.run([*simmim_cmd, "scan", str(hostile), "--workers", "2"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    listed = hostile.parent / "hostile.clean.txt"
    names = [line.split()[0].split("/")[-1] for line in listed.read_text().splitlines()]
    assert sorted(names) == sorted(HOSTILE_GOOD)
    report = json.loads((hostile.parent / "hostile.clean.report.json").read_text())
    assert sorted(b["path"].split("/")[-1] for b in report["bad_files"]) == sorted(HOSTILE_BAD)
    assert f"{len(HOSTILE_GOOD)} good, {len(HOSTILE_BAD)} bad" in out.stdout
    from simmim.pipeline import scan_folder

    assert scan_folder(listed)[1] == ["n0"]  # the class names travel with the list
    # DALI reads exactly the files the scan keeps ...
    from simmim.pipeline.dali_graph import dali_decodes

    assert not any(dali_decodes(np.fromfile(hostile / "n0" / name, np.uint8)) for name in HOSTILE_BAD)
    decoded = dali_decode_all([hostile / "n0" / name for name in HOSTILE_GOOD])
    # ... and decodes every one to the pixels of our decode rule: EXIF orientation not applied,
    # 16-bit scaled, float as [0, 1], alpha dropped, first frame (JPEG decoders differ slightly;
    # PIL keeps the high byte of 16-bit RGB PNGs, DALI rounds v / 257)
    for name, ours in zip(HOSTILE_GOOD, decoded):
        ours = ours.astype(float)
        ref = np.asarray(decode_rgb(hostile / "n0" / name)).astype(float)
        assert ours.shape == ref.shape, name
        if name.endswith(".JPEG") and name != "png_named.JPEG":
            assert np.abs(ours - ref).mean() < 3, name
        else:
            assert np.abs(ours - ref).max() <= 1, name
    # with the list beside the folder, the loader trains through the folder without stopping
    loader = make_loader(DALILoader, str(hostile), Augmentation(size=32), MaskGenerator(32, 32, 0.6), 2, 1)
    assert loader.num_samples == len(HOSTILE_GOOD)
    assert sum(len(images) for images, _ in loader) == len(HOSTILE_GOOD) // 2 * 2


def eval_batch(loader) -> torch.Tensor:
    (images,) = next(iter(loader))
    return images


def test_orientation_and_bit_depth_agree_with_reference(tmp_path):
    """EXIF Orientation 1..8 on the same pixels gives the same images; a 16-bit PNG is scaled (the
    issue: DALI rotated Orientation=6, the torch loader clipped 16-bit grey to mean 238)."""
    cls = tmp_path / "d" / "c"
    cls.mkdir(parents=True)
    add_decode_cases(cls)
    for f in cls.iterdir():
        if f.name not in EXIF + ("gray16.png",):
            f.unlink()
    aug = Augmentation(size=16)
    kw = dict(train=False, drop_last=False)
    ref = eval_batch(make_loader(ReferenceLoader, str(tmp_path / "d"), aug, None, 9, 0, **kw))
    dali = eval_batch(make_loader(DALILoader, str(tmp_path / "d"), aug, None, 9, 1, **kw))
    for images in (ref, dali):
        assert images.shape == (9, 3, 16, 16)
        for i in range(1, 8):
            torch.testing.assert_close(images[i], images[0], atol=1e-5, rtol=0)
    from simmim.pipeline import denormalize

    grey_ref, grey_dali = (denormalize(x[8:], aug.mean, aug.std) * 255 for x in (ref, dali))
    assert (grey_ref - grey_dali).abs().mean() < 1.5 and 40 < grey_ref.mean() < 90


def test_folder_without_list_is_scanned_first(hostile, caplog):
    """DALI on a folder with broken files and no scan list: checked before the first epoch (the
    list kept beside the folder), not a traceback naming no file. Later runs stat the listed files
    and decode only what changed; a file deleted or replaced in a subfolder after the scan is found
    before the first epoch; one deleted during the run is named in one line, with the command that
    rebuilds the list."""
    import logging
    import shutil

    from simmim.core.errors import DatasetError

    aug, masks = Augmentation(size=32), MaskGenerator(32, 32, 0.6)
    with caplog.at_level(logging.INFO):
        loader = make_loader(DALILoader, str(hostile), aug, masks, 2, 1)
    assert loader.num_samples == len(HOSTILE_GOOD) and "checking its" in caplog.text
    assert sum(len(images) for images, _ in loader) == len(HOSTILE_GOOD) // 2 * 2
    listed = hostile.parent / "hostile.clean.txt"
    assert listed.is_file() and (hostile.parent / "hostile.clean.files.json").is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        make_loader(DALILoader, str(hostile), aug, masks, 2, 1)
    assert "checking its" not in caplog.text and "changed since" not in caplog.text
    # changes below the class folders (their mtimes stay): a file deleted, one replaced by a broken one
    sub = hostile / "n0" / "deep"
    sub.mkdir()
    shutil.copy(hostile / "n0" / "ok.JPEG", sub / "a.JPEG")
    shutil.copy(hostile / "n0" / "ok.JPEG", sub / "b.JPEG")
    assert make_loader(DALILoader, str(hostile), aug, masks, 2, 1).num_samples == len(HOSTILE_GOOD) + 2
    (sub / "a.JPEG").unlink()
    (sub / "b.JPEG").write_bytes((hostile / "n0" / "ok.JPEG").read_bytes()[:300])  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert make_loader(DALILoader, str(hostile), aug, masks, 2, 1).num_samples == len(HOSTILE_GOOD)
    assert "1 file(s) new or changed, checked again; 1 gone" in caplog.text
    # a stricter data.max_pixels than the list was made with: applied from the record, no decode
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        strict = make_loader(DALILoader, str(hostile), aug, masks, 1, 1, max_pixels=40 * 20)
    assert 0 < strict.num_samples < len(HOSTILE_GOOD)
    assert "0 file(s) new or changed" in caplog.text and "over data.max_pixels=800" in caplog.text
    assert make_loader(DALILoader, str(hostile), aug, masks, 2, 1).num_samples == len(HOSTILE_GOOD)  # and back
    # data.path the list itself, a file gone since: left out before the first epoch, in one line
    gone = hostile / "n0" / "ok.JPEG"
    kept = gone.read_bytes()
    gone.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert make_loader(DALILoader, str(listed), aug, masks, 2, 1).num_samples == len(HOSTILE_GOOD) - 1
    assert f"simmim scan SRC --out {listed}" in caplog.text
    gone.write_bytes(kept)
    loader = make_loader(DALILoader, str(listed), aug, masks, 2, 1)
    gone.unlink()  # during the run
    with pytest.raises(DatasetError) as e:
        for _ in loader:
            pass
    msg = str(e.value)
    assert "\n" not in msg and f"cannot decode '{gone}'" in msg and f"simmim scan {hostile}`" in msg


def test_odd_file_names(tmp_path, caplog):
    """Names with newlines, tabs, edge spaces, ...: through the scan list into DALI; a name that is
    not UTF-8 too (DALI gets the file's bytes from our source, never its name)."""
    import logging
    import os

    from test_decode import NAMES

    cls = tmp_path / "root" / "c"
    cls.mkdir(parents=True)
    for i, name in enumerate(NAMES):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(cls / name, format="PNG")
    Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(os.fsencode(cls) + b"/latin1-\xe9.png", format="PNG")
    with caplog.at_level(logging.WARNING):
        loader = make_loader(DALILoader, str(tmp_path / "root"), Augmentation(size=8), None, len(NAMES) + 1, 1, train=False,
                            labels=True)
    assert loader.num_samples == len(NAMES) + 1
    images, labels = next(iter(loader))
    assert (tmp_path / "root.clean.txt").is_file()  # written and read back through the list format
    from simmim.pipeline import denormalize

    values = (denormalize(images, loader.aug.mean, loader.aug.std) * 255).round()[:, 0, 0, 0]
    assert sorted(values.tolist()) == [10.0 * i for i in range(len(NAMES))] + [250.0]  # each file, once


def test_contract(sample_root):
    aug = Augmentation(size=64)
    loader = make_loader("dali", str(sample_root / "train"), aug, MaskGenerator(64, 32, 0.6), 8, 2,
                         torch.device("cpu"), labels=True, decode_device="auto")
    assert len(loader) == loader.num_samples // 8
    n = 0
    for images, masks, labels in loader:
        assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert images.is_contiguous()
        assert masks.shape == (8, 2, 2) and masks.dtype == torch.bool and int(masks[0].sum()) == 3
        assert labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() < 5
        assert (0 - max(aug.mean)) / min(aug.std) - 1e-4 <= images.min()
        assert images.max() <= (1 - min(aug.mean)) / min(aug.std) + 1e-4
        n += 1
    assert n == len(loader)
    loader.set_epoch(1, start_batch=len(loader) - 1)
    assert sum(1 for _ in loader) == 1
    half = make_loader(DALILoader, str(sample_root / "train"), aug, None, 8, 1, dtype=torch.bfloat16)
    (images,) = next(iter(half))
    assert images.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="mixed decodes on the GPU"):
        make_loader(DALILoader, str(sample_root / "train"), aug, None, 8, 1, decode_device="mixed")


def test_gpu_pipeline_is_valid(sample_root):
    """The GPU graph (mixed decoding with every speed knob, GPU resize and normalise) cannot run
    here, but DALI checks each operator's device and arguments against its schema when the
    pipeline is serialised, so a misspelt knob or an operator without a GPU backend fails here."""
    loader = make_loader(DALILoader, str(sample_root / "train"), Augmentation(size=64), None, 8, 1,
                         dtype=torch.float16, hw_decoder_load=0.5, preallocate=4 << 20)
    loader.graph.preallocate_hw = (640, 480)
    loader.graph.decode = "mixed"  # as chosen on a CUDA device; device_id stays None to build no GPU state
    for train in (True, False):
        loader.graph.train = train
        graph = loader.build_pipeline().serialize()
        assert graph.count(b"mixed") >= 1 and graph.count(b"gpu") >= 2
        for knob in (b"hw_decoder_load", b"device_memory_padding", b"preallocate_width_hint"):
            assert knob in graph
    loader.graph.hw_decoder_load = "lots"  # values are typed against the schema too
    with pytest.raises(Exception, match="float"):
        loader.build_pipeline().serialize()


def test_ranks_disjoint_and_covering(tmp_path):
    # 27 images, each one flat grey level: the level identifies the image after any crop
    for i in range(27):
        d = tmp_path / "ids" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 50, 3), 8 * i + 4, np.uint8)).save(d / f"{i}.png")
    aug = Augmentation(size=16)
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = make_loader(DALILoader, str(tmp_path / "ids"), aug, None, 4, 1, rank=rank, world_size=2, seed=3)
            loader.set_epoch(epoch)
            got = []
            for (images,) in loader:
                level = (images[:, 0] * aug.std[0] + aug.mean[0]).mean((1, 2)) * 255
                got += ((level - 4) / 8).round().int().tolist()
            assert len(got) == len(loader) * 4 == 12  # 13 per rank, 3 batches of 4
            seen.append(got)
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == 24  # the whole set less the dropped remainder
        if epoch == 0:
            first = seen
    assert first != seen  # reshuffled per epoch


def test_same_augmentation_as_reference(ramps):
    aug = Augmentation(size=48)
    assert_same_augmentation(loader_crop_stats(make_loader(DALILoader, str(ramps), aug, None, 16, 2), aug),
                             loader_crop_stats(make_loader(ReferenceLoader, str(ramps), aug, None, 16, 0), aug))


@pytest.mark.slow
def test_pretrain_with_dali(sample_root, tmp_path, simmim_cmd):
    run = tmp_path / "run"
    out = subprocess.run([*simmim_cmd, "pretrain", "--config", "demo", "data.val_path=", f"data.path={sample_root / 'val'}",
                          "data.backend=dali", "data.img_size=64", "data.batch_size=4", "data.num_workers=2",
                          "model.arch=swin_micro", "model.window_size=2", "run.progress=false", "train.epochs=2",
                          "train.warmup_epochs=1", f"run.out_dir={run}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert steps[-1]["step"] == 2 * (len(list((sample_root / "val").rglob("*.JPEG"))) // 4) - 1
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert list(run.glob("checkpoint-*.pt")) and list(run.glob("*.png")) and "data dali (decoding on the CPU):" in out.stdout + out.stderr


def test_finetune_with_dali(sample_root, tmp_path):
    from simmim.trainer.config import load_config
    from simmim.trainer.finetune import finetune
    from simmim.trainer.finetune_options import FinetuneConfig

    val = sample_root / "val"
    summary = finetune(load_config("finetune_demo", [
        "data.backend=dali", f"data.path={val}", f"finetune.val_path={val}", "data.img_size=64",
        "data.batch_size=4", "model.arch=swin_micro", "model.window_size=2", "train.epochs=1",
        "run.progress=false", f"run.out_dir={tmp_path}"], FinetuneConfig))
    assert 0 <= summary["top1"] <= summary["top5"] <= 100 and summary["best_top1"] >= summary["top1"]
    assert np.isfinite(summary["final_loss"]) and list(tmp_path.glob("checkpoint-*.pt"))


def test_torch_and_dali_agree_on_the_samples(hostile, caplog):
    """Same data.path, same samples: with a scan list beside the folder the torch loader reads the
    checked list as DALI does (before: it walked the folder, 36 files, and served a neighbour in
    place of each of the 7 bad ones); a file changed since the scan is checked by both."""
    import logging

    from simmim.pipeline.scanlist import scan_command

    aug = Augmentation(size=8)
    torch_before = make_loader(ReferenceLoader, str(hostile), aug, None, 1, 0)
    assert torch_before.num_samples == len(HOSTILE_GOOD) + len(HOSTILE_BAD)  # no list yet: lazy, as before
    scan_command(str(hostile), None, 1, "skip")
    (hostile / "n0" / "ok.JPEG").write_bytes(b"")  # broken after the scan
    with caplog.at_level(logging.WARNING):
        counts = {"torch": make_loader(ReferenceLoader, str(hostile), aug, None, 1, 0).num_samples,
                  "dali": make_loader(DALILoader, str(hostile), aug, None, 1, 1).num_samples}
    assert counts == {"torch": len(HOSTILE_GOOD) - 1, "dali": len(HOSTILE_GOOD) - 1}
    assert caplog.text.count("changed since its scan") == 1  # torch updated the list; DALI found it fresh


def test_an_internal_bug_in_the_pipeline_keeps_its_traceback(sample_root, monkeypatch):
    """A failure no file and no worker explains (here a bug in building the graph) is not turned
    into a DatasetError blaming the data: the original exception propagates."""
    loader = make_loader(DALILoader, str(sample_root), Augmentation(size=32), MaskGenerator(32, 32, 0.6), 4, 1)

    def broken():
        raise TypeError("build_pipeline got a bad argument")

    monkeypatch.setattr(loader, "build_pipeline", broken)
    loader.set_epoch(0)
    with pytest.raises(TypeError, match="bad argument"):
        next(iter(loader))


# ---------------------------------------------------------------- the CPU path's resize and views


def test_torch_resize_is_pillows_filter_and_normalises_as_the_base(sample_root):
    """`resize_views` (the CPU path's resize, flip and normalisation of DALI's decoded crops) on
    the same crops as torchvision's resized_crop (the reference loader): within 1 uint8 level at
    p99 (measured on the sample set's 15 photos, 192 px: mean 0.03, p99 1, max 1; DALI's own antialiased
    resize: mean 0.15, p99 1, max 13, tests/test_pixels.py), flipped where asked, the evaluation
    view's window taken after the resize, and normalised exactly as `augment.normalize` does."""
    import random

    import torchvision.transforms.v2.functional as TF

    from simmim.pipeline import sample_crop
    from simmim.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
    from simmim.pipeline.dali_graph import resize_views
    from simmim.pipeline.folder import scan_folder

    size, rng = 192, random.Random(0)
    files = [p for p, _ in scan_folder(sample_root / "train")[0]][:24]
    crops, want, geometry = [], [], []
    for k, f in enumerate(files):
        img = decode_rgb(f)
        left, top, w, h = sample_crop(img.width, img.height, (0.67, 1.0), (3 / 4, 4 / 3), rng)
        crops.append(np.asarray(img)[top:top + h, left:left + w])
        ref = np.asarray(TF.resized_crop(img, top, left, h, w, [size, size],
                                         interpolation=TF.InterpolationMode.BILINEAR))
        want.append(ref[:, ::-1] if k % 2 else ref)
        geometry.append((size, size, 0, 0, k % 2))
    got = resize_views(crops, np.array(geometry, np.int32), size)
    assert got.dtype == torch.uint8 and got.shape == (24, 3, size, size) and got.is_contiguous()
    d = np.abs(got.permute(0, 2, 3, 1).numpy().astype(int) - np.stack(want).astype(int))
    assert np.percentile(d, 99) <= 1 and d.mean() < 0.1, (d.mean(), np.percentile(d, 99), d.max())
    for dtype in (torch.float32, torch.bfloat16):
        normed = resize_views(crops, np.array(geometry, np.int32), size, IMAGENET_MEAN, IMAGENET_STD, dtype)
        assert normed.dtype == dtype
        torch.testing.assert_close(normed, normalize(got, IMAGENET_MEAN, IMAGENET_STD, dtype), atol=0, rtol=0)
    # the evaluation view: the whole image resized to (h, w), the window at (top, left) of that
    img = decode_rgb(files[0])
    (view,) = resize_views([np.asarray(img)], np.array([[size + 20, size + 40, 5, 30, 0]], np.int32), size)
    ref = np.asarray(img.resize((size + 40, size + 20), Image.BILINEAR))[5:5 + size, 30:30 + size]
    assert np.abs(view.permute(1, 2, 0).numpy().astype(int) - ref.astype(int)).max() <= 1


def test_headers_are_read_once_and_views_are_the_torch_loaders(sample_root, monkeypatch):
    """The source reads a file's header the first time the file comes by and keeps its size in
    the table its workers share: a second epoch reads none, yet each sample's box and flip are
    still `sample_view` of (seed, epoch, index) on the image's size."""
    import types

    import simmim.pipeline.dali_loader as dali_loader
    from simmim.pipeline import sample_view

    aug = Augmentation(size=64)
    loader = make_loader(DALILoader, str(sample_root / "train"), aug, None, 8, 1, seed=5)
    src, sched = loader.source, loader.schedule
    reads = []
    real = dali_loader.header_size
    monkeypatch.setattr(dali_loader, "header_size", lambda data: reads.append(1) or real(data))
    n, seen = loader.num_samples // 8 * 8, set()
    for dali_epoch, epoch in enumerate((0, 3)):
        sched.set(dali_epoch, epoch, 0, n)
        for it in range(n // 8):
            data, labels, start, shape, geometry = src(types.SimpleNamespace(iteration=it, epoch_idx=dali_epoch))
            idx = src.order(epoch, 0)[it * 8:(it + 1) * 8]
            seen.update(idx.tolist())
            assert np.array_equal(labels[:, 0], np.asarray(loader.samples.labels)[idx])
            for k, i in enumerate(idx.tolist()):
                with Image.open(loader.samples.path(i)) as im:
                    assert tuple(sched.sizes[i]) == im.size
                left, top, w, h, flip = sample_view(*im.size, aug, 5, epoch, i)
                assert tuple(start[k]) == (left, top) and tuple(shape[k]) == (w, h)
                assert tuple(geometry[k]) == (64, 64, 0, 0, flip)
        with pytest.raises(StopIteration):
            src(types.SimpleNamespace(iteration=n // 8, epoch_idx=dali_epoch))
        assert len(reads) == len(seen)  # each header once: epoch 3 reads only the files epoch 0 left out


@pytest.mark.parametrize("train", [True, False])
def test_graph_path_gives_the_torch_paths_views(ramps, train):
    """The GPU's graph (DALI's resize, flip and normalisation; the evaluation view's resize to the
    source's size and slice) run on the CPU gives the views of the CPU path (torch's resize) to
    the resampler's rounding: the same boxes, flips and windows from the one source."""
    aug = Augmentation(size=48)

    class InGraph(DALIGraph):
        resize_in_torch = False

    torch_path = make_loader(DALILoader, str(ramps), aug, None, 8, 1, seed=2, train=train, drop_last=train)
    graph_path = make_loader(DALILoader, str(ramps), aug, None, 8, 1, seed=2, train=train, drop_last=train)
    graph_path.graph.__class__ = InGraph
    for loader in (torch_path, graph_path):
        loader.set_epoch(1)
    pairs = list(zip(torch_path, graph_path))
    assert len(pairs) == len(torch_path) >= 2
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    for (a,), (b,) in pairs:
        assert a.shape == b.shape
        levels = ((a - b) * std * 255).abs().round()  # normalised -> uint8 levels
        assert float(torch.quantile(levels.flatten(), 0.99)) <= 1 and float(levels.max()) <= 3, levels.max()
