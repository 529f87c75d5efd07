"""pipeline/rand_augment.py: the spec parser, timm's PIL RandAugment for the torch backend, and the
batched device RandAugment for FFCV (per-image ops and magnitudes without a loop over the batch)."""
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from simmim.core.errors import ConfigError
from simmim.pipeline.rand_augment import (BATCH_OPS, INCREASING_OPS, BatchRandAugment, PILRandAugment, RandAugmentSpec,
                                          parse_rand_augment)

FILL = (124, 116, 104)


def test_parse_spec():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == RandAugmentSpec(2, 9, 0.5, 10, True, 0.5)
    assert parse_rand_augment("rand-n3-m10-p0.7-mmax12") == RandAugmentSpec(3, 10, 0.0, 12, False, 0.7)
    assert parse_rand_augment("rand-mstd101").magnitude_std == float("inf")  # timm: uniform magnitudes
    assert parse_rand_augment("rand-inc1").ops == INCREASING_OPS and len(INCREASING_OPS) == 15
    for bad, match in [("autoaug", "must look like"), ("", "must look like"), ("rand-m9-x3", "unknown section 'x3'"),
                       ("rand-m9.5", "integer"), ("rand-p1.5", "p must lie"), ("rand-tweights", "unknown section")]:
        with pytest.raises(ConfigError, match=match):
            parse_rand_augment(bad)


def test_pil_rand_augment_is_seeded_per_sample():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ra = PILRandAugment("rand-m9-mstd0.5-inc1", (0.485, 0.456, 0.406))
    state = random.getstate()
    outs = [np.asarray(ra(img, random.Random(i))) for i in range(40)]
    # timm draws from the global generators: seeded from the sample's rng, and left as they were
    assert random.getstate() == state
    assert all(np.array_equal(np.asarray(ra(img, random.Random(i))), outs[i]) for i in range(40))
    # two ops, each applied with p = 0.5: ~3/4 of the images change
    assert all(o.shape == (64, 64, 3) for o in outs) and sum(not np.array_equal(o, np.asarray(img)) for o in outs) >= 20
    # the top magnitudes (noise around m9 reaches 10) posterize to >= 1 bit rather than raising
    strong = PILRandAugment("rand-n3-m10-mstd0.5-inc1", (0.5, 0.5, 0.5))
    for i in range(300):
        strong(img, random.Random(i))
    with pytest.raises(ConfigError, match="rand-m9"):
        PILRandAugment("autoaug", (0.5, 0.5, 0.5))


