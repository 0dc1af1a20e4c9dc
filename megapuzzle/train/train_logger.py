"""Megatron-style console lines and tensorboard scalars, from rank 0 only."""

from __future__ import annotations

import os
import sys
import time


class TrainLogger:
    """`iteration N/M | tokens/s | loss terms | lr | grad norm` on stdout, same scalars to tensorboard."""

    def __init__(self, tb_dir: str | os.PathLike | None, total_steps: int, prefix: str = "", enabled: bool = True):
        self.total, self.prefix, self.enabled = total_steps, prefix, enabled
        self.writer = None
        if enabled and tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tb_dir))
        self._t = time.perf_counter()

    def log(self, step: int, tokens: int, scalars: dict[str, float], console: bool = True, iters: int = 1) -> None:
        """`tokens` and `iters`: what was processed since the previous call."""
        if not self.enabled:
            return
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"{self.prefix}{k}", v, step)
            self.writer.add_scalar(f"{self.prefix}tokens_per_s", tokens / max(dt, 1e-9), step)
        if console:
            parts = [f" iteration {step:>8d}/{self.total:>8d}", f"elapsed ms/iter: {1000 * dt / max(iters, 1):8.1f}",
                     f"tokens/s: {tokens / max(dt, 1e-9):9.0f}"]
            for k, v in scalars.items():
                parts.append(f"{k}: {v:.4E}" if k in ("lr", "learning rate") else f"{k}: {v:.4f}")
            print(" | ".join(parts) + " |", file=sys.stdout, flush=True)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(f"{self.prefix}{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
