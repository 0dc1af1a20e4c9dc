"""Learning-rate schedule: linear warmup then cosine decay to a floor (Megatron's default shape)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """LR as a pure function of the step, so a resumed run follows the same curve."""

    lr: float
    """Peak learning rate, reached at the end of warmup."""
    total_steps: int
    """Steps of the whole run; decay ends here."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps."""
    min_lr: float = 0.0
    """Floor of the cosine decay."""

    def __post_init__(self):
        if self.lr <= 0 or self.total_steps < 1 or self.warmup_steps < 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"bad LR schedule {self}: need lr > 0, total_steps >= 1, 0 <= min_lr <= lr")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
