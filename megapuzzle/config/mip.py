"""The `mip:` section: the search's budgets and scenario (megapuzzle.stages.mip.mip)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from megapuzzle.config.rules import Integer, Integers, Number, OneOf, Section

METRICS = ("kl", "lm_loss", "top1")
"""Block scores the MIP can minimise (scores.json fields)."""


@dataclass(frozen=True)
class MIPConfig(Section):
    """The `mip:` config section."""

    SECTION = "mip"

    throughput_x: Annotated[float, Number(gt=0)] | None = 2.0
    """Target throughput as a multiple of the parent's predicted throughput at the same batch size."""
    throughput: Annotated[float, Number(gt=0)] | None = None
    """Absolute target in generated tokens/s, the same for every batch size (overrides throughput_x);
    with several batch sizes, pair it with memory_gb, or the largest batch wins by size alone."""
    latency_s: Annotated[float, Number(gt=0)] | None = None
    """Upper bound on one batch's generation time (prefill + decode), seconds."""
    memory_gb: Annotated[float, Number(gt=0)] | None = None
    """Upper bound on parameter + KV-cache memory, GiB."""
    max_params: Annotated[float, Number(gt=0)] | None = None
    """Upper bound on the parameter count (off by default, as in the paper)."""
    batch_sizes: Annotated[tuple[int, ...], Integers()] = (1,)
    """Batch sizes to solve for; the best objective is kept."""
    prefill_len: Annotated[int, Integer()] = 128
    """Prompt tokens per sequence in the deployment scenario."""
    gen_len: Annotated[int, Integer()] = 64
    """Generated tokens per sequence in the deployment scenario."""
    metric: Annotated[str, OneOf(METRICS)] = "kl"
    """Block score: kl (KL from the parent), lm_loss (increase over the parent) or top1 (agreement lost)."""
    num_solutions: Annotated[int, Integer()] = 1
    """Distinct candidates via diversity cuts."""
    alpha: Annotated[float, Number(ge=0, le=1)] = 0.8
    """A later candidate shares at most floor(alpha * layers) layer choices with each earlier one."""
    sweep_points: Annotated[int, Integer(ge=0)] = 0
    """Points of the quality/throughput Pareto sweep (0 = none)."""
    sweep_max_x: Annotated[float, Number(gt=0)] = 4.0
    """Sweep throughput targets from 1x to this multiple of the parent."""
    solver: Annotated[str, OneOf(("auto", "highs", "gurobi"))] = "auto"
    """auto (Gurobi when it fits its licence, else HiGHS), highs or gurobi."""
    cost_source: str = "measured"
    """measured (this machine) or a roofline GPU from costs.json (h100, h200, a100, b200)."""
    time_limit_s: Annotated[float, Number(gt=0)] | None = None
    """Per-solve time limit (None: solve to proven optimality)."""
