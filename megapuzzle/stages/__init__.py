"""The stage registry: every Puzzle stage once, in pipeline order, with what it reads and how it
is launched. `megapuzzle run` (megapuzzle.pipeline), the CLI (megapuzzle.cli) and the SLURM chain
(slurm/submit_pipeline.sh, checked against this list by tests/test_pipeline.py) all read it.

A stage is a function from files in the run directory to files in the run directory
(docs/design.md); its command runs it alone, e.g. `megapuzzle bld --config CFG --run-dir RUN`.
Each stage is a package here (megapuzzle/stages/<name>/) whose __init__ exposes STAGE: its
config sections and schema, its command module (CLI arguments), its SLURM script, and
`run_stage(RUN, cfg)`, what `megapuzzle run` does for it.
Torch-free: `megapuzzle --help` and config validation answer in milliseconds.
"""

from __future__ import annotations

from megapuzzle.stages import bld, data, evaluate, export, gkd, measure, mip, parent, realize, score
from megapuzzle.stages.base import Stage


STAGES: tuple[Stage, ...] = tuple(p.STAGE for p in (parent, data, bld, score, measure, mip, realize, gkd,
                                                     evaluate, export))
"""Pipeline order."""

TOOLS: dict[str, tuple[str, str]] = {
    "import-hf": ("megapuzzle.checkpoints.import_hf", "HF Llama directory -> megapuzzle checkpoint"),
    "run": ("megapuzzle.pipeline", "the whole pipeline from one config, resumable (manifest.json)"),
    "fuse": ("megapuzzle.fuse", "FFN Fusion: fuse a child's attention-free FFN runs into wide FFNs, heal (GKD), "
             "measure"),
    "baseline": ("megapuzzle.bench.baselines", "uniform / depth / random / greedy compression at a throughput target, "
                 "GKD'd + evaluated"),
    "bench": ("megapuzzle.bench.search_quality", "benchmarks: search-quality (Puzzle vs the baselines at equal "
              "measured speed)"),
    "verify-export": ("megapuzzle.serving.verify", "read an export in vLLM / transformers and check it token for "
                      "token against our model"),
    "info": ("megapuzzle.info", "print an architecture (checkpoint, arch.json or HF config.json) layer by layer"),
}
"""Commands that are not a stage of `megapuzzle run`."""


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)


def commands() -> dict[str, tuple[str, str]]:
    """command -> (module, one-line help): the stages' commands in pipeline order, then the tools."""
    out = {s.command: (s.module, s.summary) for s in STAGES}
    out.update(TOOLS)
    return out


def schema(s: Stage) -> type | None:
    """The config class of a stage's own section (imported on demand)."""
    if s.schema is None:
        return None
    import importlib

    module, cls = s.schema.split(":")
    return getattr(importlib.import_module(module), cls)
