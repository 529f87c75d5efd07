"""RandAugment for fine-tuning, in timm's spec language (`rand-m9-mstd0.5-inc1`), once per backend.

- `parse_rand_augment(spec)`: the spec string checked and read into a `RandAugmentSpec` (what the
  trainer validates `finetune.rand_augment` with).
- `PILRandAugment`: timm's own `rand_augment_transform` on a PIL crop, for the torch backend's
  DataLoader workers (seeded per sample).
- `BatchRandAugment`: the same policy on a uint8 (B, 3, H, W) batch on the training device, for
  the FFCV backend: per-sample op choices, magnitudes and signs drawn from one `torch.Generator`
  (on the CPU, so that grouping needs no device sync), then each of the ~15 ops runs once on the
  subset of the batch that drew it (torchvision.transforms.v2.functional, which takes batches,
  and torch's affine_grid / grid_sample for the geometric ones, whose angle or offset differs per
  image). The loops run over layers and ops, never over samples.
- DALI has its own RandAugment inside its graph: `dali_augment.py`.

timm's policy (timm.data.auto_augment, rand_augment_transform / RandAugment / AugmentOp): for each
of n layers an op is drawn uniformly (with replacement) from 15 (`inc1`: the "increasing" set,
whose strength grows with the magnitude), applied with probability p = 0.5 with a magnitude drawn
per application from N(m, mstd) clipped to [0, mmax = 10]; level = magnitude / 10; signed ops
(rotate, shear, translate, the enhance factors) negate their argument with probability 1/2.

Where `BatchRandAugment` differs from timm's PIL ops (documented, and tested within tolerances in
tests/test_rand_augment.py): geometric ops use bilinear sampling (timm picks bilinear or bicubic
at random) in float with the same inverse maps and the same fill; enhance ops blend in float with
torchvision's degenerate images (grayscale, its mean, a 3x3 smoothing) and truncate like
torchvision, where PIL blends in its own integer arithmetic (one grey level apart at most);
autocontrast and equalize are torchvision's. Posterize keeps at least one bit (timm's top magnitude
asks for 0 bits, which Pillow >= 10 refuses; `PILRandAugment` does the same).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import auto_augment
from torchvision.transforms.v2 import functional as TF

from simmim.core.errors import ConfigError
from simmim.core.seeding import keyed_rng

__all__ = ["BATCH_OPS", "BatchRandAugment", "PILRandAugment", "RandAugmentSpec", "parse_rand_augment"]

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitudes are on a 0..10 scale
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")  # timm's _RAND_TRANSFORMS
TRANSLATE_PCT = 0.45  # timm's default hparams['translate_pct'] for the *Rel translations
FORM = "rand-m9-mstd0.5-inc1 (timm's form: rand-m<magnitude>[-n<ops>][-mstd<std>][-mmax<max>][-inc<0|1>][-p<prob>])"


@dataclass(frozen=True)
class RandAugmentSpec:
    """A timm RandAugment string, read: `num_ops` layers, each op applied with probability `prob`
    at a magnitude ~ N(`magnitude`, `magnitude_std`) (std inf: uniform on [0, magnitude]) clipped
    to [0, `magnitude_max`]; `increasing` picks timm's increasing-severity op set."""
    num_ops: int = 2
    magnitude: int = 10
    magnitude_std: float = 0.0
    magnitude_max: int = 10
    increasing: bool = False
    prob: float = 0.5

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else OPS


