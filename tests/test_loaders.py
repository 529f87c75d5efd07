"""The loader base (pipeline/loader.py) as every backend sees it: built from a LoaderSpec, the figure
preview, the device-transform hook, RandAugment through the spec."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.pipeline import Augmentation, LoaderSpec, MaskGenerator, ReferenceLoader, build_loader
from simmim.pipeline.augment import denormalize, normalize


def tiny_folder(root, n: int = 6, bad: tuple[int, ...] = ()):
    """n 48x40 JPEGs in one class folder (file i filled with grey level 20 * i + 10); the files at
    `bad` hold the first third of a JPEG (truncated)."""
    cls = root / "c0"
    cls.mkdir(parents=True)
    for i in range(n):
        path = cls / f"img{i}.JPEG"
        Image.fromarray(np.full((40, 48, 3), 20 * i + 10, np.uint8)).save(path, quality=95)
        if i in bad:
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 3])
    return root


def test_preview_batch_is_fixed_and_skips_a_bad_file(tmp_path, caplog):
    """The figure batch: the same images and masks every call and after epochs; a file that fails
    to decode is skipped with a warning naming it (it used to end the run before step 0) and the
    next readable one taken; the masks are the seed's, not an epoch's."""
    root = tiny_folder(tmp_path / "d", bad=(0,))
    spec = LoaderSpec("torch", str(root), Augmentation(size=16), batch_size=2, num_workers=0)
    loader = build_loader(spec, MaskGenerator(16, 8, 0.5), "cpu", seed=3)
    with caplog.at_level(logging.WARNING):
        images, masks = loader.preview_batch(3)
    assert any("img0.JPEG" in r.getMessage() for r in caplog.records)
    # wanted samples 0, 2, 5 (even spread); 0 is bad, so 1 takes its place
    levels = (denormalize(images, spec.aug.mean, spec.aug.std).mean((1, 2, 3)) * 255).tolist()
    assert levels == pytest.approx([30, 50, 110], abs=3)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32 and masks.shape == (3, 2, 2)
    loader.set_epoch(4)
    list(loader)
    again = loader.preview_batch(3)
    assert torch.equal(again[0], images) and torch.equal(again[1], masks)
    other = build_loader(spec, MaskGenerator(16, 8, 0.5), "cpu", seed=4).preview_batch(3)
    assert torch.equal(other[0], images) and not torch.equal(other[1], masks)


def test_preview_batch_dali_file_broken_after_the_scan(tmp_path, caplog):
    """DALI checks its list before the first epoch; a listed file broken afterwards is skipped by
    the preview with a warning naming it, not a failed run."""
    pytest.importorskip("nvidia.dali")
    root = tiny_folder(tmp_path / "d")
    spec = LoaderSpec("dali", str(root), Augmentation(size=16), batch_size=2, num_workers=1, labels=True)
    loader = build_loader(spec, None, "cpu")
    broken = root / "c0" / "img5.JPEG"
    broken.write_bytes(b"not a JPEG any more")
    with caplog.at_level(logging.WARNING):
        (images,) = loader.preview_batch(3)
    assert images.shape == (3, 3, 16, 16)
    assert any(str(broken) in r.getMessage() for r in caplog.records)


def test_device_transform_hook_runs_on_uint8_training_batches(tmp_path):
    """A backend's batched augmentation plugs in by overriding `device_transform`: it sees the
    training view's uint8 batch on the device before normalisation; the evaluation view skips it."""
    root = tiny_folder(tmp_path / "d")
    seen = []

    class Inverted(ReferenceLoader):
        def device_transform(self):
            def invert(images, generator):
                seen.append((images.dtype, type(generator)))
                return 255 - images
            return invert

    aug = Augmentation(size=16)
    spec = LoaderSpec("torch", str(root), aug, batch_size=3, num_workers=0)
    plain, inverted = ReferenceLoader(spec, None, "cpu"), Inverted(spec, None, "cpu")
    (a,), (b,) = next(iter(plain)), next(iter(inverted))
    assert seen == [(torch.uint8, torch.Generator)]
    u8 = torch.round((a.double() * torch.tensor(aug.std).view(1, 3, 1, 1)
                      + torch.tensor(aug.mean).view(1, 3, 1, 1)) * 255).to(torch.uint8)
    assert torch.allclose(b, normalize(255 - u8, aug.mean, aug.std), atol=1e-5)
    evaluation = Inverted(LoaderSpec("torch", str(root), aug, batch_size=3, num_workers=0, train=False), None, "cpu")
    assert evaluation.batch_transform is None


