"""Stage `realize`: stitch a solution's blocks into a child checkpoint.

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

import logging

from megapuzzle.config import RunDir
from megapuzzle.stages.base import Stage

log = logging.getLogger(__name__).info


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    from megapuzzle.arch_table import architecture_table
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.stages.realize.realize import realize

    realize(run.root, int((cfg.get("realize") or {}).get("solution", 0)))
    log(architecture_table(load_arch(run.child)))
    return {}


STAGE = Stage("realize", ("realize",), "realize", "megapuzzle.stages.realize.realize",
              "stitch a MIP solution's blocks into a child checkpoint", "realize.sbatch",
              run_stage=run_stage)