def parse_rand_augment(spec: str, what: str = "RandAugment spec") -> RandAugmentSpec:
    """The fields of `spec` as timm's rand_augment_transform reads them (defaults: 2 ops,
    magnitude 10, no noise, not increasing, p 0.5). ConfigError, one line starting with `what`
    (the config key), for anything else (timm would assert, or silently ignore a section without
    a number)."""
    parts = spec.split("-") if isinstance(spec, str) else []
    if not parts or parts[0] != "rand":
        raise ConfigError(f"{what} must look like {FORM}; got {spec!r}")
    fields: dict = {}
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
        if m is None:
            raise ConfigError(f"{what} {spec!r}: unknown section {part!r}; it must look like {FORM}")
        key, value = m.groups()
        if key == "mstd":
            std = float(value)
            fields["magnitude_std"] = math.inf if std > 100 else std  # timm: > 100 means uniform
        elif key == "p":
            fields["prob"] = float(value)
        elif "." in value:
            raise ConfigError(f"{what} {spec!r}: {key} takes an integer, got {value!r}")
        else:
            fields[{"mmax": "magnitude_max", "inc": "increasing", "m": "magnitude", "n": "num_ops"}[key]] = \
                bool(int(value)) if key == "inc" else int(value)
    out = RandAugmentSpec(**fields)
    if not 0 <= out.prob <= 1:
        raise ConfigError(f"{what} {spec!r}: p must lie in [0, 1], got {out.prob}")
    return out


# ---------------------------------------------------------------- the torch backend: timm on PIL

class PILRandAugment:
    """timm's RandAugment on a PIL crop, for the reference loader's workers:
    `transform(img, rng) -> img`, `rng` the sample's own `random.Random`.

    timm maps the top of the magnitude range of Posterize to 0 bits kept, which Pillow >= 10
    rejects (it used to give a black image); the bits are floored at 1 here."""

    def __init__(self, spec: str, mean: tuple[float, float, float]):
        parse_rand_augment(spec)
        self.op = auto_augment.rand_augment_transform(spec, {"translate_const": 100,
                                                             "img_mean": tuple(round(255 * x) for x in mean)})
        for op in self.op.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize_at_least_one_bit

    def __call__(self, img, rng):
        """timm draws from the global generators: seeded from the sample's own `rng`, so the result
        is a function of (seed, epoch, index) whichever worker or process runs it."""
        with keyed_rng("randaugment", rng.getrandbits(63)):
            return self.op(img)


def _posterize_at_least_one_bit(img, bits_to_keep, **kwargs):
    return auto_augment.posterize(img, max(1, bits_to_keep), **kwargs)


# ---------------------------------------------------------------- the FFCV backend: batched on the device

