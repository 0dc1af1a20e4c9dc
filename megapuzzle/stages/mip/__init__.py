"""Stage `mip`: pick one variant per layer (or run) under the budgets.

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

from megapuzzle.config import RunDir, section
from megapuzzle.stages.base import Stage, fusion_max_run


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    from megapuzzle.stages.mip.mip import MIPConfig, run_mip

    # search_space is not in this stage's config hash: changing it re-runs bld, hence this stage
    out = run_mip(run.root, section(cfg, "mip", MIPConfig), fusion_max_run=fusion_max_run(cfg))
    return {"predicted_speedup": out["solutions"][0]["predicted_speedup"], "objective": out["solutions"][0]["objective"]}


STAGE = Stage("mip", ("mip",), "mip", "megapuzzle.stages.mip.mip",
              "pick one variant per layer under throughput / latency / memory budgets",
              "mip.sbatch", "megapuzzle.config.mip:MIPConfig",
              run_stage=run_stage)
