import random

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.core.errors import DatasetError
from simmim.pipeline import (Augmentation, ImageFolder, MaskGenerator, ReferenceLoader, ShardedSampler, sample_crop,
                             scan_folder)
from simmim.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from simmim.pipeline.sample_data import CLASSES

from helpers import HOSTILE_BAD, HOSTILE_GOOD, make_loader


def test_sample_dataset_layout(sample_root):
    classes = sorted(p.name for p in (sample_root / "train").iterdir())
    assert classes == sorted(CLASSES)
    files = list((sample_root / "train").rglob("*.JPEG"))
    assert len(files) == 4 * sum(len(v) for v in CLASSES.values())
    sizes = [Image.open(f).size for f in files[:20]]
    assert all(200 <= max(s) <= 500 for s in sizes) and len(set(sizes)) > 3
    assert {Image.open(f).mode for f in files} == {"RGB", "L"}  # grayscale kept, as in ImageNet
    assert (sample_root / "val").is_dir() and (sample_root / ".complete").exists()


def test_sample_dataset_is_kept_and_rebuilt(sample_root, tmp_path):
    from simmim.pipeline.sample_data import build_sample_dataset

    stamp = (sample_root / ".complete").stat().st_mtime_ns
    build_sample_dataset(sample_root, per_photo=4, val_per_photo=1)
    assert (sample_root / ".complete").stat().st_mtime_ns == stamp
    out = build_sample_dataset(tmp_path / "s", per_photo=1, val_per_photo=0)
    assert len(list(out.rglob("*.JPEG"))) == sum(len(v) for v in CLASSES.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_loader_contract(sample_root):
    aug = Augmentation(size=64)
    loader = make_loader(ReferenceLoader, str(sample_root / "train"), aug, MaskGenerator(64, 32, 0.6), batch_size=8,
                         num_workers=2)
    assert len(loader) == len(loader.dataset) // 8
    batches = list(loader)
    assert len(batches) == len(loader)
    images, masks = batches[0]
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert masks.shape == (8, 2, 2) and masks.dtype == torch.bool and (masks.flatten(1).sum(1) == 3).all()
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert images.min() >= lo - 1e-5 and images.max() <= hi + 1e-5 and images.std() > 0.3


def test_loader_reproducible_and_epoch_dependent(sample_root):
    def first(epoch, workers):
        loader = make_loader(ReferenceLoader, str(sample_root / "train"), Augmentation(size=32),
                             MaskGenerator(32, 32, 0.6), batch_size=4, num_workers=workers, seed=5)
        loader.set_epoch(epoch)
        return next(iter(loader))
    a, b, c = first(1, 0), first(1, 2), first(2, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # independent of worker count
    assert not torch.equal(a[0], c[0])


def test_sharding_disjoint_and_covering():
    for size, world_size in [(60, 2), (61, 2), (100, 3)]:
        seen = []
        for rank in range(world_size):
            s = ShardedSampler(size, rank, world_size, seed=1)
            s.set_epoch(3)
            seen.append([i for i, _ in s])
            assert len(seen[-1]) == len(s) == size // world_size
        flat = sum(seen, [])
        assert len(set(flat)) == len(flat) == size // world_size * world_size
    a = [i for i, _ in ShardedSampler(50, 0, 1, seed=1)]
    s = ShardedSampler(50, 0, 1, seed=1)
    s.set_epoch(1)
    assert a != [i for i, _ in s] and sorted(a) == list(range(50))


def test_crop_statistics():
    rng = random.Random(0)
    areas, aspects = [], []
    for _ in range(20000):
        w, h = rng.randint(300, 400), rng.randint(300, 400)  # aspect inside the range: no clamped fallback
        x, y, cw, ch = sample_crop(w, h, (0.67, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= x and 0 <= y and x + cw <= w and y + ch <= h
        areas.append(cw * ch / (w * h))
        aspects.append(cw / ch)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() > 0.66 and areas.max() <= 1.0
    assert aspects.min() > 0.74 and aspects.max() < 1.35
    assert abs(np.median(np.log(aspects))) < 0.02
    # the same distribution as torchvision's RandomResizedCrop (misses bias it below 0.835)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    tv = []
    for _ in range(5000):
        w, h = rng.randint(300, 400), rng.randint(300, 400)
        _, _, ch, cw = RandomResizedCrop.get_params(torch.empty(1, h, w), [0.67, 1.0], [3 / 4, 4 / 3])
        tv.append(cw * ch / (w * h))
    for q in (10, 50, 90):
        assert abs(np.percentile(areas, q) - np.percentile(tv, q)) < 0.01


def test_flip_rate_and_crop_applied():
    ds = ImageFolder.__new__(ImageFolder)
    ds.aug, ds.transform = Augmentation(size=16), None
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3)))  # ramp left->right
    flips = 0
    for seed in range(400):
        out = ds.augment(img, random.Random(seed))
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
        flips += int(out[0, 8, 0]) > int(out[0, 8, -1])
    assert abs(flips / 400 - 0.5) < 0.08


def test_normalize_round_trip():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    y = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(denormalize(y, IMAGENET_MEAN, IMAGENET_STD), x.float() / 255, atol=1e-5, rtol=0)


def test_hostile_files_load_or_are_skipped(hostile, caplog):
    ds = ImageFolder(hostile, Augmentation(size=32))
    assert len(ds) == len(HOSTILE_GOOD) + len(HOSTILE_BAD)
    names = [p.split("/")[-1] for p, _ in ds.samples]
    got = {}
    with caplog.at_level("WARNING"):
        for i, name in enumerate(names):
            img, label = ds[(i, i)]
            assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 0
            got[name] = ds.samples[i][0]
    skipped = {p.split("/")[-1] for i, (p, _) in enumerate(ds.samples) if ds._bad[i]}
    assert {"empty.JPEG", "text.JPEG"} <= skipped
    assert not skipped & set(HOSTILE_GOOD)
    assert "skipping unreadable image" in caplog.text and "empty.JPEG" in caplog.text


def test_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no class folders"):
        scan_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        scan_folder(tmp_path)
    with pytest.raises(ValueError, match="unknown data.backend"):
        make_loader("nope", str(tmp_path), Augmentation(), MaskGenerator(), 2, 0, torch.device("cpu"))


def test_file_list(sample_root, tmp_path):
    files = sorted((sample_root / "train").rglob("*.JPEG"))[:6]
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{f} {i % 2}\n" for i, f in enumerate(files)))
    samples, classes = scan_folder(lst)
    assert len(samples) == 6 and classes == ["0", "1"]
    lst.write_text("a.jpg -1\n")  # a label that is not ASCII digits (a last part that is no number: a bare path)
    with pytest.raises(DatasetError, match="list.txt:1"):
        scan_folder(lst)