def batch(n=4, size=40, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def increasing(level, sign):
    return max(0.1, 1 + sign * level * 0.9)


# op -> (torchvision on one image at (level, sign), largest difference in grey levels)
SINGLE = {
    "BrightnessIncreasing": (lambda im, lv, s: TF.adjust_brightness(im, increasing(lv, s)), 0),
    "ContrastIncreasing": (lambda im, lv, s: TF.adjust_contrast(im, increasing(lv, s)), 0),
    "ColorIncreasing": (lambda im, lv, s: TF.adjust_saturation(im, increasing(lv, s)), 1),  # float rounding
    "SharpnessIncreasing": (lambda im, lv, s: TF.adjust_sharpness(im, increasing(lv, s)), 1),
    "Brightness": (lambda im, lv, s: TF.adjust_brightness(im, lv * 1.8 + 0.1), 0),
    "Contrast": (lambda im, lv, s: TF.adjust_contrast(im, lv * 1.8 + 0.1), 0),
    "PosterizeIncreasing": (lambda im, lv, s: TF.posterize(im, max(1, 4 - int(lv * 4))), 0),
    "Posterize": (lambda im, lv, s: TF.posterize(im, max(1, int(lv * 4))), 0),
    "SolarizeIncreasing": (lambda im, lv, s: TF.solarize(im, 256 - min(256, int(lv * 256))), 0),
    "Solarize": (lambda im, lv, s: TF.solarize(im, min(256, int(lv * 256))), 0),
    "AutoContrast": (lambda im, lv, s: TF.autocontrast(im), 0),
    "Equalize": (lambda im, lv, s: TF.equalize(im), 0),
    "Invert": (lambda im, lv, s: TF.invert(im), 0),
    "Rotate": (lambda im, lv, s: TF.rotate(im, lv * 30 * s, InterpolationMode.BILINEAR, fill=list(FILL)), 1),
    # timm's translation by t is PIL's inverse map x + t: torchvision's image shift by -t
    "TranslateXRel": (lambda im, lv, s: TF.affine(im, 0.0, [-lv * 0.45 * s * 40, 0.0], 1.0, [0.0, 0.0],
                                                  InterpolationMode.BILINEAR, fill=list(FILL)), 1),
    "TranslateYRel": (lambda im, lv, s: TF.affine(im, 0.0, [0.0, -lv * 0.45 * s * 40], 1.0, [0.0, 0.0],
                                                  InterpolationMode.BILINEAR, fill=list(FILL)), 1),
}


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_batched_ops_match_torchvision_per_image(name):
    """Each op, run once on a batch whose images have different magnitudes and signs, gives every
    image what torchvision gives it alone with that image's parameter."""
    x = batch()
    level = torch.tensor([0.1, 0.35, 0.62, 0.97], dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    out = BATCH_OPS[name](x, level, sign, torch.tensor(FILL, dtype=torch.float32))
    reference, tolerance = SINGLE[name]
    for i in range(len(x)):
        expected = reference(x[i], level[i].item(), sign[i].item())
        assert (out[i].int() - expected.int()).abs().max() <= tolerance, (name, i)
    assert out.dtype == torch.uint8 and out.shape == x.shape


@pytest.mark.parametrize("name,factor", [("ShearX", 0.2), ("ShearY", -0.27), ("TranslateXRel", 0.3),
                                         ("TranslateYRel", -0.21), ("Rotate", 17.0)])
def test_geometric_ops_follow_timm(name, factor):
    """Against timm's own PIL ops (bilinear, the same fill): equal to 2 grey levels away from the
    edges where the image leaves the frame (PIL fills there without blending)."""
    from timm.data import auto_augment as A

    yy, xx = np.mgrid[0:48, 0:48]
    img = np.stack([xx * 5, yy * 5, (xx + yy) * 2.5], -1).clip(0, 255).astype(np.uint8)  # smooth ramps
    pil = Image.fromarray(img)
    fn = {"ShearX": A.shear_x, "ShearY": A.shear_y, "TranslateXRel": A.translate_x_rel,
          "TranslateYRel": A.translate_y_rel, "Rotate": A.rotate}[name]
    theirs = np.asarray(fn(pil, factor, resample=Image.BILINEAR, fillcolor=FILL)).astype(int)
    level = abs(factor) / {"ShearX": 0.3, "ShearY": 0.3, "Rotate": 30}.get(name, 0.45)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    level, sign = torch.tensor([level], dtype=torch.float64), torch.tensor([np.sign(factor)], dtype=torch.float64)
    ours = BATCH_OPS[name](x, level, sign, torch.tensor(FILL, dtype=torch.float32))[0].permute(1, 2, 0).numpy()
    close = np.abs(ours.astype(int) - theirs) <= 2
    assert close.mean() > 0.95, (name, close.mean())


def test_solarize_add_matches_timm():
    from timm.data import auto_augment as A

    x = batch(2)
    out = BATCH_OPS["SolarizeAdd"](x, torch.tensor([0.5, 0.9], dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                                   torch.tensor(FILL, dtype=torch.float32))
    for i, add in enumerate([55, 99]):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), np.asarray(A.solarize_add(pil, add)))


def test_batch_rand_augment_is_seeded():
    ra = BatchRandAugment("rand-m9-mstd0.5-inc1", FILL)
    x = batch(16, 32)
    before = x.clone()
    a = ra(x, torch.Generator().manual_seed(1))
    assert torch.equal(x, before)  # the input is left as it was
    assert a.dtype == torch.uint8 and a.shape == x.shape and a.device == x.device
    assert torch.equal(a, ra(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, ra(x, torch.Generator().manual_seed(2)))
    changed = sum(not torch.equal(a[i], x[i]) for i in range(16))
    assert 6 <= changed < 16  # each of 2 ops applied with p 0.5 (and a few ops can leave an image as it is)
    with pytest.raises(ValueError, match="uint8"):
        ra(x.float(), torch.Generator())


def test_draws_follow_timms_policy():
    """Op choice uniform over the 15 ops, p = 0.5, magnitude ~ N(9, 0.5) clipped to [0, 10], signs +-1."""
    ra = BatchRandAugment("rand-m9-mstd0.5-inc1", FILL)
    op, applied, level, sign = ra.draw(60000, torch.Generator().manual_seed(0))
    counts = torch.bincount(op, minlength=15).double() / len(op)
    assert counts.min() > 0.9 / 15 and counts.max() < 1.1 / 15
    assert abs(applied.double().mean().item() - 0.5) < 0.01
    magnitude = level * 10
    assert magnitude.max() <= 10 and abs(magnitude.mean().item() - 9.0) < 0.02
    assert abs(magnitude[magnitude < 9.5].std().item() - 0.5) < 0.15  # the unclipped side of the bell
    assert set(sign.tolist()) == {-1.0, 1.0} and abs(sign.mean().item()) < 0.02


def test_no_loop_over_the_batch(monkeypatch):
    """The ops run once per (layer, op drawn), whatever the batch size: 64 images make no more op
    calls than 8. The time of both is printed side by side (not asserted: a shared CPU)."""
    ra = BatchRandAugment("rand-m9-mstd0.5-inc1", FILL)
    calls = []
    for name, fn in list(ra.ops.items()):
        ra.ops[name] = lambda x, lv, s, fill, fn=fn: calls.append(len(x)) or fn(x, lv, s, fill)
    times = {}
    for n in (8, 64):
        x = batch(n, 96)
        ra(x, torch.Generator().manual_seed(0))  # warm-up
        calls.clear()
        t0 = time.perf_counter()
        ra(x, torch.Generator().manual_seed(0))
        times[n] = time.perf_counter() - t0
        assert len(calls) <= 2 * 15 and sum(calls) <= 2 * n
        if n == 64:
            assert max(calls) > 1  # ops saw several images at once
    print(f"BatchRandAugment, 96 px, CPU: B=8 {1e3 * times[8]:.1f} ms, B=64 {1e3 * times[64]:.1f} ms "
          f"({times[64] / times[8]:.2f}x the time for 8x the images)")


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_each_backend_applies_its_rand_augment(backend, sample_root, tmp_path, monkeypatch):
    """The spec reaches FFCV and DALI through LoaderSpec.rand_augment (the torch backend's timm op:
    tests/test_loaders.py): FFCV runs the batched device op keyed by (seed, epoch, batch, rank), DALI
    its own in the graph (CPU-only here). Batches keep the contract; the evaluation view is never
    augmented."""
    from simmim.pipeline import Augmentation, LoaderSpec, build_loader
    from simmim.core.seeding import derive_seed

    path = str(sample_root / "train")
    if backend == "ffcv":
        pytest.importorskip("ffcv")
        from simmim.pipeline.convert import convert

        convert(path, str(tmp_path / "train.beton"), workers=1, progress=False)
        path = str(tmp_path / "train.beton")
    else:
        pytest.importorskip("nvidia.dali")
    spec = "rand-m9-mstd0.5-inc1"

    def load(rand_augment, train=True, seed=3):
        loader = build_loader(LoaderSpec(backend, path, Augmentation(size=32), batch_size=4, num_workers=1,
                                         train=train, labels=True, rand_augment=rand_augment), None, "cpu", 0, 1, seed)
        loader.set_epoch(1)
        return loader

    loader = load(spec)
    if backend == "ffcv":
        assert isinstance(loader.batch_transform, BatchRandAugment) and load(spec, train=False).batch_transform is None
        seeds, op = [], loader.batch_transform
        monkeypatch.setattr(loader, "batch_transform", lambda x, g: seeds.append(g.initial_seed()) or op(x, g))
    else:
        graph = loader.graph  # DALI's graph holds it (dali_graph.DALIGraph)
        assert graph.rand_augment == parse_rand_augment(spec) and load(spec, train=False).graph.rand_augment is None
    batches = [b for _, b in zip(range(2), loader)]
    for images, labels in batches:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.shape == (4,)
        assert torch.isfinite(images).all() and images.abs().max() < 3  # normalised uint8 pixels
    if backend == "ffcv":
        assert seeds == [derive_seed("device_augment", 3, 1, k, 0) for k in range(2)]
    else:  # DALI's CPU pipeline is seeded: same seed, same batches; and the op changes them
        again = [b for _, b in zip(range(2), load(spec))]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
        plain = [b for _, b in zip(range(2), load(""))]
        assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, plain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batched_on_the_gpu_matches_the_cpu():
    """The same draws on a CUDA batch give the CPU's images (bilinear warps may round one grey
    level apart); the time of 8 and 64 images is printed side by side."""
    ra = BatchRandAugment("rand-m9-mstd0.5-inc1", FILL)
    x = batch(64, 96)
    cpu = ra(x, torch.Generator().manual_seed(5))
    gpu = ra(x.cuda(), torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8
    diff = (gpu.cpu().int() - cpu.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    times = {}
    for n in (8, 64, 8, 64):
        images = batch(n, 192).cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ra(images, torch.Generator().manual_seed(0))
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - t0  # the second round's, after a warm-up
    print(f"BatchRandAugment, 192 px, {torch.cuda.get_device_name()}: B=8 {1e3 * times[8]:.2f} ms, "
          f"B=64 {1e3 * times[64]:.2f} ms")
