"""The one SimMIM augmentation definition that every loader follows.

RandomResizedCrop (scale (0.67, 1), ratio (3/4, 4/3), bilinear) to the input size, horizontal flip
with p = 0.5, ImageNet mean/std normalisation; no colour jitter (DESIGN.md). Loaders hand over uint8
(B, 3, H, W) and `normalize` turns it into float on the training device, so host-to-device copies
move a quarter of the bytes.

Crop parameters come from a per-sample `random.Random` seeded by `derive_seed("sample", seed,
epoch, index)` (seeding.py), so a sample's augmentation depends only on (seed, epoch, index): the
same images whatever the number of workers, and a resumed run sees the same data as an
uninterrupted one. The box is cropped first, then resized (torchvision's RandomResizedCrop).
Every backend draws the view this way (`training_view`): the torch loader in its workers, DALI's
external source per sample, FFCV for the epoch's samples before the epoch (`sample_views`), so the
three crop the same box and flip the same samples (on the image as each stores it).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from simmim.core.seeding import derive_seed, derive_seeds

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augmentation:
    size: int = 192
    scale: tuple[float, float] = (0.67, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN  # one per channel (data.channels), of values in [0, 1]
    std: tuple[float, ...] = IMAGENET_STD


def sample_crop(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                rng: random.Random, attempts: int = 10) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (left, top, crop_w, crop_h): area fraction ~ U(scale), log aspect
    ~ U(log ratio); after `attempts` misses, the largest centred crop with the aspect clamped."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def training_view(width: int, height: int, aug: Augmentation, rng: random.Random) -> tuple[int, int, int, int, bool]:
    """The training view's random parameters, (left, top, crop_w, crop_h, flip), for an image of
    width x height pixels: `sample_crop`'s box, then the flip (rng.random() < aug.hflip). The torch
    loader's per-image transform (RandAugment) continues from `rng` afterwards."""
    left, top, w, h = sample_crop(width, height, aug.scale, aug.ratio, rng)
    return left, top, w, h, rng.random() < aug.hflip


def sample_view(width: int, height: int, aug: Augmentation, seed: int, epoch: int,
                index: int) -> tuple[int, int, int, int, bool]:
    """`training_view` of dataset sample `index` in `epoch` of a run seeded `seed`, from its own
    generator `random.Random(derive_seed("sample", seed, epoch, index))`, as the torch loader draws it."""
    return training_view(width, height, aug, random.Random(derive_seed("sample", seed, epoch, index)))


def sample_views(widths: np.ndarray, heights: np.ndarray, indices: np.ndarray, aug: Augmentation, seed: int,
                 epoch: int) -> np.ndarray:
    """`sample_view` of each sample in `indices` (image sizes `widths`, `heights`, aligned with it):
    int32 (N, 5) rows of (left, top, crop_w, crop_h, flip). The seeds come vectorised
    (`seeding.derive_seeds`); the draws are Python's: 11.4 us a sample on a loaded 2-core machine
    (22.6 with one `derive_seed` each)."""
    seeds = derive_seeds("sample", seed, epoch, last=np.asarray(indices))
    views = [training_view(w, h, aug, random.Random(s))
             for w, h, s in zip(np.asarray(widths).tolist(), np.asarray(heights).tolist(), seeds.tolist())]
    return np.array(views, np.int32).reshape(-1, 5)


def eval_geometry(width: int, height: int, size: int, crop_ratio: float) -> tuple[int, int, int, int]:
    """The evaluation view of a width x height image as torchvision's `Resize(int(size / crop_ratio))`
    + `CenterCrop(size)` computes it (timm's eval transform): (resized_w, resized_h, left, top), the
    shorter side resized to int(size / crop_ratio), the longer to int(that * long / short), then the
    size x size crop at (left, top) = round((resized - size) / 2) (Python's round, half to even).
    Every backend resizes the whole image to that size (antialiased bilinear) and crops there."""
    short = int(size / crop_ratio)
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rw, rh = int(short * width / height), short
    return rw, rh, int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
              dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) uint8 on the device -> normalised `dtype` ((v / 255 - mean[c]) / std[c], C = len(mean));
    one fused multiply-add. `out`: a
    float32 tensor of the images' shape to write into (the uint8 values are converted inside the
    multiply-add: the same floats, one pass and no temporary); returned. ValueError when C is not
    len(mean) (broadcasting would silently give len(mean) channels)."""
    if images.shape[1] != len(mean):
        raise ValueError(f"normalize: {images.shape[1]}-channel images, {len(mean)} mean values")
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device).view(1, -1, 1, 1)
    if out is not None:
        return torch.addcmul(shift, images, scale, out=out)
    return torch.addcmul(shift, images.float(), scale).to(dtype)


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalised (B, C, H, W) -> float in [0, 1], for figures (C = len(mean))."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * s + m).clamp(0, 1)


def random_erasing(images: torch.Tensor, probability: float, scale: tuple[float, float] = (0.02, 1 / 3),
                   ratio: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> torch.Tensor:
    """Random erasing (Zhong et al., AAAI 2020; timm's RandomErasing, mode 'pixel', one box) for a
    whole batch at once: no loop over the images.

    images: (B, C, H, W) float/bf16 on any device, normalised. Each image, with `probability`, gets
    one box of area fraction ~ U(scale) and aspect (h / w) ~ log-U(ratio), the first of `attempts`
    draws that fits (h < H, w < W), at a uniform position, filled with per-pixel N(0, 1) noise.
    The box parameters are drawn on the CPU from torch's global generator and copied to the device
    once; the noise from the device's generator (the engine seeds both per step). Returns a new
    tensor of the same shape and dtype."""
    b, _, h, w = images.shape
    apply = torch.rand(b) < probability
    area = torch.empty(b, attempts).uniform_(*scale) * (h * w)
    aspect = torch.empty(b, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    box_h, box_w = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
    fits = (box_h < h) & (box_w < w)
    first = fits.long().argmax(1, keepdim=True)  # the first draw that fits (timm's loop)
    box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
    top = (torch.rand(b) * (h - box_h + 1)).floor().long()  # randint(0, h - box_h), inclusive
    left = (torch.rand(b) * (w - box_w + 1)).floor().long()
    box_h = torch.where(apply & fits.any(1), box_h, 0)  # an empty box: the image is left as it is
    top, left, box_h, box_w = torch.stack([top, left, box_h, box_w]).to(images.device, non_blocking=True)
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (B, W)
    inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    return torch.where(inside, torch.randn_like(images), images)
