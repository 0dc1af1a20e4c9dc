"""`megapuzzle fuse`: FFN Fusion of a child's no-op-attention runs, healed by a short GKD, measured.

    megapuzzle fuse --child runs/demo --out runs/demo_fused            # a run dir: its GKD'd child (else child/)
    megapuzzle fuse --child CKPT_OR_HF_DECILM_DIR --out DIR --data RUN/data
    megapuzzle fuse --child runs/demo --out DIR --runs 3-5,8-9 --gkd-steps 50

Every run of consecutive FFNs with only no-op attention between them (megapuzzle.fusion) becomes
one FFN of the summed width (the exact fold), the run's other layers no-op / no-op. OUT is a run
directory, so every other command works on it:

    OUT/parent        the unfused child (a link): the teacher and the reference
    OUT/source        the unfused child imported, when --child is a HF directory
    OUT/data          train / held-out tokens (a link to the source run's, --data, or the stdlib
                      tokenized with the child's tokenizer)
    OUT/child         the fused checkpoint (streamed, sharded, atomic; no training)
    OUT/gkd/          the short GKD that heals it (OUT/gkd/checkpoint; --gkd-steps 0 skips it)
    OUT/fuse.json     quality (held-out accuracy, KL to the unfused child) before / after GKD,
                      measured generation speed unfused vs fused (paired, ABBA), params, runs
    OUT/fuse.md       the same as a table

The GKD teacher is the unfused child (the fusion is what is healed; a foreign export has no
parent here). At scale it runs under torchrun like the stages: GKD on gkd's TP x PP layout, quality
and timing on evaluate's (evaluate.tensor_parallel / pipeline_parallel), each rank building only its
share and holding at most two models (the reference and one compared with it) at a time. Speed is timed as `evaluate` times (costs.json's settings when the source run has one).
"""

from __future__ import annotations

import logging
import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from megapuzzle.config import RunDir, load_config, section
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__).info


def resolve_source(src: str | Path, work: Path) -> tuple[Path, RunDir | None]:
    """(child checkpoint, the run it came from or None). A run directory gives its GKD'd child,
    else its realized child; a HF DeciLM / Llama directory is imported into WORK/source."""
    from megapuzzle.checkpoints.canonical import is_checkpoint

    p = Path(src)
    if is_checkpoint(p):
        return p, None
    run = RunDir(p)
    for cand in (run.gkd / "checkpoint", run.child):
        if is_checkpoint(cand):
            return cand, run
    if (p / "config.json").is_file():
        from megapuzzle.checkpoints.import_hf import import_hf

        dest = work / "source"
        if not is_checkpoint(dest):
            import_hf(p, dest, force=True)
        return dest, None
    raise UserError(f"{p} is no checkpoint, run directory with a child, or HF directory; give --child one of them")


def _link(target: Path, link: Path) -> None:
    target = target.resolve()
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        if link.is_symlink():
            link.unlink()
        else:
            raise UserError(f"{link} exists and is not the link this command makes; pick an empty --out")
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link, target_is_directory=True)


def prepare_fuse_data(out: RunDir, source_run: RunDir | None, data: str | None, child_dir: Path) -> None:
    if data is not None:
        d = Path(data)
        if not (d / "train.idx").is_file() or not (d / "heldout.idx").is_file():
            raise UserError(f"--data {d} needs train.{{bin,idx}} and heldout.{{bin,idx}} (a run's data/ directory)")
        _link(d, out.data)
        return
    if source_run is not None and (source_run.data / "heldout.idx").is_file():
        _link(source_run.data, out.data)
        return
    if (out.data / "heldout.idx").is_file():
        return
    from megapuzzle.checkpoints.canonical import tokenizer_path
    from megapuzzle.data.prepare import prepare_data

    tok = tokenizer_path(child_dir)
    if tok is None:
        raise UserError(f"{child_dir} has no tokenizer/ and no data was given; pass --data RUN/data")
    log(f"[fuse] tokenizing the stdlib corpus with {tok} -> {out.data}")
    for split in ("train", "heldout"):
        prepare_data("stdlib", tok, out.data / split, split=split, progress=False)


