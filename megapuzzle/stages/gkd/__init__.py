"""Stage `gkd`: global knowledge distillation of the child from the parent.

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

from megapuzzle.config import RunDir, section
from megapuzzle.stages.base import Stage
from megapuzzle.stages.runner import jsonable


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    from megapuzzle.stages.gkd.gkd import GKDConfig, run_gkd

    return jsonable(run_gkd(run.root, section(cfg, "gkd", GKDConfig)))


STAGE = Stage("gkd", ("gkd",), "gkd", "megapuzzle.stages.gkd.gkd",
              "global knowledge distillation of the child from the parent",
              "gkd.sbatch", "megapuzzle.config.gkd:GKDConfig",
              run_stage=run_stage)