def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` with one factor per image: x * f + d * (1 - f), clamped, truncated to
    uint8. x: uint8 (n, 3, H, W); degenerate: broadcastable to it; factor: float (n,)."""
    f = factor.to(x.device, torch.float32).view(-1, 1, 1, 1)
    return (x.float() * f + degenerate.float() * (1 - f)).clamp_(0, 255).to(torch.uint8)


def _warp(x: torch.Tensor, inverse: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Each image of x (uint8 (n, 3, H, W)) resampled through its own inverse affine map
    `inverse` (float64 (n, 2, 3), output pixel -> input pixel, in PIL's continuous coordinates:
    the image spans [0, W] x [0, H], pixel centres at +0.5; PIL's Image.transform(AFFINE) data),
    bilinear; where the sample falls outside, `fill` (float (3,)) is blended in by the sampled
    coverage, as torchvision does; rounded to uint8."""
    n, c, h, w = x.shape
    # the same map in affine_grid's coordinates (u = 2 x / W - 1, v = 2 y / H - 1), elementwise so
    # that nothing is copied from the host
    (a, b, t), (d, e, f) = inverse[:, 0].unbind(-1), inverse[:, 1].unbind(-1)
    theta = _affine(a, b * h / w, a + b * h / w + 2 * t / w - 1,
                    d * w / h, e, d * w / h + e + 2 * f / h - 1).to(torch.float32)
    grid = F.affine_grid(theta, [n, c + 1, h, w], align_corners=False)
    src = torch.cat([x.float(), x.new_ones(n, 1, h, w, dtype=torch.float32)], 1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, cover = out[:, :c], out[:, c:]
    fill = fill.view(1, c, 1, 1)
    return ((img - fill) * cover + fill).round_().clamp_(0, 255).to(torch.uint8)


def _affine(a, b, c, d, e, f) -> torch.Tensor:
    """(n, 2, 3) float64 from per-image coefficients (PIL's (a, b, c, d, e, f) order)."""
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], 1).double()


def _rotation(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL's Image.rotate(degrees) (counter-clockwise about the centre) as inverse maps."""
    a = -torch.deg2rad(degrees.double())
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = w / 2, h / 2
    return _affine(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


# Each op on the images that drew it: (x uint8 (n, 3, H, W), level float64 (n,) = magnitude / 10,
# sign float64 (n,) of +-1, fill float (3,)) -> uint8 (n, 3, H, W); arguments as timm's *_level_to_arg.
BATCH_OPS = {
    "AutoContrast": lambda x, lv, s, fill: TF.autocontrast(x),
    "Equalize": lambda x, lv, s, fill: TF.equalize(x),
    "Invert": lambda x, lv, s, fill: TF.invert(x),
    "Rotate": lambda x, lv, s, fill: _warp(x, _rotation(lv * 30 * s, *x.shape[-2:]), fill),
    "Posterize": lambda x, lv, s, fill: _posterize(x, (lv * 4).floor()),
    "PosterizeIncreasing": lambda x, lv, s, fill: _posterize(x, 4 - (lv * 4).floor()),
    "Solarize": lambda x, lv, s, fill: _solarize(x, (lv * 256).floor().clamp(max=256)),
    "SolarizeIncreasing": lambda x, lv, s, fill: _solarize(x, 256 - (lv * 256).floor().clamp(max=256)),
    "SolarizeAdd": lambda x, lv, s, fill: _solarize_add(x, (lv * 110).floor().clamp(max=128)),
    "Color": lambda x, lv, s, fill: _blend(x, _grayscale(x), lv * 1.8 + 0.1),
    "ColorIncreasing": lambda x, lv, s, fill: _blend(x, _grayscale(x), _increasing_factor(lv, s)),
    "Contrast": lambda x, lv, s, fill: _blend(x, _mean_grey(x), lv * 1.8 + 0.1),
    "ContrastIncreasing": lambda x, lv, s, fill: _blend(x, _mean_grey(x), _increasing_factor(lv, s)),
    "Brightness": lambda x, lv, s, fill: _blend(x, torch.zeros((), device=x.device), lv * 1.8 + 0.1),
    "BrightnessIncreasing": lambda x, lv, s, fill: _blend(x, torch.zeros((), device=x.device),
                                                          _increasing_factor(lv, s)),
    "Sharpness": lambda x, lv, s, fill: _blend(x, TF.adjust_sharpness(x, 0.0), lv * 1.8 + 0.1),
    "SharpnessIncreasing": lambda x, lv, s, fill: _blend(x, TF.adjust_sharpness(x, 0.0), _increasing_factor(lv, s)),
    "ShearX": lambda x, lv, s, fill: _warp(x, _shear(lv * 0.3 * s, 0), fill),
    "ShearY": lambda x, lv, s, fill: _warp(x, _shear(lv * 0.3 * s, 1), fill),
    "TranslateXRel": lambda x, lv, s, fill: _warp(x, _translate(lv * TRANSLATE_PCT * s * x.shape[-1], 0), fill),
    "TranslateYRel": lambda x, lv, s, fill: _warp(x, _translate(lv * TRANSLATE_PCT * s * x.shape[-2], 1), fill),
}


class BatchRandAugment:
    """timm's RandAugment policy (see the module docstring) on a uint8 (B, 3, H, W) batch.

    spec: a timm RandAugment string (`parse_rand_augment`; ConfigError if malformed); fill: the
    geometric ops' fill colour, uint8 RGB (timm's img_mean: the mean colour). `__call__(images,
    generator)` returns a new uint8 (B, 3, H, W) tensor on images' device (ValueError for another
    dtype or shape); every random draw comes from `generator` (a CPU torch.Generator), so equal
    seeds give equal outputs. The draws are made on the CPU and reach the device in one pinned,
    non-blocking copy per layer, so the host never waits for the device."""

    def __init__(self, spec: str, fill: tuple[int, int, int] = (124, 116, 104)):
        self.spec = parse_rand_augment(spec)
        self.fill = torch.tensor(fill, dtype=torch.float32)
        self.ops = {name: BATCH_OPS[name] for name in self.spec.ops}
        self._fill_on = {}  # device -> fill there (copied once)

    def draw(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One layer's draws for `batch` images: (op index int64 (B,), applied bool (B,), level
        float64 (B,) = magnitude / 10, sign float64 (B,) of +-1), all on the CPU."""
        s = self.spec
        op = torch.randint(len(s.ops), (batch,), generator=generator)
        applied = torch.rand(batch, generator=generator, dtype=torch.float64) <= s.prob
        if s.magnitude_std == math.inf:
            magnitude = torch.rand(batch, generator=generator, dtype=torch.float64) * s.magnitude
        else:
            magnitude = s.magnitude + s.magnitude_std * torch.randn(batch, generator=generator, dtype=torch.float64)
        level = magnitude.clamp(0, s.magnitude_max) / LEVEL_DENOM
        sign = torch.where(torch.rand(batch, generator=generator, dtype=torch.float64) > 0.5, -1.0, 1.0)
        return op, applied, level, sign

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchRandAugment takes uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        device = images.device
        if device not in self._fill_on:
            self._fill_on[device] = self.fill.to(device)
        out = images.clone()
        for _ in range(self.spec.num_ops):
            op, applied, level, sign = self.draw(len(images), generator)
            op = torch.where(applied, op, -1)  # -1: no op for this image in this layer
            order = torch.argsort(op, stable=True)  # images grouped by op, the unchanged first
            counts = torch.bincount(op + 1, minlength=len(self.spec.ops) + 1).tolist()
            rows_by_op, level, sign = _to_device(torch.stack([order.double(), level, sign]), device)
            rows_by_op, start = rows_by_op.long(), counts[0]
            for name, n in zip(self.spec.ops, counts[1:]):  # a loop over ops; each runs on its images at once
                if n:
                    rows = rows_by_op[start:start + n]
                    out[rows] = self.ops[name](out[rows], level[rows], sign[rows], self._fill_on[device])
                    start += n
        return out


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; to a GPU from pinned memory without blocking (a pageable copy would make
    the host wait for all the work queued on the device)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _increasing_factor(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """timm's _enhance_increasing_level_to_arg: 1 +- 0.9 level, at least 0.1."""
    return (1.0 + sign * level * 0.9).clamp(min=0.1)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` (per image, at least 1, as PILRandAugment) bits of every channel."""
    keep = bits.clamp(1, 8).long()
    mask = ((255 << (8 - keep)) & 255).to(torch.uint8).to(x.device).view(-1, 1, 1, 1)
    return x & mask


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert pixels >= threshold (per image; 256: none), as PIL's ImageOps.solarize."""
    t = threshold.to(x.device, torch.int16).view(-1, 1, 1, 1)
    return torch.where(x.to(torch.int16) >= t, 255 - x, x)


