"""Fine-tuning's RandAugment (timm's spec strings, e.g. 'rand-m9-mstd0.5-inc1').

`PILRandAugment` is timm's own transform on a PIL crop, run by the torch backend in its workers
(`reference.pil_transform`, from `LoaderSpec.rand_augment`).
"""
from __future__ import annotations

import re

from .errors import ConfigError
from .seeding import keyed_rng


# timm's RandAugment grammar (timm.data.auto_augment.rand_augment_transform): 'rand', then any of
# these dash-separated parts, in any order; timm reads m, n and mmax with int(), mstd and p with float()
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_PARTS = {"m": r"\d+", "n": r"\d+", "mstd": _NUMBER, "mmax": r"\d+", "inc": r"[01]", "p": _NUMBER,
          "t": r"weights|3aw|3a"}
_PART = re.compile(r"(mstd|mmax|inc|m|n|p|t)(.+)")


def rand_augment_ops(spec: str) -> tuple[int, int]:
    """(num ops, magnitude) of a timm RandAugment string such as rand-m9-mstd0.5-inc1 (defaults: timm's,
    2 ops at magnitude 10). Parsed strictly by timm's grammar: `rand`, then dash-separated parts
    m<int> (magnitude), n<int> (ops per image), mstd<float> (magnitude noise), mmax<int> (magnitude
    cap), inc<0|1> (the increasing-severity op set), p<float> (each op's probability), t<weights|3aw|3a>
    (the op set); ConfigError (one line naming finetune.rand_augment) for anything else, where timm
    would skip a part silently or stop on an assert."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"finetune.rand_augment must start with 'rand' (like rand-m9-mstd0.5-inc1), got '{spec}'")
    values: dict[str, str] = {}
    for part in parts[1:]:
        m = _PART.fullmatch(part)
        if m is None or not re.fullmatch(_PARTS[m.group(1)], m.group(2)):
            raise ConfigError(f"finetune.rand_augment '{spec}': unknown part '{part}' (timm's parts: m<int>, n<int>, "
                              f"mstd<float>, mmax<int>, inc<0|1>, p<float>, t<weights|3aw|3a>)")
        if m.group(1) in values:
            raise ConfigError(f"finetune.rand_augment '{spec}': '{m.group(1)}' is given twice")
        values[m.group(1)] = m.group(2)
    return int(values.get("n", 2)), int(values.get("m", 10))


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
