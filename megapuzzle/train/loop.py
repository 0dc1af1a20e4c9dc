"""The training loop of train-parent, BLD and GKD: what every resumable stage repeats around its
optimizer step, written once.

The loop owns the iteration counter (from a resumed `start` to `total`), the LR schedule (the
stage gets `schedule(i)` for step i), the fault hook (`faults.reached(name, i)`: a test's
simulated kill before step i, nothing saved), the logging window (every `log_every` steps and
at the end: one Megatron-style line + tensorboard scalars), the checkpoint cadence (every
`checkpoint_every` steps and at the end), an optional evaluation interval and the tqdm bar. The
stage owns the maths and the state, through callables:

    step(i, lr) -> dict      optimizer step i (0-based) at learning rate lr; its metrics
    save(n)                  atomic checkpoint after n steps (train.state / a trainer's save)
    window(n, done) -> dict  the scalars of the `done` steps ending at n (default: the last
                             step's metrics); None: nothing to log on this rank
    evaluate(n)              after every `eval_every` steps (0: never; the stages evaluate
                             before and after `run` themselves)

Scalars: "lr" is inserted before the grad norms (the line reads losses | lr | grad norms);
names with a "/" (per-layer / per-block detail) go to tensorboard only. Resume is the stage's
load (its state differs: one AdamW, a Megatron trainer, one optimizer per block) that returns
the saved step, from which `run` continues with the same data order and schedule.

    # train-parent: the last step's loss and grad norm
    loop = TrainLoop("train-parent", cfg.steps, sched, logger, cfg.log_every, cfg.checkpoint_every, tokens)
    loop.run(start, step=lambda i, lr: {"lm loss": ..., "grad norm": ...},
             save=lambda n: save_train_state(state_dir, n, params, opt, {"loss": loop.last["lm loss"]}))
    # GKD: terms summed on the device per step, averaged over DP / PP in `window` (one host sync)
    loop.run(start, step=distil_one_batch, save=lambda n: trainer.save(n, extra), window=report)
    # BLD: every block's loss per step, per-block means in `window`; no save on a relay-only stage
    loop.run(start, step=train_blocks, save=save if mine else None, window=block_means)

`run` returns the step a simulated kill stopped at, else None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from megapuzzle.train import faults
from megapuzzle.train.schedule import LRSchedule
from megapuzzle.train.train_logger import TrainLogger


def line_scalars(metrics: dict[str, float], lr: float) -> tuple[dict[str, float], dict[str, float]]:
    """(console + tensorboard scalars with "lr" before the grad norms, tensorboard-only detail)."""
    detail = {k: v for k, v in metrics.items() if "/" in k}
    norms = {k: v for k, v in metrics.items() if k.startswith("grad norm")}
    losses = {k: v for k, v in metrics.items() if k not in detail and k not in norms}
    return {**losses, "lr": lr, **norms}, detail


@dataclass
class TrainLoop:
    name: str
    """The fault-hook loop name ("train-parent", "bld", "gkd") and the progress bar's label."""
    total: int
    """Optimizer steps of the whole run."""
    schedule: LRSchedule
    logger: TrainLogger
    log_every: int
    checkpoint_every: int
    tokens_per_step: int
    """Tokens of one step over all ranks (the line's tokens/s)."""
    console: bool = True
    """Print the iteration line (the tensorboard scalars are written either way)."""
    progress: bool = False
    """A tqdm bar (GKD / BLD on rank 0 unless --no-progress)."""
    last: dict[str, Any] = field(default_factory=dict)
    """The most recent step's metrics (what a checkpoint or a result records)."""

    def _due(self, n: int, every: int) -> bool:
        return n % every == 0 or n == self.total

    def run(self, start: int, step: Callable[[int, float], dict | None],
            save: Callable[[int], None] | None = None,
            window: Callable[[int, int], dict | None] | None = None,
            evaluate: Callable[[int], None] | None = None, eval_every: int = 0) -> int | None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, initial=start, desc=self.name, unit="step", disable=not self.progress)
        last_log = start
        for i in range(start, self.total):
            if faults.reached(self.name, i):  # tests: stop as a kill would (nothing saved since the last save)
                bar.close()
                self.logger.close()
                return i
            lr = self.schedule(i)
            self.last = step(i, lr) or {}
            bar.update(1)
            n = i + 1
            if self._due(n, self.log_every):
                done = n - last_log
                metrics = window(n, done) if window is not None else self.last
                if metrics is not None:
                    scalars, detail = line_scalars(metrics, lr)
                    self.logger.log(n, done * self.tokens_per_step, scalars, console=self.console, iters=done)
                    for k, v in detail.items():
                        self.logger.scalar(k, v, n)
                    last_log = n
            if save is not None and self._due(n, self.checkpoint_every):
                save(n)
            if evaluate is not None and eval_every and n % eval_every == 0:
                evaluate(n)
        bar.close()
        return None
