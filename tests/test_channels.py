"""Grey and multi-channel data (data.channels, data.mean / data.std, `simmim scan --stats`)."""
import dataclasses
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.core.errors import ConfigError, DatasetError
from simmim.core.seeding import derive_seed
from simmim.pipeline import Augmentation, LoaderSpec, MaskGenerator, build_loader, scan_folder
from simmim.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, normalize, training_view
from simmim.pipeline.channels import check_file, luma, read_array
from simmim.pipeline.decode import DecodeError, decode_grey
from simmim.pipeline.scanlist import scan_command
from simmim.pipeline.stats import ChannelMoments, normalization, stats_path
from simmim.trainer.config import load_config


@pytest.mark.parametrize("overrides,match", [
    (["data.channels=1", "data.mean=[0.5,0.5]", "data.std=[0.2,0.2]"], "data.mean has 2 values for data.channels=1"),
    (["data.channels=4", "data.mean=[0.5,0.5,0.5,0.5]"], "data.mean and data.std are set together"),
    (["data.std=[0.2,0,0.2]", "data.mean=[0.5,0.5,0.5]"], "config key 'data.std' must be > 0"),
    (["data.channels=0"], "config key 'data.channels' must be > 0"),
    (["data.channels=5", "data.backend=ffcv"], r"data.backend=ffcv reads 8-bit RGB or grey images .*N-channel"),
    (["data.channels=2", "data.backend=dali"], r"data.backend=dali reads 8-bit RGB or grey images"),
    # stream decodes RGB only: for grey the hint names the backends that read grey, not N-channel data
    (["data.channels=1", "data.backend=stream"], r"data.backend=stream reads RGB images only .*not "
                                                 r"data.channels=1; for grey \(data.channels=1\): data.backend=torch"),
])
def test_channel_options_are_checked_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_channel_options_load():
    c = load_config(None, ["data.channels=5", "data.mean=[0.1,0.2,0.3,0.4,0.5]", "data.std=[1,1,1,1,2]"])
    assert c.data.channels == 5 and c.data.std == [1.0, 1.0, 1.0, 1.0, 2.0]
    assert load_config(None, ["data.channels=1", "data.backend=dali"]).data.channels == 1


def test_normalization_sources(tmp_path):
    folder = tmp_path / "xray"
    folder.mkdir()
    assert normalization(3, [], [], folder) == (IMAGENET_MEAN, IMAGENET_STD, "ImageNet's")
    assert normalization(1, [0.3], [0.2], folder)[:2] == ((0.3,), (0.2,))
    with pytest.raises(ConfigError, match=r"run `simmim scan .*xray --stats --channels 1`"):
        normalization(1, [], [], folder)
    stats = stats_path(folder)
    assert stats == tmp_path / "xray.clean.stats.json"
    stats.write_text(json.dumps({"mean": [0.25], "std": [0.125]}))
    assert normalization(1, [], [], folder) == ((0.25,), (0.125,), str(stats))
    with pytest.raises(ConfigError, match=r"holds 1 channels, data.channels is 3: run `simmim scan .*xray --stats "
                                          r"--channels 3`"):  # the command names the source to scan
        normalization(3, [], [], folder)
    listed = tmp_path / "train.clean.txt"
    listed.write_text("a.png\n")
    assert stats_path(listed) == tmp_path / "train.clean.stats.json"
    with pytest.raises(ConfigError, match=r"simmim convert SRC .*grey.beton --channels 1 --stats. \(writes .*grey.stats.json\)"):
        normalization(1, [], [], tmp_path / "grey.beton")


def test_normalize_refuses_a_channel_count_its_mean_does_not_have():
    """Broadcasting a 3-value mean over 1-channel images would silently make 3 channels."""
    with pytest.raises(ValueError, match="1-channel images, 3 mean values"):
        normalize(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD)
    assert normalize(torch.zeros(2, 5, 4, 4, dtype=torch.uint8), (0.5,) * 5, (0.25,) * 5).shape == (2, 5, 4, 4)


