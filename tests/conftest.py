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
    from megapuzzle.train_parent import FLAVOURS, train_parent

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("debug_parent") / "p"
    train_parent(out, dataclasses.replace(FLAVOURS["debug"], steps=30), log=lambda *a: None)
    return out


def make_run(debug_parent: Path, dest: Path) -> Path:
    """A run directory with parent/ and data/ from the debug parent."""
    shutil.copytree(debug_parent / "checkpoint", dest / "parent")
    shutil.copytree(debug_parent / "data", dest / "data")
    return dest


def make_searched_run(debug_parent: Path, dest: Path, cfg: dict, costs_hook=None) -> Path:
    """make_run + BLD + score + measured costs (costs.json, optionally rewritten by `costs_hook`):
    a run directory ready for the MIP, from a full config dict (sections search_space, bld,
    score, measure)."""
    from megapuzzle.arch import SearchSpace
    from megapuzzle.bld import run_bld
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.config import section
    from megapuzzle.cost import MeasureConfig, measure_costs
    from megapuzzle.fileio import atomic_write_json
    from megapuzzle.score import ScoreConfig, run_score

    quiet = dict(log=lambda *a: None, progress=False)
    torch.set_num_threads(1)
    r = make_run(debug_parent, dest)
    run_bld(r, cfg, **quiet)
    run_score(r, section(cfg, "score", ScoreConfig), **quiet)
    costs = measure_costs(load_arch(r / "parent"), section(cfg, "measure", MeasureConfig),
                          space=SearchSpace.from_dict(cfg["search_space"]))
    atomic_write_json(r / "costs.json", costs_hook(costs) if costs_hook else costs)
    return r
