"""One training view in every backend: the torch, FFCV and DALI loaders crop the same box and flip
the same samples, drawn per sample from (seed, epoch, index) (`augment.sample_view`), so FFCV and
DALI resume mid-epoch bit for bit and do not depend on their worker count.

Measured on 24 ramp images (PNG, 256 px, lossless so the decoders agree; 48 px crops), uint8 levels
against the torch loader over two epochs:
  FFCV (.beton of raw pixels)   identical (the same Pillow filter in numba)
  DALI (CPU)                    max 1 (its antialiased bilinear resize)
Before (crops drawn by numba's and DALI's own generators): DALI mean 27.9, max 249; FFCV mean 24.4,
max 247 (other boxes, other flips); a resumed epoch differed from the uninterrupted one in every
batch for both, and FFCV's batches changed with its thread count (2 vs 1).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from simmim.pipeline import Augmentation, ReferenceLoader, sample_view
from simmim.pipeline.loaders import available

from helpers import make_loader, make_ramps

SIZE = 48
SEED = 7


@pytest.fixture(scope="module")
def ramp_set(tmp_path_factory):
    return make_ramps(tmp_path_factory.mktemp("views"), n=24)


@pytest.fixture(scope="module")
def ramp_beton(ramp_set, tmp_path_factory):
    pytest.importorskip("ffcv")
    from simmim.pipeline.convert import convert

    dst = tmp_path_factory.mktemp("views_beton") / "ramps.beton"
    convert(str(ramp_set), str(dst), write_mode="raw", workers=2, progress=False)
    return dst


def uint8(images: torch.Tensor, aug: Augmentation) -> np.ndarray:
    """Normalised float (B, 3, S, S) -> the uint8 levels the backend produced, (B, S, S, 3) int32."""
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1)
    return (images.float() * std + mean).mul(255).round().permute(0, 2, 3, 1).numpy().astype(np.int32)


def epoch_images(loader, epoch: int, start_batch: int = 0) -> list[torch.Tensor]:
    loader.set_epoch(epoch, start_batch)
    return [batch[0].clone() for batch in loader]


def backend_loader(backend: str, ramp_set, ramp_beton_path, workers: int, aug: Augmentation, rank=0, world_size=1):
    if backend == "ffcv":
        return make_loader("ffcv", str(ramp_beton_path), aug, None, 4, workers, rank=rank, world_size=world_size, seed=SEED)
    return make_loader(backend, str(ramp_set), aug, None, 4, workers, rank=rank, world_size=world_size, seed=SEED)


def needs(backend):
    return pytest.mark.skipif(not available(backend), reason=f"{backend} not installed")


@pytest.mark.parametrize("backend, max_level", [pytest.param("dali", 1, marks=needs("dali")),
                                                 pytest.param("ffcv", 0, marks=[needs("ffcv"), pytest.mark.slow])])
def test_same_boxes_and_flips_as_the_torch_loader(backend, max_level, ramp_set, request):
    """Rank 1 of 2, two epochs: every image equals the torch loader's to the resampler's rounding.
    A ramp image's pixels are its coordinates, so another box or flip would differ by tens of levels."""
    aug = Augmentation(size=SIZE)
    beton = request.getfixturevalue("ramp_beton") if backend == "ffcv" else None
    ref = make_loader(ReferenceLoader, str(ramp_set), aug, None, 4, 0, rank=1, world_size=2, seed=SEED)
    got = backend_loader(backend, ramp_set, beton, 2, aug, rank=1, world_size=2)
    flips = 0
    for epoch in (0, 3):
        want, have = epoch_images(ref, epoch), epoch_images(got, epoch)
        assert len(want) == len(have) == 3
        for a, b in zip(want, have):
            a, b = uint8(a, aug), uint8(b, aug)
            assert np.abs(a - b).max() <= max_level
            flips += int((a[:, 0, 0, 0] > a[:, 0, -1, 0]).sum())  # red falls to the right: flipped
    assert 4 <= flips <= 20  # of 24 views: the comparison saw flipped and unflipped ones


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs("dali")),
                                     pytest.param("ffcv", marks=[needs("ffcv"), pytest.mark.slow])])
def test_mid_epoch_resume_and_worker_count(backend, ramp_set, request):
    """A fresh loader started at batch 2 of epoch 1 (a resumed run) gives the uninterrupted epoch's
    batches bit for bit; so does a loader with another number of workers."""
    aug = Augmentation(size=SIZE)
    beton = request.getfixturevalue("ramp_beton") if backend == "ffcv" else None
    whole = epoch_images(backend_loader(backend, ramp_set, beton, 2, aug), 1)
    assert len(whole) == 6
    resumed = epoch_images(backend_loader(backend, ramp_set, beton, 2, aug), 1, start_batch=2)
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(whole[2:], resumed))
    other = epoch_images(backend_loader(backend, ramp_set, beton, 1 if backend == "ffcv" else 3, aug), 1)
    assert all(torch.equal(a, b) for a, b in zip(whole, other))
    assert not torch.equal(whole[0], epoch_images(backend_loader(backend, ramp_set, beton, 2, aug), 2)[0])


@needs("ffcv")
@pytest.mark.slow
def test_ffcv_draws_the_next_epochs_views_while_one_trains(ramp_beton):
    """Epoch 1 after epoch 0 takes the views a thread drew during epoch 0 (`ViewsAhead`), and its
    batches equal those of a loader that drew epoch 1's views at its start."""
    aug = Augmentation(size=SIZE)
    ahead = make_loader("ffcv", str(ramp_beton), aug, None, 4, 2, seed=SEED)
    epoch_images(ahead, 0)
    assert ahead.ahead.precomputed == 0
    got = epoch_images(ahead, 1)
    assert ahead.ahead.precomputed == 1
    fresh = make_loader("ffcv", str(ramp_beton), aug, None, 4, 2, seed=SEED)
    want = epoch_images(fresh, 1)
    assert fresh.ahead.precomputed == 0
    assert len(got) == len(want) == 6 and all(torch.equal(a, b) for a, b in zip(got, want))
    thread = ahead.ahead.thread  # drawing epoch 2
    ahead.close()
    assert thread is not None and thread.daemon and not thread.is_alive()