def _solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add: pixels below 128 get `add` (per image), clipped at 255."""
    a = add.to(x.device, torch.int16).view(-1, 1, 1, 1)
    return torch.where(x < 128, (x.to(torch.int16) + a).clamp(max=255).to(torch.uint8), x)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """float (n, 1, H, W): the degenerate image of torchvision's adjust_saturation for uint8 (floored luma)."""
    return TF.rgb_to_grayscale(x.float()).floor_()


def _mean_grey(x: torch.Tensor) -> torch.Tensor:
    """float (n, 1, 1, 1): the degenerate image of torchvision's adjust_contrast for uint8."""
    return _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)


def _shear(factor: torch.Tensor, axis: int) -> torch.Tensor:
    """timm's shear_x / shear_y: PIL affine (1, f, 0, 0, 1, 0) / (1, 0, 0, f, 1, 0), about the origin."""
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    if axis == 0:
        return _affine(one, factor, zero, zero, one, zero)
    return _affine(one, zero, zero, factor, one, zero)


def _translate(pixels: torch.Tensor, axis: int) -> torch.Tensor:
    """timm's translate_x_rel / translate_y_rel: PIL affine (1, 0, t, 0, 1, 0) / (1, 0, 0, 0, 1, t)."""
    one, zero = torch.ones_like(pixels), torch.zeros_like(pixels)
    if axis == 0:
        return _affine(one, zero, pixels, zero, one, zero)
    return _affine(one, zero, zero, zero, one, pixels)
