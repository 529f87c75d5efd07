"""The vocabulary of option ranges: each options class states its ranges in `rules()` as
{field: Rule}, beside its fields, and `trainer/validate.py` checks a whole config against them once,
at load. A `Rule` is (test, what the value must be); the text ends the one-line `ConfigError`
("config key 'data.mask_ratio' must be in (0, 1), got 1.5")."""
from __future__ import annotations

from typing import Any, Callable

Rule = tuple[Callable[[Any], bool], str]  # (test, what the value must be: "> 0", "one of a, b")
POSITIVE: Rule = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
OPEN_UNIT: Rule = (lambda v: 0 < v < 1, "in (0, 1)")
UNIT: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
HALF_OPEN_UNIT: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
UP_TO_ONE: Rule = (lambda v: 0 < v <= 1, "in (0, 1]")


def one_of(*choices) -> Rule:
    """The rule 'the value is one of `choices`' (compared with ==), its text listing them."""
    return (lambda v: v in choices, "one of " + ", ".join(map(str, choices)))
