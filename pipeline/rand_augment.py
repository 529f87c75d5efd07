"""Fine-tuning's RandAugment (timm's spec strings, e.g. 'rand-m9-mstd0.5-inc1').

`PILRandAugment` is timm's own transform on a PIL crop, run by the torch backend in its workers
(`reference.pil_transform`, from `LoaderSpec.rand_augment`).
"""
from __future__ import annotations

from .errors import ConfigError
from .seeding import keyed_rng


def rand_augment_ops(spec: str) -> tuple[int, int]:
    """(num ops, magnitude) of a timm RandAugment string such as rand-m9-mstd0.5-inc1."""
    parts = spec.split("-")
    if not spec or parts[0] != "rand":
        raise ConfigError(f"finetune.rand_augment must look like rand-m9-mstd0.5-inc1, got '{spec}'")
    n, m = 2, 9
    for p in parts[1:]:
        if p.startswith("n") and p[1:].isdigit():
            n = int(p[1:])
        elif p.startswith("m") and p[1:].isdigit():
            m = int(p[1:])
    return n, m


class PILRandAugment:
    """timm's RandAugment on a PIL crop, for the reference loader's workers.

    timm maps the top of the magnitude range of Posterize to 0 bits kept, which Pillow >= 10
    rejects (it used to give a black image); the bits are floored at 1 here."""

    def __init__(self, spec: str, mean):
        from timm.data import auto_augment

        rand_augment_ops(spec)  # validate
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
    from timm.data import auto_augment

    return auto_augment.posterize(img, max(1, bits_to_keep), **kwargs)
