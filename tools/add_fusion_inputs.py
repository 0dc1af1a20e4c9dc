#!/usr/bin/env python3
"""Add the FFN Fusion inputs to a finished base run (parent, library, scores, costs) in place:

    python tools/add_fusion_inputs.py CONFIG RUN

CONFIG must set search_space.fusion_max_run > 1. Runs exactly what `megapuzzle run` adds for
fusion (the bld / score / measure stages' run_stage) and nothing else:
  - stages.fusion_runs.run_bld: the run blocks -> RUN/library_runs (bld's settings)
  - stages.fusion_runs.score_runs: their replace-the-run scores (score's settings)
  - measure: costs.json with the fused widths; it resumes from RUN/state/measure_partial.json,
    so with unchanged measure settings only the new widths are timed
The single-layer library and scores.json are left exactly as they are (a re-run of bld/score
through `megapuzzle run` would be needed only if their own config changed), so children
selected without fusion from RUN are the same as from the original run. Writes RUN/fusion_inputs.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("run")
    a = ap.parse_args(argv)
    from megapuzzle import logs
    from megapuzzle.arch import SearchSpace
    from megapuzzle.stages.bld.bld import BLDConfig
    from megapuzzle.config import RunDir, load_config, section
    from megapuzzle.errors import UserError
    from megapuzzle.fileio import atomic_write_json, sha256_file
    from megapuzzle.stages.fusion_runs import run_bld, score_runs
    from megapuzzle.stages.measure import run_stage as run_measure
    from megapuzzle.stages.score.score import ScoreConfig

    logs.setup()
    cfg = load_config(a.config)
    max_run = SearchSpace.from_dict(cfg.get("search_space")).fusion_max_run
    if max_run < 2:
        raise UserError(f"{a.config}: search_space.fusion_max_run is {max_run}; set it to 2 or more")
    run = RunDir(Path(a.run))
    before = {n: sha256_file(run.root / n) for n in ("scores.json", "library/index.json")}
    out, t0 = {"config": str(Path(a.config).resolve()), "fusion_max_run": max_run}, time.perf_counter()
    out["run_blocks"] = len(run_bld(run.root, section(cfg, "bld", BLDConfig), max_run)["blocks"])
    out["bld_s"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    score_runs(run.root, section(cfg, "score", ScoreConfig))
    out["score_s"] = round(time.perf_counter() - t1, 1)
    t1 = time.perf_counter()
    out["measure"] = run_measure(run, cfg)
    out["measure_s"] = round(time.perf_counter() - t1, 1)
    after = {n: sha256_file(run.root / n) for n in before}
    if after != before:
        raise UserError(f"the single-layer library / scores changed under {run.root}: {before} -> {after}")
    out["unchanged"] = after
    atomic_write_json(run.root / "fusion_inputs.json", out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
