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
import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from megapuzzle.config import RunDir, load_config, section
from megapuzzle.config.pipeline import DataSection, ExportSection, ParentSection  # noqa: F401
from megapuzzle.errors import UserError
from megapuzzle.stages import STAGES as REGISTRY
from megapuzzle.stages.runner import Step, jsonable as _jsonable, run_steps
from megapuzzle.fileio import atomic_write_json, replace_dir

log = logging.getLogger(__name__).info


# ----------------------------------------------------------------------------- stages

def _stage_parent(run: RunDir, cfg: dict) -> dict:
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
        _replace_tree(out / "checkpoint", run.parent)
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
        _replace_tree(Path(p.checkpoint), run.parent)
    return {}


def _stage_data(run: RunDir, cfg: dict) -> dict:
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


def _stage_bld(run: RunDir, cfg: dict) -> dict:
    from megapuzzle.stages.bld.bld import run_bld

    res = run_bld(run.root, cfg)
    out = {"trained": len(res.get("trained", []))}
    max_run = _fusion_max_run(cfg)
    if max_run > 1:
        from megapuzzle.stages.bld.bld import BLDConfig
        from megapuzzle.fusion_blocks import run_bld as run_fusion_bld

        out["run_blocks"] = len(run_fusion_bld(run.root, section(cfg, "bld", BLDConfig), max_run)["blocks"])
    return out


def _fusion_max_run(cfg: dict) -> int:
    from megapuzzle.arch import SearchSpace

    return SearchSpace.from_dict(cfg.get("search_space")).fusion_max_run


def _stage_score(run: RunDir, cfg: dict) -> dict:
    from megapuzzle.stages.score.score import ScoreConfig, run_score

    res = run_score(run.root, section(cfg, "score", ScoreConfig))
    out = {"tokens": res.get("tokens"), "blocks": len(res.get("blocks", {}))}
    if _fusion_max_run(cfg) > 1:  # search_space is bld's: a change there re-runs bld, then this stage
        from megapuzzle.fusion_blocks import score_runs

        out["run_blocks"] = len(score_runs(run.root, section(cfg, "score", ScoreConfig))["blocks"])
    return out


def _stage_measure(run: RunDir, cfg: dict) -> dict:
    from megapuzzle.arch import SearchSpace
    from megapuzzle.checkpoints.canonical import load_arch, require_parent
    from megapuzzle.stages.measure.measure import MeasureConfig, format_check, measure_costs

    costs = measure_costs(load_arch(require_parent(run)), section(cfg, "measure", MeasureConfig),
                          space=SearchSpace.from_dict(cfg.get("search_space")),
                          state_path=run.state / "measure_partial.json")
    atomic_write_json(run.costs, costs)
    if "check" in costs:
        log("[measure] whole parent, predicted (sum of parts) vs measured:\n" + format_check(costs))
    return {"device": costs.get("device")}


def _stage_mip(run: RunDir, cfg: dict) -> dict:
    from megapuzzle.stages.mip.mip import MIPConfig, run_mip

    # search_space is not in this stage's config hash: changing it re-runs bld, hence this stage
    out = run_mip(run.root, section(cfg, "mip", MIPConfig), fusion_max_run=_fusion_max_run(cfg))
    return {"predicted_speedup": out["solutions"][0]["predicted_speedup"], "objective": out["solutions"][0]["objective"]}


def _stage_realize(run: RunDir, cfg: dict) -> dict:
    from megapuzzle.arch_table import architecture_table
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.stages.realize.realize import realize

    realize(run.root, int((cfg.get("realize") or {}).get("solution", 0)))
    log(architecture_table(load_arch(run.child)))
    return {}


def _stage_gkd(run: RunDir, cfg: dict) -> dict:
    from megapuzzle.stages.gkd.gkd import GKDConfig, run_gkd

    return _jsonable(run_gkd(run.root, section(cfg, "gkd", GKDConfig)))


def _stage_evaluate(run: RunDir, cfg: dict) -> dict:
    from megapuzzle.config.evaluate import EvaluateConfig
    from megapuzzle.launch import launched_world, torchrun

    e = section(cfg, "evaluate", EvaluateConfig)
    n = e.tensor_parallel * e.pipeline_parallel
    if n > 1 and launched_world() == 1:  # one process here: evaluate gets its TP x PP ranks from torchrun
        conf = run.state / "evaluate" / "config.json"  # the section the ranks read (json is yaml)
        atomic_write_json(conf, {"evaluate": cfg.get("evaluate") or {}})
        torchrun(n, ["evaluate", "--config", str(conf), "--run-dir", str(run.root)], what="evaluate")
        return json.loads((run.root / "eval.json").read_text())
    from megapuzzle.stages.evaluate.evaluate import run_evaluate

    return _jsonable(run_evaluate(run.root, e))


def _stage_export(run: RunDir, cfg: dict) -> dict:
    from megapuzzle.checkpoints.export_hf import export_hf

    e = section(cfg, "export", ExportSection)
    src = run.gkd / "checkpoint" if (run.gkd / "checkpoint" / "arch.json").is_file() else run.child
    res = export_hf(src, run.export, dtype=e.dtype, force=True, max_shard_size=e.max_shard_size, target=e.target)
    warnings = res["warnings"]
    for w in warnings:
        log(f"[export] warning: not loadable by {w.rsplit(': ', 1)[-1]}: {w.rsplit(': ', 1)[0]}")
    log(f"[export] {src} -> {run.export} (DeciLMForCausalLM, {res['dtype']})")
    out = {"source": str(src), "warnings": warnings, "dtype": res["dtype"]}
    if e.quantize == "fp8":
        from megapuzzle.checkpoints.quantize_fp8 import export_fp8

        fp8_dir = run.root / "export_fp8"
        res = export_fp8(src, fp8_dir, calib_data=str(run.heldout_data), calib_batches=e.calib_batches,
                         calib_batch_size=e.calib_batch_size, calib_seq_len=e.calib_seq_len, force=True,
                         max_shard_size=e.max_shard_size)
        log(f"[export] {src} -> {fp8_dir} (FP8 E4M3 via ModelOpt: {res['quantized_linears']} Linear layers)")
        out["fp8"] = {"dir": str(fp8_dir), **{k: v for k, v in res.items() if k != "warnings"}}
    return out


# how `megapuzzle run` runs each stage of the registry (megapuzzle.stages), in its order
_RUNNERS: dict[str, Callable[[RunDir, dict, Any], dict]] = {
    "parent": _stage_parent, "data": _stage_data, "bld": _stage_bld, "score": _stage_score,
    "measure": _stage_measure, "mip": _stage_mip, "realize": _stage_realize, "gkd": _stage_gkd,
    "evaluate": _stage_evaluate, "export": _stage_export,
}
STAGES: list[tuple[str, tuple[str, ...], Callable[[RunDir, dict, Any], dict]]] = [
    (s.name, s.sections, _RUNNERS[s.name]) for s in REGISTRY]
STAGE_NAMES = [s[0] for s in STAGES]


def _replace_tree(src: Path, dst: Path) -> None:
    """Copy `src` over `dst` atomically (a kill leaves the old copy or the new one)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, dst)


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
