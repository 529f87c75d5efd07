"""Per-iteration learning-rate schedule: linear warmup, then cosine or step decay."""
from __future__ import annotations

import math
from dataclasses import dataclass


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

    def __post_init__(self):
        if self.kind not in ("cosine", "step"):
            raise ValueError(f"optim.scheduler must be 'cosine' or 'step', got '{self.kind}'")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "step":
            return self.lr * self.gamma ** sum(step >= m for m in self.milestones)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
