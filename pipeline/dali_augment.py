"""RandAugment inside a DALI pipeline: DALI's own `nvidia.dali.auto_aug.rand_augment`, configured
from the same timm spec string as the other backends (pipeline/rand_augment.py).

It runs where the images are: on the GPU after `mixed` decoding, on the CPU with `device_id=None`
(DALI 2.x runs the auto_aug ops, conditionals included, on the CPU: tests/test_dali.py). The pipeline
must be built with `enable_conditionals=True` (DALI's auto_aug selects each sample's op with
conditional execution); `DALILoader` does so when a spec is given, and then keeps the resize in the
graph on the CPU too (without RandAugment its CPU path resizes in torch, after the graph).

The mapping from timm's spec, and where DALI's policy differs (DALI's fixed suite, not ours):
- n ops per image, magnitude bin m on `mmax + 1` bins, so bin m is timm's level m / 10 on the same
  0..10 scale; the shared ranges agree at that level: rotate 30 deg, shear 0.3, translate 0.45 of
  the side (`shape` given: relative translation), enhance factors 1 +- 0.9 level (`inc1` ->
  monotonic_mag=True; `inc0` -> DALI's non-monotonic suite, AutoAugment's ranges);
- DALI draws no magnitude noise (`mstd` is not applied: every op runs at bin m), applies each of
  the n ops always (no p = 0.5; its suite has an identity op instead), and its suite has no invert
  or solarize-add; its increasing posterize keeps 8 -> 4 bits, timm's 4 -> 0;
- the fill of the geometric ops is one grey level (the mean of `fill`), DALI takes no colour;
- its draws come from the pipeline's seed (DALILoader's, keyed by the epoch and batch it is built
  at, then continuing), not per sample: a run is reproducible from a given start, but a resumed
  run's RandAugment draws differ from the uninterrupted run's (the torch and FFCV backends key
  theirs per sample / per batch, so theirs match).
"""
from __future__ import annotations

from .rand_augment import TRANSLATE_PCT, RandAugmentSpec

__all__ = ["dali_rand_augment"]


def dali_rand_augment(images, s: RandAugmentSpec, size: tuple[int, int],
                      fill: tuple[int, int, int] = (124, 116, 104)):
    """DALI's RandAugment for the parsed spec `s` (`parse_rand_augment`, called before the pipeline
    is traced: an error inside DALI's graph tracing loses its one-line form) on `images`, a DataNode
    of uint8 HWC images of (height, width) `size` (after the crop and resize), on the CPU or the
    GPU. Returns the augmented DataNode, same shape and dtype; the draws follow the pipeline's seed."""
    from nvidia.dali.auto_aug import rand_augment

    return rand_augment.rand_augment(images, n=s.num_ops, m=min(s.magnitude, s.magnitude_max),
                                     num_magnitude_bins=s.magnitude_max + 1, shape=tuple(size),
                                     max_translate_rel=TRANSLATE_PCT, fill_value=round(sum(fill) / len(fill)),
                                     monotonic_mag=s.increasing)
