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
