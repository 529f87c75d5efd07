"""Test data the loader tests share: hostile files, and images whose pixels tell where they came
from, so a loader's crops and flips can be measured from its output alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simmim.pipeline.augment import denormalize

# every kind of odd-but-valid image ImageNet holds, and the broken kinds
HOSTILE_GOOD = ("ok.JPEG", "cmyk.JPEG", "gray.JPEG", "png_named.JPEG", "rgba.png", "thin.JPEG",
                "wide.JPEG", "tiny.JPEG", "large.JPEG", "progressive.JPEG")
HOSTILE_BAD = ("empty.JPEG", "text.JPEG", "truncated.JPEG")


def make_hostile(root: Path) -> Path:
    cls = root / "n0"
    cls.mkdir(parents=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    rgb.save(cls / "ok.JPEG")
    rgb.convert("CMYK").save(cls / "cmyk.JPEG")
    rgb.convert("L").save(cls / "gray.JPEG")
    rgb.save(cls / "png_named.JPEG", format="PNG")
    rgb.convert("RGBA").save(cls / "rgba.png")
    rgb.save(cls / "progressive.JPEG", progressive=True)
    Image.fromarray(np.zeros((2000, 20, 3), np.uint8)).save(cls / "thin.JPEG")
    Image.fromarray(np.full((8, 3000, 3), 200, np.uint8)).save(cls / "wide.JPEG")
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(cls / "tiny.JPEG")
    big = np.random.default_rng(1).integers(0, 255, (4000, 3000, 3), dtype=np.uint8)
    Image.fromarray(big).resize((3000, 4000)).save(cls / "large.JPEG", quality=50)
    (cls / "empty.JPEG").write_bytes(b"")
    (cls / "text.JPEG").write_text("not an image")
    data = (cls / "ok.JPEG").read_bytes()
    (cls / "truncated.JPEG").write_bytes(data[: len(data) // 3])
    return root


RAMP = 256


def make_ramps(root: Path, n: int = 48, classes: int = 2, fmt: str = "PNG") -> Path:
    """n RAMP x RAMP images with red = x and green = y (blue = 128): a crop's box and flip can be
    read off the output's edges."""
    x = np.arange(RAMP, dtype=np.uint8)
    img = np.stack([np.tile(x[None, :], (RAMP, 1)), np.tile(x[:, None], (1, RAMP)),
                    np.full((RAMP, RAMP), 128, np.uint8)], axis=-1)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.{'png' if fmt == 'PNG' else 'JPEG'}", format=fmt)
    return root


def crop_stats(images: torch.Tensor, mean, std) -> dict[str, np.ndarray]:
    """Area fraction, aspect (w/h) and flip of each ramp image's crop, from normalised outputs."""
    x = denormalize(images, mean, std).double() * 255  # (B, 3, S, S)
    s = x.shape[-1]
    red, green = x[:, 0], x[:, 1]
    left, right = red[:, :, 0].mean(1), red[:, :, -1].mean(1)
    top, bottom = green[:, 0, :].mean(1), green[:, -1, :].mean(1)
    flip = left > right
    w = (left - right).abs() / (1 - 1 / s)
    h = (bottom - top) / (1 - 1 / s)
    return {"area": (w * h / RAMP ** 2).numpy(), "aspect": (w / h).numpy(), "flip": flip.numpy()}


def loader_crop_stats(loader, aug, epochs: int = 6) -> dict[str, np.ndarray]:
    """crop_stats over `epochs` epochs of a loader of ramp images (no masks)."""
    parts = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        parts += [crop_stats(images, aug.mean, aug.std) for (images,) in loader]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def assert_same_augmentation(got: dict, ref: dict, tol_area: float = 0.04, tol_log_aspect: float = 0.06) -> None:
    """Percentiles of area and log aspect agree; flip rates both ~0.5."""
    for q in (10, 25, 50, 75, 90):
        a, b = np.percentile(got["area"], q), np.percentile(ref["area"], q)
        assert abs(a - b) < tol_area, f"area p{q}: {a:.3f} vs reference {b:.3f}"
        a, b = np.percentile(np.log(got["aspect"]), q), np.percentile(np.log(ref["aspect"]), q)
        assert abs(a - b) < tol_log_aspect, f"log aspect p{q}: {a:.3f} vs reference {b:.3f}"
    assert got["area"].min() > 0.6 and got["area"].max() < 1.03
    assert got["aspect"].min() > 0.7 and got["aspect"].max() < 1.4
    for stats in (got, ref):
        assert abs(stats["flip"].mean() - 0.5) < 0.12
