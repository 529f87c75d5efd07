"""Per-iteration learning-rate schedule: linear warmup, then cosine or step decay.

Cosine anchoring (`anchor`):
- "released" (the paper's recipes): the cosine is a function of the iteration counted from 0 over
  all `total_steps`, and warmup only overrides its first `warmup_steps` values. This is what the
  released SimMIM code ran (timm's CosineLRScheduler, per iteration, `warmup_prefix=False`,
  `cycle_limit=1`): at the end of warmup the lr is already below the peak, e.g. 7.81e-4 instead
  of 8e-4 for Swin-B 100 epochs at batch 2048.
- "warmup_end": the cosine starts at the end of warmup and runs over the remaining iterations
  (the peak is reached; later SimMIM code in the Swin Transformer repository does this).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("cosine", "step")
ANCHORS = ("released", "warmup_end")


@dataclass(frozen=True)
class LRSchedule:
    lr: float  # peak, already scaled by global batch / 512
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"  # cosine | step
    milestones: tuple[int, ...] = ()  # in optimizer steps
    gamma: float = 0.1
    anchor: str = "released"  # cosine only: released | warmup_end (see the module docstring)

    def __post_init__(self):  # optim.scheduler / optim.cosine_anchor are checked at load (validate.py)
        assert self.kind in KINDS and self.anchor in ANCHORS, (self.kind, self.anchor)

    def __call__(self, step: int) -> float:
        """The lr (float) of optimizer step `step` (0-based, counted over the whole run)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "step":
            return self.lr * self.gamma ** sum(step >= m for m in self.milestones)
        if self.anchor == "released":
            progress = step / max(1, self.total_steps)
        else:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
