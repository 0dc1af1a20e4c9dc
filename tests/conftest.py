"""Shared fixtures: the debug parent (trained once per test session) as a run directory."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/_dist.py helpers


@pytest.fixture(scope="session")
def debug_parent(tmp_path_factory) -> Path:
    """train-parent's debug flavour, 30 steps: OUT with checkpoint/, data/, hf/."""
    from megapuzzle.stages.parent.train_parent import FLAVOURS, train_parent

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("debug_parent") / "p"
    train_parent(out, dataclasses.replace(FLAVOURS["debug"], steps=30))
    return out


def make_run(debug_parent: Path, dest: Path) -> Path:
    """A run directory with parent/ and data/ from the debug parent."""
    shutil.copytree(debug_parent / "checkpoint", dest / "parent")
    shutil.copytree(debug_parent / "data", dest / "data")
    return dest


# The tiny search a run directory for MIP / evaluate / baseline tests is built with.
SEARCH_CFG = {
    "search_space": {"kv_heads": [1], "ffn_fractions": [0.5], "ffn_granularity": 64},
    "bld": {"tokens_per_block": 512, "batch_size": 4, "seq_len": 32, "checkpoint_every": 100, "log_every": 100,
            "eval_batches": 1, "calibration_batches": 1},
    "score": {"batch_size": 2, "seq_len": 32, "num_batches": 2, "candidates_per_pass": 3},
    "measure": {"batch_sizes": [1, 2], "seq_lens": [8, 16], "repeats": 1, "warmup": 0, "min_sample_s": 0.0,
                "stack_layers": 2, "check_parent": False, "passes": 1},
}


def make_searched_run(debug_parent: Path, dest: Path, cfg: dict, costs_hook=None) -> Path:
    """make_run + BLD + score + measured costs (costs.json, optionally rewritten by `costs_hook`):
    a run directory ready for the MIP, from a full config dict (sections search_space, bld,
    score, measure)."""
    from megapuzzle.arch import SearchSpace
    from megapuzzle.stages.bld.bld import run_bld
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.config import section
    from megapuzzle.stages.measure.measure import MeasureConfig, measure_costs
    from megapuzzle.fileio import atomic_write_json
    from megapuzzle.stages.score.score import ScoreConfig, run_score

    quiet = dict(progress=False)
    torch.set_num_threads(1)
    r = make_run(debug_parent, dest)
    run_bld(r, cfg, **quiet)
    run_score(r, section(cfg, "score", ScoreConfig), **quiet)
    costs = measure_costs(load_arch(r / "parent"), section(cfg, "measure", MeasureConfig),
                          space=SearchSpace.from_dict(cfg["search_space"]))
    atomic_write_json(r / "costs.json", costs_hook(costs) if costs_hook else costs)
    return r
