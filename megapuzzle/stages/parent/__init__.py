"""Stage `parent`: train the embedded parent (or import one).

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from megapuzzle.config import RunDir, section
from megapuzzle.config.pipeline import ParentSection
from megapuzzle.errors import UserError
from megapuzzle.fileio import replace_tree
from megapuzzle.stages.base import Stage


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    p = section(cfg, "parent", ParentSection)
    if p.train:
        from megapuzzle.stages.parent.train_parent import FLAVOURS, train_parent

        if p.train not in FLAVOURS:
            raise UserError(f"parent.train {p.train!r} unknown; use one of {sorted(FLAVOURS)}")
        pcfg = FLAVOURS[p.train] if not p.steps else dataclasses.replace(FLAVOURS[p.train], steps=p.steps)
        if p.corpus:
            pcfg = dataclasses.replace(pcfg, corpus=p.corpus)
        out = run.root / "parent_train"
        res = train_parent(out, pcfg, threads=p.threads)
        replace_tree(out / "checkpoint", run.parent)
        run.data.mkdir(parents=True, exist_ok=True)
        for f in (out / "data").iterdir():
            shutil.copy2(f, run.data / f.name)
        return {"heldout_loss": res.get("heldout_loss"), "unigram_entropy": res.get("heldout_unigram_entropy")}
    if p.hf_dir:
        from megapuzzle.checkpoints.import_hf import import_hf

        import_hf(p.hf_dir, run.parent, force=True)
    else:
        from megapuzzle.checkpoints.canonical import load_arch

        load_arch(p.checkpoint)  # validates
        replace_tree(Path(p.checkpoint), run.parent)
    return {}


STAGE = Stage("parent", ("parent",), "train-parent", "megapuzzle.stages.parent.train_parent",
              "train the embedded parent (a small Llama) on the Python stdlib source", "parent.sbatch",
              run_stage=run_stage)
