"""Stage `bld`: child initialisation + blockwise local distillation into the block library.

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

from megapuzzle.config import RunDir, section
from megapuzzle.stages.base import Stage, fusion_max_run


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    from megapuzzle.stages.bld.bld import run_bld

    res = run_bld(run.root, cfg)
    out = {"trained": len(res.get("trained", []))}
    max_run = fusion_max_run(cfg)
    if max_run > 1:
        from megapuzzle.stages.bld.bld import BLDConfig
        from megapuzzle.stages.fusion_runs import run_bld as run_fusion_bld

        out["run_blocks"] = len(run_fusion_bld(run.root, section(cfg, "bld", BLDConfig), max_run)["blocks"])
    return out


STAGE = Stage("bld", ("search_space", "bld"), "bld", "megapuzzle.stages.bld.bld",
              "child initialisation + blockwise local distillation into the block library",
              "bld.sbatch", "megapuzzle.config.bld:BLDConfig",
              run_stage=run_stage)