@needs("dali")
def test_dali_box_is_drawn_on_the_stored_image(tmp_path):
    """EXIF orientation is not applied (decode.py): the source draws the box on the stored 64x32
    pixels, not the 32x64 a rotating decoder would show, and DALI's crop equals the torch loader's."""
    from simmim.pipeline.dali_graph import header_size

    d = tmp_path / "exif" / "c0"
    d.mkdir(parents=True)
    x = np.arange(64, dtype=np.uint8) * 4
    ramp = np.stack([np.tile(x[None, :], (32, 1)), np.tile(x[:32, None] * 2, (1, 64)),
                     np.full((32, 64), 128, np.uint8)], axis=-1)  # (32, 64, 3): red = 4x, green = 8y
    for i in range(8):
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 on display
        Image.fromarray(ramp).save(d / f"{i}.JPEG", exif=exif, quality=100, subsampling=0)
    assert header_size(np.fromfile(d / "0.JPEG", np.uint8)) == (64, 32)
    aug = Augmentation(size=16)
    ref = make_loader(ReferenceLoader, str(tmp_path / "exif"), aug, None, 8, 0, seed=SEED)
    got = make_loader("dali", str(tmp_path / "exif"), aug, None, 8, 1, seed=SEED)
    a, b = uint8(epoch_images(ref, 0)[0], aug), uint8(epoch_images(got, 0)[0], aug)
    assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 6  # JPEG decoders: libjpeg vs DALI's
    views = [sample_view(64, 32, aug, SEED, 0, i) for i in range(8)]
    assert any(w > 32 for _, _, w, _, _ in views)  # boxes only the stored orientation can hold


# ---------------------------------------------------------------- the evaluation view

@pytest.mark.parametrize("size, crop_ratio", [(64, 0.875), (192, 0.875), (224, 224 / 256), (224, 1.0), (97, 0.9)])
def test_eval_geometry_is_torchvision_resize_and_center_crop(size, crop_ratio):
    """`eval_geometry` against torchvision's own Resize(int(size / crop_ratio)) + CenterCrop(size) on
    images of awkward sizes (odd, prime, wide, tall, just larger than the crop)."""
    import torchvision.transforms.v2.functional as TF

    from simmim.pipeline.augment import eval_geometry

    short = int(size / crop_ratio)
    for w, h in [(333, 500), (500, 333), (325, 217), (short, short), (short + 1, 997), (1031, short + 3), (640, 480)]:
        rw, rh, left, top = eval_geometry(w, h, size, crop_ratio)
        resized = TF.resize(torch.zeros(1, h, w), [short], antialias=False)
        assert (rw, rh) == (resized.shape[2], resized.shape[1]), (w, h)
        ys, xs = torch.meshgrid(torch.arange(rh), torch.arange(rw), indexing="ij")
        crop = TF.center_crop(torch.stack([xs, ys]), [size, size])
        assert (left, top) == (int(crop[0, 0, 0]), int(crop[1, 0, 0])), (w, h)


@pytest.fixture(scope="module")
def eval_files(sample_root, tmp_path_factory):
    """The sample set's validation JPEGs, and a .beton of their pixels at full size (raw)."""
    beton = None
    if available("ffcv"):
        from simmim.pipeline.convert import convert

        beton = tmp_path_factory.mktemp("views_eval") / "val.beton"
        convert(str(sample_root / "val"), str(beton), max_resolution=None, write_mode="raw", workers=2, progress=False)
    return sample_root / "val", beton


@pytest.mark.parametrize("backend, bound", [("torch", (0.0, 0)), pytest.param("dali", (0.3, 2), marks=needs("dali")),
                                            pytest.param("ffcv", (0.0, 0), marks=[needs("ffcv"), pytest.mark.slow])])
def test_eval_view_is_torchvision_resize_and_center_crop(backend, bound, eval_files):
    """Every backend's evaluation view (train=False) against torchvision's Resize + CenterCrop of the
    decoded image: (mean, max) uint8 levels. Measured at 64 px on the sample set's 15 validation
    JPEGs: torch and FFCV (raw pixels) identical, DALI mean 0.09, max 1 (its decoder and resampler).
    Before (a resize from a fractional centre square): torch mean 8.7, max 126; FFCV 8.8 / 147;
    DALI 13.8 / 200."""
    import torchvision.transforms.v2 as T

    from simmim.pipeline.decode import decode_rgb

    folder, beton = eval_files
    aug = Augmentation(size=64)
    path = beton if backend == "ffcv" else folder
    loader = make_loader(backend, str(path), aug, None, 4, 0 if backend == "torch" else 2, train=False,
                         drop_last=False)
    ref = make_loader(ReferenceLoader, str(folder), aug, None, 4, 0, train=False, drop_last=False)
    tv = T.Compose([T.Resize(int(64 / 0.875)), T.CenterCrop(64)])
    want = np.stack([np.asarray(tv(decode_rgb(f))) for f in ref.samples.paths()]).astype(np.int32)
    got = np.concatenate([uint8(batch[0], aug) for batch in loader])
    assert got.shape == want.shape == (len(ref.samples), 64, 64, 3)
    diff = np.abs(got - want)
    assert diff.mean() <= bound[0] and diff.max() <= bound[1], (diff.mean(), diff.max())
