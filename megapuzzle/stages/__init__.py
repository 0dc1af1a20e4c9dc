"""The stage registry: every Puzzle stage once, in pipeline order, with what it reads and how it
is launched. `megapuzzle run` (megapuzzle.pipeline), the CLI (megapuzzle.cli) and the SLURM chain
(slurm/submit_pipeline.sh, checked against this list by tests/test_pipeline.py) all read it.

A stage is a function from files in the run directory to files in the run directory
(docs/design.md); its command runs it alone, e.g. `megapuzzle bld --config CFG --run-dir RUN`.
Torch-free: `megapuzzle --help` and config validation answer in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    """Its key in RUN/manifest.json and in `megapuzzle run --only/--until`."""
    sections: tuple[str, ...]
    """The config sections it reads: a change to one re-runs it (and everything after it)."""
    command: str
    """The `megapuzzle` subcommand that runs it alone."""
    module: str
    """The module holding that command's add_cli_args / run_cli."""
    summary: str
    """One line for `megapuzzle --help`."""
    sbatch: str | None = None
    """Its SLURM job script under slurm/ (None: it runs inside another stage's job)."""
    schema: str | None = None
    """"module:Class" of its own config section (torch-free, megapuzzle/config/), validated before
    the first stage of `megapuzzle run` starts."""


STAGES: tuple[Stage, ...] = (
    Stage("parent", ("parent",), "train-parent", "megapuzzle.stages.parent.train_parent",
          "train the embedded parent (a small Llama) on the Python stdlib source", "parent.sbatch"),
    Stage("data", ("parent", "data"), "prepare-data", "megapuzzle.data.prepare",
          "tokenize text/jsonl (or the embedded corpus) into a Megatron indexed dataset"),
    Stage("bld", ("search_space", "bld"), "bld", "megapuzzle.stages.bld.bld",
          "child initialisation + blockwise local distillation into the block library",
          "bld.sbatch", "megapuzzle.config.bld:BLDConfig"),
    Stage("score", ("score",), "score", "megapuzzle.stages.score.score",
          "replace-1-block scoring of every library block (KL, LM loss, top-k)",
          "score.sbatch", "megapuzzle.config.score:ScoreConfig"),
    Stage("measure", ("search_space", "measure"), "measure", "megapuzzle.stages.measure.measure",
          "measured per-variant runtime + memory costs (and GPU roofline estimates)",
          "measure.sbatch", "megapuzzle.config.measure:MeasureConfig"),
    Stage("mip", ("mip",), "mip", "megapuzzle.stages.mip.mip",
          "pick one variant per layer under throughput / latency / memory budgets",
          "mip.sbatch", "megapuzzle.config.mip:MIPConfig"),
    Stage("realize", ("realize",), "realize", "megapuzzle.stages.realize.realize",
          "stitch a MIP solution's blocks into a child checkpoint", "realize.sbatch"),
    Stage("gkd", ("gkd",), "gkd", "megapuzzle.stages.gkd.gkd",
          "global knowledge distillation of the child from the parent",
          "gkd.sbatch", "megapuzzle.config.gkd:GKDConfig"),
    Stage("evaluate", ("evaluate",), "evaluate", "megapuzzle.stages.evaluate.evaluate",
          "parent vs child: quality, measured throughput, report.md + pareto.png",
          "evaluate.sbatch", "megapuzzle.config.evaluate:EvaluateConfig"),
    Stage("export", ("export",), "export-hf", "megapuzzle.checkpoints.export_hf",
          "megapuzzle checkpoint -> HF DeciLM (nemotron-nas) directory",
          "export.sbatch", "megapuzzle.config.pipeline:ExportSection"),
)
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