def test_channel_moments_match_numpy():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((5, 7), (11, 3), (1, 1), (40, 30))]
    m = ChannelMoments(3)
    for img in images:
        m.add_image(img, 255)
    every = np.concatenate([img.reshape(-1, 3) for img in images]).astype(np.float64) / 255
    np.testing.assert_allclose(m.mean, every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std, every.std(0), rtol=1e-12)
    assert m.count == len(every)


# ---------------------------------------------------------------- the torch backend


def grey_folder(root, n: int = 6, size=(40, 48), fmt: str = "PNG", ext: str = "png"):
    """n grey (mode L) images directly in `root` (unlabeled), each a horizontal ramp plus 20 * i."""
    root.mkdir(parents=True)
    h, w = size
    for i in range(n):
        ramp = (np.arange(w)[None, :] * 3 + np.arange(h)[:, None] + 20 * i) % 256
        Image.fromarray(ramp.astype(np.uint8), "L").save(root / f"g{i}.{ext}", fmt)
    return root


def npy_folder(root, n: int = 6, channels: int = 5, dtype=np.uint16, size=(36, 44), seed: int = 0):
    """n random (H, W, C) arrays of `dtype` in class folder root/c0."""
    cls = root / "c0"
    cls.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(n):
        if np.dtype(dtype).kind == "f":
            a = rng.random((*size, channels)).astype(dtype) * 4 - 1
        else:
            a = rng.integers(0, np.iinfo(dtype).max, (*size, channels), dtype=dtype, endpoint=True)
        np.save(cls / f"a{i}.npy", a)
        arrays.append(a)
    return root, arrays


def spec_of(root, channels, size=16, mean=None, std=None, **kw):
    aug = Augmentation(size=size, mean=tuple(mean or [0.5] * channels), std=tuple(std or [0.25] * channels))
    return LoaderSpec("torch", str(root), aug, batch_size=kw.pop("batch_size", 3), num_workers=kw.pop("num_workers", 0),
                      channels=channels, **kw)


def test_grey_folder_gives_one_channel_batches(tmp_path):
    """channels=1: a grey folder (unlabeled) -> (B, 1, S, S) normalised float32, the view Pillow
    gives on mode L for the same box and flip, equal with 0 and 2 workers; masks as usual."""
    root = grey_folder(tmp_path / "grey")
    spec = spec_of(root, 1, mean=[0.4], std=[0.2])
    batches = {}
    for workers in (0, 2):
        loader = build_loader(dataclasses.replace(spec, num_workers=workers), MaskGenerator(16, 8, 0.5), "cpu",
                              seed=2)
        batches[workers] = list(loader)
    (images, masks) = batches[0][0]
    assert images.shape == (3, 1, 16, 16) and images.dtype == torch.float32 and masks.shape == (3, 2, 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[0], batches[2]))
    # the first sample of the epoch by hand: Pillow on the L image, normalised
    index, seed = next(iter(loader.sampler))
    assert seed == derive_seed("sample", 2, 0, index)
    img = Image.open(loader.dataset.samples[index][0])
    rng = random.Random(seed)
    left, top, w, h, flip = training_view(img.width, img.height, spec.aug, rng)
    view = img.crop((left, top, left + w, top + h)).resize((16, 16), Image.BILINEAR)
    view = view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view
    expect = (torch.from_numpy(np.array(view)).float() / 255 - 0.4) / 0.2
    assert torch.allclose(images[0, 0], expect, atol=1e-5)
    preview = loader.preview_batch(2)[0]
    assert preview.shape == (2, 1, 16, 16) and preview.dtype == torch.float32


