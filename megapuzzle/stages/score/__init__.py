"""Stage `score`: replace-1-block scoring of every library block.

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

from megapuzzle.config import RunDir, section
from megapuzzle.stages.base import Stage, fusion_max_run


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    from megapuzzle.stages.score.score import ScoreConfig, run_score

    res = run_score(run.root, section(cfg, "score", ScoreConfig))
    out = {"tokens": res.get("tokens"), "blocks": len(res.get("blocks", {}))}
    if fusion_max_run(cfg) > 1:  # search_space is bld's: a change there re-runs bld, then this stage
        from megapuzzle.stages.fusion_runs import score_runs

        out["run_blocks"] = len(score_runs(run.root, section(cfg, "score", ScoreConfig))["blocks"])
    return out


STAGE = Stage("score", ("score",), "score", "megapuzzle.stages.score.score",
              "replace-1-block scoring of every library block (KL, LM loss, top-k)",
              "score.sbatch", "megapuzzle.config.score:ScoreConfig",
              run_stage=run_stage)