def write_fused(child_dir: Path, out_dir: Path, runs, *, leading_attention: bool = True, max_run: int | None = None,
                max_shard_bytes: int | None = None) -> tuple[Any, Any, list]:
    """Fuse `runs` (None: every run find_runs sees) of the checkpoint at child_dir into out_dir.
    Streamed: one layer (one run's FFNs) in memory at a time. Returns (arch, fused arch, runs)."""
    from megapuzzle.checkpoints.canonical import load_checkpoint, tokenizer_path, write_checkpoint
    from megapuzzle.checkpoints.shards import DEFAULT_MAX_SHARD_BYTES
    from megapuzzle.fusion import find_runs, fused_arch, iter_fused_tensors

    arch, tensors, meta = load_checkpoint(child_dir)
    if runs is None:
        runs = find_runs(arch, leading_attention=leading_attention, max_run=max_run)
    if not runs:
        raise UserError(f"{child_dir} has no run of consecutive FFNs without attention between them "
                        f"({', '.join(l.name for l in arch.layers)}); nothing to fuse")
    new = fused_arch(arch, runs)
    write_checkpoint(out_dir, new, iter_fused_tensors(arch, tensors, runs), force=True,
                     meta={"source": "fuse", "fused_from": str(child_dir), "runs": [list(r) for r in runs],
                           "child_meta": meta}, tokenizer_dir=tokenizer_path(child_dir),
                     max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    log(f"[fuse] {len(runs)} run(s) {', '.join(f'{i}-{j}' for i, j in runs)}: {arch.num_layers} layers, "
        f"{sum(not l.attention.identity or not l.ffn.identity for l in arch.layers)} -> "
        f"{sum(not l.attention.identity or not l.ffn.identity for l in new.layers)} non-empty; "
        f"{arch.num_params() / 1e6:.3f}M -> {new.num_params() / 1e6:.3f}M params -> {out_dir}")
    return arch, new, runs


def _against(ref_dir: Path, ref_name: str, dirs: dict[str, Path], batches, qdt) -> dict:
    """Quality of every model in `dirs` against the reference on the same held-out batches, holding at
    most two models at once (the reference and the one compared with it)."""

    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.stages.evaluate.evaluate import build_model, quality_metrics

    ref = build_model(*load_checkpoint(ref_dir, dtype=qdt)[:2], qdt)  # read straight in the quality dtype
    out: dict[str, Any] = {}
    for name, d in dirs.items():
        if ref_dir == d:
            out.update(quality_metrics(ref, {name: ref}, batches))
            continue
        m = build_model(*load_checkpoint(d, dtype=qdt)[:2], qdt)
        out.update({n: q for n, q in quality_metrics(ref, {ref_name: ref, name: m}, batches).items()
                    if n == name or n not in out})
        del m
    base_acc = out[ref_name]["accuracy"]
    for q in out.values():
        q["retention_pct"] = 100.0 * q["accuracy"] / base_acc if base_acc > 0 else None
    return {ref_name: out.pop(ref_name), **out}


def _speed(run: RunDir, source_run: RunDir | None, eval_cfg) -> dict:
    """The unfused vs fused child timed like the source run's costs.json was measured (evaluate's way)."""

    from megapuzzle.checkpoints.canonical import load_arch, load_checkpoint
    from megapuzzle.costs.table import load_costs
    from megapuzzle.runtime.dtypes import resolve_dtype
    from megapuzzle.stages.evaluate.evaluate import measure_pair, paired_speedup, scenario, timing_settings

    costs_file = source_run.costs if source_run is not None else None
    costs = load_costs(costs_file) if costs_file is not None and costs_file.is_file() else None
    settings = timing_settings(costs, eval_cfg)
    tdt = resolve_dtype(settings["dtype"])  # each tensor read straight in the timed models' dtype
    archs = {"unfused": load_arch(run.parent), "fused": load_arch(run.child)}
    tensors = {"unfused": load_checkpoint(run.parent, dtype=tdt)[1], "fused": load_checkpoint(run.child, dtype=tdt)[1]}
    sc = scenario(source_run or run, eval_cfg)
    speed = measure_pair(archs, tensors, sc, eval_cfg, settings)
    return {"scenario": sc, "timing": settings,
            "speedup_measured": paired_speedup(speed["unfused"], speed["fused"]), **speed}


def _quality_and_speed(run: RunDir, source_run: RunDir | None, healed: Path | None, eval_cfg, measure: bool) -> dict:
    """report["quality"] (vs the unfused child), ["quality_vs_parent"] (when the original parent is known)
    and ["speed"]. Each rank builds its share (evaluate.tensor_parallel x pipeline_parallel:
    `torchrun ... megapuzzle fuse`)."""
    from megapuzzle.checkpoints.canonical import is_checkpoint
    from megapuzzle.costs.timing import ensure_runtime, resolve_dtype
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.runtime.distributed import init_distributed

    ensure_runtime(None)
    init_distributed(tp=eval_cfg.tensor_parallel, pp=eval_cfg.pipeline_parallel)
    heldout = PackedSequenceDataset.from_prefix(run.require_data("heldout"))
    qdt = resolve_dtype(eval_cfg.quality_dtype)
    batches = list(heldout.eval_batches(eval_cfg.quality_batch_size, eval_cfg.seq_len,
                                        max_batches=eval_cfg.eval_batches or None))
    dirs = {"unfused": run.parent, "fused": run.child, **({"fused_gkd": healed} if healed is not None else {})}
    report = {"quality": _against(run.parent, "unfused", dirs, batches, qdt)}
    if source_run is not None and is_checkpoint(source_run.parent):  # the original parent, when known
        report["quality_vs_parent"] = _against(source_run.parent, "parent", {"parent": source_run.parent, **dirs},
                                               batches, qdt)
    if measure:
        report["speed"] = _speed(run, source_run, eval_cfg)
    return report


def fuse(child: str | Path, out: str | Path, *, runs=None, leading_attention: bool = True, max_run: int | None = None,
         data: str | None = None, gkd_cfg=None, heal: bool = True, eval_cfg=None, measure: bool = True) -> dict:
    import torch

    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.stages.evaluate.evaluate import EvaluateConfig
    from megapuzzle.stages.gkd.gkd import GKDConfig, run_gkd

    t0 = time.perf_counter()
    run = RunDir(out)
    run.root.mkdir(parents=True, exist_ok=True)
    given = Path(child).resolve()
    if given == run.root.resolve() or run.root.resolve() in given.parents:
        raise UserError(f"--out {run.root} holds the source child {child}; pick another --out")
    from megapuzzle.runtime.distributed import init_distributed, rank0_decides

    init_distributed()  # under torchrun: the process group, so that rank 0 alone writes OUT's inputs

    def prepare() -> dict:
        child_dir, source_run = resolve_source(child, run.root)  # a HF directory is imported into OUT/source
        _link(child_dir, run.parent)
        prepare_fuse_data(run, source_run, data, child_dir)
        found = write_fused(run.parent, run.child, runs, leading_attention=leading_attention, max_run=max_run)[2]
        return {"child": str(child_dir), "source_run": None if source_run is None else str(source_run.root),
                "runs": [list(r) for r in found]}

    d = rank0_decides(prepare, "prepare the fused child", (UserError, ValueError, OSError))
    child_dir, source_run = Path(d["child"]), None if d["source_run"] is None else RunDir(d["source_run"])
    arch, new, runs = load_arch(run.parent), load_arch(run.child), [tuple(r) for r in d["runs"]]
    gkd_cfg = gkd_cfg or GKDConfig(steps=50)
    eval_cfg = eval_cfg or EvaluateConfig()
    report: dict[str, Any] = {"source": str(child_dir), "runs": [list(r) for r in runs],
                              "layers_before": [l.name for l in arch.layers], "layers_after": [l.name for l in new.layers],
                              "params_before": arch.num_params(), "params_after": new.num_params(),
                              "gkd_steps": gkd_cfg.total_steps if heal else 0}
    healed = None
    if heal:
        res = run_gkd(run.root, gkd_cfg, progress=False)
        healed = run.gkd / "checkpoint"
        report["gkd"] = {k: res.get(k) for k in ("steps", "tokens", "initial", "final")}

    report.update(_quality_and_speed(run, source_run, healed, eval_cfg, measure))
    report["wall_s"] = time.perf_counter() - t0
    if torch.distributed.get_rank() == 0:  # every rank has the whole report; one writes it
        atomic_write_json(run.root / "fuse.json", report)
        atomic_write_text(run.root / "fuse.md", fuse_markdown(report))
        log(fuse_markdown(report))
    return report


def fuse_markdown(r: dict) -> str:
    lines = [f"# FFN Fusion of {r['source']}", "",
             f"Runs fused: {', '.join(f'{i}-{j}' for i, j in r['runs'])}; params {r['params_before']:,} -> "
             f"{r['params_after']:,}; GKD steps {r['gkd_steps']}.", "",
             "| model | held-out accuracy | retention vs unfused | KL(unfused ‖ model) | top-1 agreement | LM loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for n, q in r["quality"].items():
        ret = "n/a" if q.get("retention_pct") is None else f"{q['retention_pct']:.1f}%"
        lines.append(f"| {n} | {q['accuracy']:.4f} | {ret} | {q['kl_to_parent']:.4f} | {q['top1_agreement']:.4f} | "
                     f"{q['lm_loss']:.4f} |")
    vp = r.get("quality_vs_parent")
    if vp:
        lines += ["", "Against the original parent:", "",
                  "| model | held-out accuracy | retention vs parent | KL(parent ‖ model) |", "|---|---:|---:|---:|"]
        for n, q in vp.items():
            ret = "n/a" if q.get("retention_pct") is None else f"{q['retention_pct']:.1f}%"
            lines.append(f"| {n} | {q['accuracy']:.4f} | {ret} | {q['kl_to_parent']:.4f} |")
    s = r.get("speed")
    if s:
        sc = s["scenario"]
        lines += ["", f"Generation (batch {sc['batch_size']}, prefill {sc['prefill_len']} + gen {sc['gen_len']}, "
                      f"{s['unfused']['timed_generations']} paired generations each): unfused "
                      f"{s['unfused']['tokens_per_s']:.1f} tokens/s, fused {s['fused']['tokens_per_s']:.1f} tokens/s, "
                      f"measured speedup {s['speedup_measured']:.3f}x."]
    lines += ["", "| layer | before | after |", "|---:|---|---|"]
    lines += [f"| {i} | {a} | {b} |" for i, (a, b) in enumerate(zip(r["layers_before"], r["layers_after"]))]
    return "\n".join(lines) + "\n"


def _parse_runs(text: str | None):
    if not text:
        return None
    out = []
    for part in text.split(","):
        try:
            i, j = (int(x) for x in part.split("-"))
        except ValueError:
            raise UserError(f"--runs {text!r}: write runs as FIRST-LAST[,FIRST-LAST...], e.g. 3-5,8-9") from None
        out.append((i, j))
    return out


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--child", required=True,
                   help="run directory (its gkd/checkpoint, else child/), megapuzzle checkpoint, or HF DeciLM directory")
    p.add_argument("--out", required=True, help="output run directory (OUT/child is the fused checkpoint)")
    p.add_argument("--runs", help="fuse exactly these runs, FIRST-LAST[,...] (default: every fusable run)")
    p.add_argument("--max-run", type=int, help="longest run in layers (longer ones are split)")
    p.add_argument("--no-leading-attention", action="store_true",
                   help="a run's first layer must have no-op attention too (default: any attention)")
    p.add_argument("--data", help="directory with train/heldout indexed datasets (default: the source run's data/, "
                                  "else the stdlib tokenized with the child's tokenizer)")
    p.add_argument("--config", help="YAML whose gkd: and evaluate: sections configure the healing and the measurement")
    p.add_argument("--gkd-steps", type=int, help="GKD steps (default: the config's, else 50; 0 = no GKD)")
    p.add_argument("--no-measure", action="store_true", help="skip the speed measurement")


def run_cli(args: argparse.Namespace) -> int:
    from megapuzzle.stages.evaluate.evaluate import EvaluateConfig
    from megapuzzle.stages.gkd.gkd import GKDConfig

    cfg = load_config(args.config) if args.config else {}
    g = section(cfg, "gkd", GKDConfig)
    if args.gkd_steps:
        g = dataclasses.replace(g, steps=args.gkd_steps, tokens=None)
    elif g.steps is None and g.tokens is None:
        g = dataclasses.replace(g, steps=50)
    fuse(args.child, args.out, runs=_parse_runs(args.runs), leading_attention=not args.no_leading_attention,
         max_run=args.max_run, data=args.data, gkd_cfg=g, heal=args.gkd_steps != 0, eval_cfg=section(cfg, "evaluate", EvaluateConfig),
         measure=not args.no_measure)
    return 0