def test_rand_augment_reaches_the_torch_backend_through_the_spec(tmp_path):
    """spec.rand_augment: timm's RandAugment on the PIL crop in the workers, a function of
    (seed, epoch, index) whatever the worker count; the evaluation view has none."""
    root = tiny_folder(tmp_path / "d", n=8)
    for i, path in enumerate(sorted((root / "c0").iterdir())):  # texture, so the ops show
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    aug = Augmentation(size=16)

    def batch(workers: int, rand_augment: str = "", train: bool = True):
        spec = LoaderSpec("torch", str(root), aug, batch_size=8, num_workers=workers, train=train,
                          rand_augment=rand_augment)
        return next(iter(build_loader(spec, None, "cpu", seed=1)))[0]

    plain, ra0, ra1 = batch(0), batch(0, "rand-m9-mstd0.5-inc1"), batch(1, "rand-m9-mstd0.5-inc1")
    assert torch.equal(ra0, ra1) and not torch.equal(plain, ra0)
    assert torch.equal(batch(0, train=False), batch(0, "rand-m9-mstd0.5-inc1", train=False))
    with pytest.raises(ValueError, match="rand-m9"):
        batch(0, "autoaug")


def test_torch_workers_normalise_on_the_cpu_into_shared_memory(tmp_path):
    """On the CPU the reference loader's workers normalise (the main process's intra-op threads
    spun against them); the batches equal those loaded in the main process (workers=0, uint8
    normalised by the base), and a worker's batch arrives in shared memory (nothing copied)."""
    from simmim.pipeline.reference import WorkerCollate

    root = tiny_folder(tmp_path / "d", n=8)
    aug = Augmentation(size=16)
    batches = {}
    for workers in (0, 2):
        loader = build_loader(LoaderSpec("torch", str(root), aug, batch_size=4, num_workers=workers),
                              MaskGenerator(16, 8, 0.5), "cpu", seed=5)
        loader.set_epoch(1)
        batches[workers] = list(loader)
        assert loader.loader.collate_fn.normalize == (workers > 0)
    for (a, ma), (b, mb) in zip(batches[0], batches[2]):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b) and torch.equal(ma, mb)
    samples = [(torch.full((3, 4, 4), 10 * i, dtype=torch.uint8), i) for i in range(3)]
    dl = torch.utils.data.DataLoader(samples, batch_size=3, num_workers=1,
                                     collate_fn=WorkerCollate(aug, torch.float32, True))
    images, labels = next(iter(dl))
    assert images.is_shared() and labels.tolist() == [0, 1, 2]
    assert torch.equal(images, normalize(torch.stack([s[0] for s in samples]), aug.mean, aug.std))


def test_sampler_seeds_are_derive_seed_per_sample():
    """The sampler derives a block of seeds at once; each is still derive_seed of its sample."""
    from simmim.pipeline import ShardedSampler
    from simmim.core.seeding import derive_seed

    sampler = ShardedSampler(5000, rank=1, world_size=2, seed=7)
    sampler.set_epoch(3, start=10)
    pairs = list(sampler)
    assert len(pairs) == 2490 and [i for i, _ in pairs] == sampler.indices().tolist()
    assert all(s == derive_seed("sample", 7, 3, i) for i, s in pairs[::97] + pairs[-3:])
