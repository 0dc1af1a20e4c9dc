"""Stage `evaluate`: parent vs child quality and measured speed.

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

import json

from megapuzzle.config import RunDir, section
from megapuzzle.fileio import atomic_write_json
from megapuzzle.stages.base import Stage
from megapuzzle.stages.runner import jsonable


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    from megapuzzle.config.evaluate import EvaluateConfig
    from megapuzzle.launch import launched_world, torchrun

    e = section(cfg, "evaluate", EvaluateConfig)
    n = e.tensor_parallel * e.pipeline_parallel
    if n > 1 and launched_world() == 1:  # one process here: evaluate gets its TP x PP ranks from torchrun
        conf = run.state / "evaluate" / "config.json"  # the section the ranks read (json is yaml)
        atomic_write_json(conf, {"evaluate": cfg.get("evaluate") or {}})
        torchrun(n, ["evaluate", "--config", str(conf), "--run-dir", str(run.root)], what="evaluate")
        return json.loads((run.root / "eval.json").read_text())
    from megapuzzle.stages.evaluate.evaluate import run_evaluate

    return jsonable(run_evaluate(run.root, e))


STAGE = Stage("evaluate", ("evaluate",), "evaluate", "megapuzzle.stages.evaluate.evaluate",
              "parent vs child: quality, measured throughput, report.md + pareto.png",
              "evaluate.sbatch", "megapuzzle.config.evaluate:EvaluateConfig",
              run_stage=run_stage)
