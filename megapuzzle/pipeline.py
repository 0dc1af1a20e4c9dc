"""`megapuzzle run CONFIG`: every Puzzle stage in order, in one run directory.

    megapuzzle run examples/cpu_demo.yaml                       # -> runs/cpu_demo (config's run_dir)
    megapuzzle run examples/cpu_demo.yaml --run-dir /tmp/demo
    megapuzzle run examples/cpu_demo.yaml --only score          # one stage (its inputs must exist)

Stages: parent (import-hf or train-parent) -> data -> bld -> score -> measure -> mip ->
realize -> gkd -> evaluate -> export. RUN/manifest.json records each stage's config (the
config sections it reads), its inputs, status and timing. On a re-run a finished stage whose
config is unchanged is skipped; a stage whose config changed runs again, and so does every
stage after it (nothing before it). An interrupted stage simply runs again: every long stage
resumes from its own checkpoints.
"""

from __future__ import annotations

import logging
import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from megapuzzle.config import RunDir, load_config, section
from megapuzzle.config.pipeline import DataSection, ParentSection
from megapuzzle.errors import UserError
from megapuzzle.stages import STAGES as REGISTRY
from megapuzzle.stages.runner import Step, run_steps
from megapuzzle.fileio import atomic_write_json

log = logging.getLogger(__name__).info


# the registry's stages (megapuzzle.stages), in its order: name, config sections, what runs it
STAGES: list[tuple[str, tuple[str, ...], Callable[[RunDir, dict], dict]]] = [
    (s.name, s.sections, s.run_stage) for s in REGISTRY]
STAGE_NAMES = [s[0] for s in STAGES]


def stage_config(cfg: dict, sections: tuple[str, ...]) -> dict:
    return {s: cfg.get(s) for s in sections}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("megapuzzle", "torch", "megatron-core", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def validate_config(cfg: dict) -> None:
    """Every section parsed (unknown keys, bad values) and FP8 checked against this machine
    BEFORE the first stage runs: a bad config fails at start in one line, never half-way."""
    from megapuzzle.arch import SearchSpace
    from megapuzzle.stages import schema

    if not section(cfg, "parent", ParentSection).train:
        section(cfg, "data", DataSection)
    SearchSpace.from_dict(cfg.get("search_space"))
    parsed = {s.name: section(cfg, s.sections[-1], schema(s)) for s in REGISTRY if s.schema}
    fp8 = [name for name in ("bld", "measure", "gkd") if getattr(parsed[name], "fp8", False)]
    if fp8:
        from megapuzzle.model.config import ModelConfigError, check_fp8, resolve_use_te

        try:
            check_fp8(True, resolve_use_te(None))
        except ModelConfigError as e:
            raise UserError(f"{'/'.join(n + '.fp8' for n in fp8)}: {e}") from None


def run_pipeline(config_path: str | Path, run_dir: str | Path | None = None, *, only: str | None = None,
                 until: str | None = None) -> dict:
    cfg = load_config(config_path)
    run = RunDir(run_dir or cfg.get("run_dir") or Path("runs") / Path(config_path).stem)
    known = set(STAGE_NAMES) | {"run_dir", "search_space", "data", "realize", "export"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UserError(f"unknown config section(s) {unknown}; known: {sorted(known)}")
    for name in (only, until):
        if name is not None and name not in STAGE_NAMES:
            raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    validate_config(cfg)
    run.root.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(run.manifest.read_text()) if run.manifest.is_file() else {}
    manifest.setdefault("stages", {})
    manifest.update(config=cfg, config_path=str(Path(config_path).resolve()), versions=_versions(),
                    command=" ".join(sys.argv))
    atomic_write_json(run.manifest, manifest)
    t_all = time.perf_counter()
    steps = [Step(name, stage_config(cfg, sections), lambda fn=fn: fn(run, cfg)) for name, sections, fn in STAGES]
    run_steps(run.manifest, manifest, steps, only=only, until=until)
    manifest["wall_s_last_invocation"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(run.manifest, manifest)
    log(f"[run] {run.root}: finished in {time.perf_counter() - t_all:.0f}s"
        + (f"; report {run.report}" if run.report.is_file() else ""))
    return manifest


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (examples/cpu_demo.yaml is the embedded default)")
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<config name>)")
    p.add_argument("--only", help=f"run just this stage ({', '.join(STAGE_NAMES)})")
    p.add_argument("--until", help="stop after this stage")


def run_cli(args: argparse.Namespace) -> int:
    run_pipeline(args.config, args.run_dir, only=args.only, until=args.until)
    return 0
