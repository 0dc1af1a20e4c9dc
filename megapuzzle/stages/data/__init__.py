"""Stage `data`: the run's train / held-out token data (from train-parent, the embedded corpus or prefixes).

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

import shutil
from pathlib import Path

from megapuzzle.config import RunDir, section
from megapuzzle.config.pipeline import DataSection, ParentSection
from megapuzzle.errors import UserError
from megapuzzle.stages.base import Stage


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    if section(cfg, "parent", ParentSection).train:
        run.require_data("train"), run.require_data("heldout")  # written by the parent stage
        return {"source": "train-parent"}
    d = section(cfg, "data", DataSection)
    run.data.mkdir(parents=True, exist_ok=True)
    if d.stdlib:
        from megapuzzle.checkpoints.canonical import tokenizer_path
        from megapuzzle.data.prepare import prepare_data

        tok = tokenizer_path(run.parent)
        if tok is None:
            raise UserError(f"{run.parent} has no tokenizer/; data.stdlib needs the parent's tokenizer")
        for split in ("train", "heldout"):
            prepare_data("stdlib", tok, run.data / split, split=split)
        return {"source": "stdlib"}
    if not (d.train and d.heldout):
        raise UserError("data: give train and heldout indexed-dataset prefixes, or stdlib: true")
    for split, prefix in (("train", d.train), ("heldout", d.heldout)):
        for ext in (".bin", ".idx"):
            src = Path(prefix + ext)
            if not src.is_file():
                raise UserError(f"data.{split}: {src} does not exist; run `megapuzzle prepare-data` first")
            shutil.copy2(src, run.data / (split + ext))
    return {"source": "prefixes"}


STAGE = Stage("data", ("parent", "data"), "prepare-data", "megapuzzle.data.prepare",
              "tokenize text/jsonl (or the embedded corpus) into a Megatron indexed dataset",
              run_stage=run_stage)