def test_colour_images_in_a_grey_run_become_luma(tmp_path):
    """An RGB file in a grey run: PIL's convert('L') (ITU-R 601-2 luma), the same as `channels.luma`."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "c.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    grey = decode_grey(path)
    assert grey.mode == "L"
    decoded = np.array(Image.open(path).convert("RGB"))
    assert np.array_equal(np.asarray(grey), np.asarray(Image.open(path).convert("RGB").convert("L")))
    ours = luma(torch.from_numpy(decoded).permute(2, 0, 1)[None])[0, 0].numpy()
    assert np.array_equal(ours, np.asarray(grey))


@pytest.mark.parametrize("dtype,scale", [(np.uint16, 65535.0), (np.uint8, 255.0), (np.float32, 1.0)])
def test_npy_folder_gives_n_channel_batches(tmp_path, dtype, scale):
    """channels=5: .npy (H, W, 5) arrays -> (B, 5, S, S); values / dtype max (floats as stored),
    resized by torch's antialiased bilinear on the same crop box, normalised per channel."""
    root, arrays = npy_folder(tmp_path / "ms", dtype=dtype)
    mean, std = [0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]
    spec = spec_of(root, 5, mean=mean, std=std, labels=True)
    loader = build_loader(spec, MaskGenerator(16, 8, 0.5), "cpu", seed=7)
    images, masks, labels = next(iter(loader))
    assert images.shape == (3, 5, 16, 16) and images.dtype == torch.float32 and labels.tolist() == [0, 0, 0]
    i, seed = next(iter(loader.sampler))
    a = arrays[int(Path(loader.dataset.samples[i][0]).stem[1:])]
    rng = random.Random(seed)
    left, top, w, h, flip = training_view(a.shape[1], a.shape[0], spec.aug, rng)
    crop = torch.from_numpy(a[top:top + h, left:left + w].astype(np.float64) / scale).permute(2, 0, 1)[None]
    view = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear", antialias=True)[0]
    view = view.flip(-1) if flip else view
    expect = (view - torch.tensor(mean, dtype=torch.float64).view(5, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(5, 1, 1)
    assert torch.allclose(images[0].double(), expect, atol=1e-4)
    evaluation = build_loader(dataclasses.replace(spec, train=False, drop_last=False), None, "cpu")
    assert next(iter(evaluation))[0].shape == (3, 5, 16, 16)


def test_tiff_folder_gives_n_channel_batches(tmp_path):
    """channels=4: multi-channel TIFFs (planar, samples-last and pages) read by tifffile."""
    import tifffile

    root = tmp_path / "tif"
    root.mkdir()
    rng = np.random.default_rng(3)
    a = rng.integers(0, 65536, (30, 34, 4), dtype=np.uint16)
    tifffile.imwrite(root / "contig.tif", a, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(root / "planar.tiff", np.moveaxis(a, -1, 0), photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(root / "pages.tif", np.moveaxis(a, -1, 0), photometric="minisblack")
    for name in ("contig.tif", "planar.tiff", "pages.tif"):
        assert np.array_equal(read_array(root / name, 4), a), name
    loader = build_loader(spec_of(root, 4, train=False, drop_last=False), None, "cpu")
    (images,) = next(iter(loader))
    assert images.shape == (3, 4, 16, 16)
    assert torch.equal(images[0], images[1]) and torch.equal(images[1], images[2])  # one array, three layouts


def test_array_layouts_and_dtypes_are_refused_in_one_line(tmp_path):
    bad = {"chw.npy": np.zeros((5, 20, 30), np.uint8), "int.npy": np.zeros((20, 30, 5), np.int64),
           "nan.npy": np.full((20, 30, 5), np.nan, np.float32), "three.npy": np.zeros((20, 30, 3), np.uint8),
           "4d.npy": np.zeros((2, 20, 30, 5), np.uint8)}
    reasons = {"chw.npy": "channels-first: store (height, width, channels)", "int.npy": "int64 pixels have no agreed",
               "nan.npy": "NaN or infinite", "three.npy": "3 channel(s)", "4d.npy": "store (height, width, channels)"}
    for name, a in bad.items():
        np.save(tmp_path / name, a)
        with pytest.raises(DecodeError, match=re.escape(reasons[name])):
            read_array(tmp_path / name, 5)
        assert check_file(tmp_path / name, 5)[0] is not None
    (tmp_path / "obj.npy").write_bytes(b"\x93NUMPY garbage")
    assert "\n" not in check_file(tmp_path / "obj.npy", 5)[0]
    np.save(tmp_path / "big.npy", np.zeros((20, 30, 5), np.uint8))
    assert "over the limit of 100" in check_file(tmp_path / "big.npy", 5, max_pixels=100)[0]
    assert check_file(tmp_path / "big.npy", 5) == (None, (30, 20))


def test_scan_lists_arrays_for_other_channel_counts(tmp_path):
    """A folder's walk lists .npy (and, for N channels, .tif only) by data.channels; channels=3 is as before."""
    root = tmp_path / "mixed"
    root.mkdir()
    Image.new("L", (8, 8)).save(root / "a.png")
    np.save(root / "b.npy", np.zeros((8, 8), np.uint8))
    Image.new("L", (8, 8)).save(root / "c.tif")
    names = {c: sorted(Path(p).name for p, _ in scan_folder(root, channels=c)[0]) for c in (1, 3, 5)}
    assert names == {1: ["a.png", "b.npy", "c.tif"], 3: ["a.png", "c.tif"], 5: ["b.npy", "c.tif"]}


# ---------------------------------------------------------------- simmim scan --stats


def test_scan_stats_match_numpy_and_feed_pretraining(tmp_path, capsys):
    """`simmim scan --stats`: per-channel mean and std over every pixel of every good image, in
    the loader's units (uint16 / 65535), in the scan's pass; written beside the list, where
    `normalization` finds it for the folder. A bad file is left out of both."""
    root, arrays = npy_folder(tmp_path / "ms", n=5, channels=5, dtype=np.uint16)
    arrays += [np.random.default_rng(9).integers(0, 65536, (17, 9, 5), dtype=np.uint16)]  # another size
    np.save(root / "c0" / "z_other.npy", arrays[-1])
    np.save(root / "c0" / "bad.npy", np.zeros((5, 8, 8), np.uint16))  # channels-first: refused
    result = scan_command(str(root), None, workers=2, on_error="skip", channels=5, stats=True)
    assert len(result.good) == 6 and [Path(p).name for p, _ in result.bad] == ["bad.npy"]
    every = np.concatenate([a.reshape(-1, 5) for a in arrays]).astype(np.float64) / 65535
    stats = json.loads(stats_path(root).read_text())
    assert stats["channels"] == 5 and stats["images"] == 6 and stats["pixels"] == len(every)
    np.testing.assert_allclose(stats["mean"], every.mean(0), atol=1e-6)
    np.testing.assert_allclose(stats["std"], every.std(0), atol=1e-6)
    mean, std, source = normalization(5, [], [], root)
    assert source == str(stats_path(root)) and mean == tuple(stats["mean"])
    assert "per-channel mean" in capsys.readouterr().out
    # the torch loader reads the scanned list (record of 5 channels) and normalises with its stats
    loader = build_loader(spec_of(root, 5, mean=mean, std=std), None, "cpu")
    assert loader.num_samples == 6


def test_scan_stats_of_rgb_and_grey_images(tmp_path):
    """RGB and grey images: values / 255 of the whole decoded image (not the JPEG draft the check uses)."""
    rng = np.random.default_rng(4)
    rgb = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((12, 20), (30, 7))]
    root = tmp_path / "rgb"
    root.mkdir()
    for i, a in enumerate(rgb):
        Image.fromarray(a).save(root / f"{i}.png")
    scan_command(str(root), None, workers=1, on_error="skip", stats=True)
    every = np.concatenate([a.reshape(-1, 3) for a in rgb]) / 255
    stats = json.loads(stats_path(root).read_text())
    np.testing.assert_allclose(stats["mean"], every.mean(0), atol=1e-6)
    np.testing.assert_allclose(stats["std"], every.std(0), atol=1e-6)
    grey = grey_folder(tmp_path / "grey", n=3)
    out = tmp_path / "lists" / "grey.txt"
    scan_command(str(grey), str(out), workers=1, on_error="skip", channels=1, stats=True)
    values = np.concatenate([np.asarray(Image.open(p)).reshape(-1) for p in sorted(grey.iterdir())]) / 255
    stats = json.loads((tmp_path / "lists" / "grey.stats.json").read_text())
    assert stats["mean"] == pytest.approx([values.mean()], abs=1e-6) and stats["std"] == pytest.approx([values.std()], abs=1e-6)
    assert normalization(1, [], [], out)[2] == str(tmp_path / "lists" / "grey.stats.json")


def test_scan_cli_stats(tmp_path, simmim_cmd):
    import subprocess

    root = grey_folder(tmp_path / "grey", n=2)
    done = subprocess.run([*simmim_cmd, "scan", str(root), "--channels", "1", "--stats", "--workers", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "per-channel mean" in done.stdout and stats_path(root).is_file()
    assert json.loads((tmp_path / "grey.clean.files.json").read_text())["channels"] == 1


# ---------------------------------------------------------------- FFCV and DALI: grey


def grey_ramps(root, n: int = 12):
    """n 96 x 80 grey PNGs whose level is (x + 2y + 7i) % 256: a box or flip shows in the pixels."""
    root.mkdir(parents=True)
    y, x = np.mgrid[0:80, 0:96]
    for i in range(n):
        Image.fromarray(((x + 2 * y + 7 * i) % 256).astype(np.uint8), "L").save(root / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("backend,max_level", [("ffcv", 0), ("dali", 1)])
@pytest.mark.parametrize("train", [True, False])
def test_grey_views_match_the_torch_backend(tmp_path, backend, max_level, train):
    """data.channels=1 on FFCV (RGB .beton of grey files, luma on the device) and DALI (GRAY decoder):
    (B, 1, S, S), the torch backend's views (same boxes and flips; FFCV's resize is Pillow's)."""
    pytest.importorskip("ffcv" if backend == "ffcv" else "nvidia.dali")
    root = grey_ramps(tmp_path / "grey")
    aug = Augmentation(size=32, mean=(0.45,), std=(0.22,))
    path = root
    if backend == "ffcv":
        from simmim.pipeline.convert import convert

        path = tmp_path / "grey.beton"
        convert(str(root), str(path), write_mode="raw", workers=1, progress=False)
    kw = dict(train=train, drop_last=train, channels=1)
    ref = build_loader(LoaderSpec("torch", str(root), aug, 4, 0, **kw), None, "cpu", seed=5)
    got = build_loader(LoaderSpec(backend, str(path), aug, 4, 1, **kw), None, "cpu", seed=5)
    for epoch in (0, 2):
        ref.set_epoch(epoch)
        got.set_epoch(epoch)
        for (a,), (b,) in zip(ref, got):
            assert a.shape == b.shape == (4, 1, 32, 32)
            assert ((a - b).abs().max() * 0.22 * 255).item() <= max_level + 1e-3
    preview_ref, preview_got = ref.preview_batch(3)[0], got.preview_batch(3)[0]
    assert preview_got.shape == (3, 1, 32, 32) and torch.allclose(preview_ref, preview_got, atol=1e-5)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["grey", "npy5"])
def test_pretrain_one_epoch_on_grey_and_five_channel_folders(tmp_path, kind):
    """`simmim scan --channels C --stats` then one epoch of `simmim pretrain` with data.channels=C:
    a grey PNG folder (1 channel) and a folder of 5-channel uint16 .npy arrays. The encoder takes C
    channels (in_chans), the loss is finite, the reconstruction figure is written, and the run
    normalised with the scan's statistics."""
    from simmim.trainer.pretrain import pretrain

    if kind == "grey":
        root, channels = grey_folder(tmp_path / "grey", n=8, size=(72, 80)), 1
    else:
        (root, _), channels = npy_folder(tmp_path / "ms", n=8, channels=5, size=(70, 66)), 5
    scan_command(str(root), None, workers=1, on_error="skip", channels=channels, stats=True)
    out = tmp_path / "run"
    overrides = [f"data.path={root}", f"data.channels={channels}", f"run.out_dir={out}", "data.val_path=",
                 "data.img_size=64", "data.batch_size=4", "data.num_workers=0", "model.arch=swin_micro",
                 "model.window_size=2", "run.progress=false", "run.vis_every=1", "run.knn_every=0", "train.epochs=1",
                 "train.warmup_epochs=0", "train.device=cpu"]
    summary = pretrain(load_config("demo", overrides))
    assert len(summary["epochs"]) == 1 and np.isfinite(summary["epochs"][0]["loss"])
    log = (out / "log.txt").read_text()
    assert f"{channels} channel{'s' * (channels > 1)} normalised by {stats_path(root)} mean" in log
    assert list(out.glob("checkpoint-*.pt")) and list(out.rglob("*.png"))
    ckpt = torch.load(next(out.glob("checkpoint-*.pt")), map_location="cpu", weights_only=True)
    weights = ckpt["model"] if "model" in ckpt else ckpt
    embed = next(v for k, v in weights.items() if k.endswith("patch_embed.proj.weight"))
    assert embed.shape[1] == channels


def test_backend_limits_are_one_line(tmp_path):
    """DALI in a grey run refuses .npy arrays (a grey torch run reads them); fine-tuning's RandAugment
    is refused at load where no backend can apply it."""
    pytest.importorskip("nvidia.dali")
    root = grey_folder(tmp_path / "grey", n=3)
    np.save(root / "x.npy", np.zeros((40, 48), np.uint8))
    assert len(scan_folder(root, channels=1)[0]) == 4
    with pytest.raises(DatasetError, match=r"data.backend=dali decodes image files, not arrays such as .*x.npy"):
        build_loader(LoaderSpec("dali", str(root), Augmentation(size=16, mean=(0.5,), std=(0.2,)), 2, 1, channels=1),
                     None, "cpu")
    from simmim.trainer.finetune_options import FinetuneConfig

    for overrides in (["data.channels=5"], ["data.channels=1", "data.backend=ffcv"]):
        with pytest.raises(ConfigError, match="finetune.rand_augment works on RGB images"):
            load_config(None, overrides, FinetuneConfig)
    assert load_config(None, ["data.channels=1"], FinetuneConfig).finetune.rand_augment
    assert load_config(None, ["data.channels=5", "finetune.rand_augment="], FinetuneConfig).data.channels == 5


def test_a_multi_band_tiff_is_never_read_as_rgb_or_grey(tmp_path):
    """A 4-band TIFF (tifffile tags its 4th band alpha by default) in an RGB or grey run is refused,
    naming data.channels, not trained on with a band dropped; RGB TIFFs read as before."""
    bands = 4
    import tifffile

    from simmim.pipeline.decode import DecodeError, decode_grey, decode_rgb
    a = np.random.default_rng(0).integers(0, 256, (8, 9, bands), dtype=np.uint8)
    path = tmp_path / "bands.tif"
    tifffile.imwrite(path, a)
    for decode in (decode_rgb, decode_grey):
        with pytest.raises(DecodeError, match=rf"a TIFF of {bands} bands: .*set data.channels={bands}"):
            decode(path)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, a[..., :3])
    assert np.array_equal(np.asarray(decode_rgb(rgb)), a[..., :3])  # RGB TIFFs as before


def test_an_npy_folder_read_as_rgb_names_data_channels(tmp_path):
    """A folder of .npy arrays with the default data.channels=3 (which reads image files only)
    says how many arrays it found and that data.channels reads them, not just "no images"."""
    from simmim.core.errors import DatasetError
    root = tmp_path / "arrays"
    root.mkdir()
    for i in range(3):
        np.save(root / f"{i}.npy", np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(DatasetError, match=r"has no images .*; found 3 .npy files: .npy arrays are read with "
                                           r"data.channels=1 or N"):
        scan_folder(root)
