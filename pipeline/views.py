"""The view of one image, as the torch backend (and the stream backend, which reuses it) makes it:
the training view (`train_view`: the crop box and flip drawn by `augment.training_view`, Pillow's
bilinear resize or its compiled bit-identical twin from `resample`), the evaluation view
(`center_crop`), and the normalised view of a grey or N-channel sample (`channel_view`).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from .augment import Augmentation, eval_geometry, normalize, training_view
from .channels import array_view


def channel_view(img, aug: Augmentation, train: bool, crop_ratio: float, rng: random.Random,
                 transform=None) -> torch.Tensor:
    """The view of a data.channels != 3 sample (`channels.read_pixels`' result) as normalised
    float32 (C, S, S): a grey image by the RGB path's PIL operations on mode L (same box and flip
    from `rng`, Pillow's resize, `transform`) and `augment.normalize`; an array by
    `channels.array_view`. train=False: the evaluation view (`center_crop`)."""
    if isinstance(img, tuple):
        return array_view(*img, aug, train, crop_ratio, rng, aug.mean, aug.std)
    if train:
        img = pil_train_view(img, training_view(img.width, img.height, aug, rng), aug.size, rng, transform)
    else:
        img = center_crop(img, aug.size, crop_ratio)
    return normalize(torch.from_numpy(np.asarray(img).copy())[None, None], aug.mean, aug.std)[0]  # (1, S, S)


def train_view(img: Image.Image, aug: Augmentation, rng: random.Random, transform=None) -> torch.Tensor:
    """The training view of `img` as the torch backend makes it: uint8 (3, S, S), S = aug.size. The
    crop box and flip are `training_view`'s draws from `rng` (a sample's own generator,
    `augment.sample_view`'s), the resize is Pillow's bilinear (compiled where numba is installed and
    no `transform` follows: `resized_crop_tensor`), then `transform(img, rng)` on the PIL crop if given.
    Shared by `ImageFolder` and the stream backend, so both give the same pixels for a sample."""
    view = training_view(img.width, img.height, aug, rng)
    if transform is None and compiled_resize() is not None:
        left, top, w, h, flip = view
        return resized_crop_tensor(img, left, top, w, h, aug.size, flip)
    return to_tensor(pil_train_view(img, view, aug.size, rng, transform))


def pil_train_view(img: Image.Image, view: tuple[int, int, int, int, bool], size: int, rng: random.Random,
                   transform=None) -> Image.Image:
    """`img` cropped to `view` = (left, top, width, height, flip) (`augment.training_view`), resized
    by Pillow to size x size (`resized_crop`), flipped left-right if flip, then `transform(img, rng)`
    if given; any PIL mode (RGB, L)."""
    left, top, w, h, flip = view
    img = resized_crop(img, left, top, w, h, size)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if transform is not None:
        img = transform(img, rng)
    return img


def resized_crop(img: Image.Image, left: int, top: int, width: int, height: int, size: int) -> Image.Image:
    """torchvision's RandomResizedCrop given its box: crop first, then a bilinear (antialiased, as
    PIL always is) resize of the crop to size x size. Pixels at the crop's border see only pixels
    inside it; resizing the full image with `box=` would borrow from outside it (up to 15 levels).
    Equal to `torchvision.transforms.v2.functional.resized_crop(img, top, left, height, width,
    [size, size])` on a PIL image (tests/test_pixels.py)."""
    return img.crop((left, top, left + width, top + height)).resize((size, size), Image.BILINEAR)


def compiled_resize():
    """`resample`'s (resize_bilinear, flip_in_place), compiled, when numba is installed (the ffcv
    extra); else None. Compiled on the first call, in the calling process: call it before the
    DataLoader forks its workers, which then inherit the compiled code."""
    global _COMPILED
    if _COMPILED is None:
        try:
            from .resample import flip_in_place, resize_bilinear
        except ImportError:  # no numba: PIL's resize
            _COMPILED = False
        else:
            probe = np.zeros((3, 5, 3), np.uint8)
            resize_bilinear(probe[:, 1:], np.empty((2, 2, 3), np.uint8))
            flip_in_place(probe)
            _COMPILED = (resize_bilinear, flip_in_place)
    return _COMPILED or None


_COMPILED = None


def resized_crop_tensor(img: Image.Image, left: int, top: int, width: int, height: int, size: int,
                        flip: bool) -> torch.Tensor:
    """`resized_crop` (then a left-right flip if `flip`) as a uint8 (3, size, size) tensor, by the
    compiled resize (`compiled_resize`, which must not be None): the same pixels as Pillow's
    (bit-identical, tests/test_pixels.py), at about half the CPU time per training view (0.31 against 0.65
    ms with the conversion to a tensor, measured on the loaded 2-core machine)."""
    resize, mirror = compiled_resize()
    out = np.empty((size, size, 3), np.uint8)
    resize(np.asarray(img)[top:top + height, left:left + width], out)
    if flip:
        mirror(out)
    return torch.from_numpy(out).permute(2, 0, 1)


def center_crop(img: Image.Image, size: int, crop_ratio: float) -> Image.Image:
    """The evaluation view: torchvision's `Resize(int(size / crop_ratio))` (bilinear, antialiased as
    PIL always is) then `CenterCrop(size)` (`augment.eval_geometry`); pixel-identical to them
    (tests/test_views.py)."""
    rw, rh, left, top = eval_geometry(img.width, img.height, size, crop_ratio)
    return img.resize((rw, rh), Image.BILINEAR).crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, S, S) uint8
