"""megapuzzle.logs: one handler, rank 0 only, prefixes for benchmarks' children."""

from __future__ import annotations

import io
import logging

from megapuzzle import logs


def _reset():
    root = logging.getLogger("megapuzzle")
    for h in list(root.handlers):
        if getattr(h, "_megapuzzle_handler", False):
            root.removeHandler(h)
    root.propagate = True


def test_setup_prints_rank_zero_lines_once_with_prefixes(monkeypatch):
    out = io.StringIO()
    _reset()  # a command run in-process earlier may have installed the stdout handler
    try:
        logs.setup(stream=out)
        logs.setup(stream=out)  # idempotent: one handler
        log = logging.getLogger("megapuzzle.some_stage").info
        log("plain")
        with logs.prefixed("  [puzzle 2x] "):
            log("inside")
            with logs.prefixed("[gkd] "):
                log("nested")
        monkeypatch.setattr(logs, "rank", lambda: 1)  # as on rank 1 of a job
        log("from rank 1")  # dropped
        logging.getLogger("megapuzzle.x").info("every rank", extra={"all_ranks": True})
    finally:
        _reset()
    assert out.getvalue().splitlines() == ["plain", "  [puzzle 2x] inside", "  [puzzle 2x] [gkd] nested", "every rank"]


def test_stage_functions_take_no_log_callable():
    import inspect

    from megapuzzle.stages.bld.bld import run_bld
    from megapuzzle.stages.evaluate.evaluate import run_evaluate
    from megapuzzle.stages.gkd.gkd import run_gkd
    from megapuzzle.stages.mip.mip import run_mip
    from megapuzzle.pipeline import run_pipeline
    from megapuzzle.stages.score.score import run_score
    from megapuzzle.stages.parent.train_parent import train_parent

    for fn in (run_bld, run_evaluate, run_gkd, run_mip, run_pipeline, run_score, train_parent):
        assert "log" not in inspect.signature(fn).parameters, fn.__name__


def test_rank_comes_from_the_environment_before_torch_distributed():
    import os
    import subprocess
    import sys

    # a fresh process: no process group exists, so $RANK decides (torchrun / our SLURM launchers set it)
    code = "from megapuzzle import logs; print(logs.rank())"
    for env_rank, want in (("3", "3"), (None, "0")):
        env = {k: v for k, v in os.environ.items() if k != "RANK"}
        if env_rank is not None:
            env["RANK"] = env_rank
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want
