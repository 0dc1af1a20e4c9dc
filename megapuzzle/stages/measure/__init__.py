"""Stage `measure`: per-variant runtime and memory costs.

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

import logging

from megapuzzle.config import RunDir, section
from megapuzzle.fileio import atomic_write_json
from megapuzzle.stages.base import Stage

log = logging.getLogger(__name__).info


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    from megapuzzle.arch import SearchSpace
    from megapuzzle.checkpoints.canonical import load_arch, require_parent
    from megapuzzle.stages.measure.measure import MeasureConfig, format_check, measure_costs

    costs = measure_costs(load_arch(require_parent(run)), section(cfg, "measure", MeasureConfig),
                          space=SearchSpace.from_dict(cfg.get("search_space")),
                          state_path=run.state / "measure_partial.json")
    atomic_write_json(run.costs, costs)
    if "check" in costs:
        log("[measure] whole parent, predicted (sum of parts) vs measured:\n" + format_check(costs))
    return {"device": costs.get("device")}


STAGE = Stage("measure", ("search_space", "measure"), "measure", "megapuzzle.stages.measure.measure",
              "measured per-variant runtime + memory costs (and GPU roofline estimates)",
              "measure.sbatch", "megapuzzle.config.measure:MeasureConfig",
              run_stage=run_stage)
