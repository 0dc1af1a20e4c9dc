"""Cost-stage benchmark: per-variant costs on this machine, and how well their sums predict whole models.

    python benchmarks/bench_cost.py [CHECKPOINT] [--threads 2] [--clock wall|cpu] [--passes 3] [--repeats 5]
                                    [--out-dir DIR]

Default architecture: the embedded parent's shape (vocab 4096, hidden 384, 8 heads of 48,
4 KV heads, FFN 1536, 6 layers); a megapuzzle checkpoint path measures its shape instead.
Steps: `measure_costs` (the `megapuzzle measure` stage, default search space) -> the per-variant
table -> for the parent and three heterogeneous children, predicted (sum of parts) vs measured
whole-model runtime at every grid point and phase -> end-to-end generation throughput
(`measure_model_throughput`) vs `predict_generation_time`, as speedups over the parent.
Timings are medians over repeats; on a 2-core box shared with other jobs, `--threads 1 --clock
cpu` gives stable numbers, `--threads 2` wall-clock ones swing with the load: re-run when noisy
(measurements are cached in OUT_DIR/state.json; --force re-measures; OUT_DIR/cost.md is the report).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")

from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as F, LayerArch, round_up  # noqa: E402
from megapuzzle.stages.measure.measure import (MeasureConfig, format_check, format_costs, measure_costs,  # noqa: E402
                             predict_generation_time, predict_runtime)
from megapuzzle.fileio import atomic_write_text  # noqa: E402


def embedded_parent() -> Architecture:
    return Architecture.homogeneous(vocab_size=4096, hidden_size=384, num_layers=6, num_attention_heads=8,
                                    num_kv_heads=4, intermediate_size=1536, max_position_embeddings=2048)


def children(parent: Architecture) -> dict[str, Architecture]:
    """Three heterogeneous children built only from the default search space's variants."""
    L = len(parent.layers)
    own = parent.layers[0]
    inter = own.ffn.intermediate_size
    small_ffn = F("mlp", round_up(int(0.25 * inter), 256))  # the default search space's 25 % size
    half = [LayerArch(A("gqa", 1), small_ffn) if i % 2 else own for i in range(L)]
    noop = [LayerArch(A("no_op"), own.ffn) if i == L // 2 else own for i in range(L)]
    mixed = []
    for i in range(L):
        mixed.append([own, LayerArch(A("gqa", 2), F("mlp", round_up(int(0.5 * inter), 256))),
                      LayerArch(A("linear"), F("linear")), LayerArch(A("gqa", 1), F("no_op"))][i % 4])
    return {f"half kv1+{small_ffn.name}": parent.with_layers(half), "one no_op attention": parent.with_layers(noop),
            "mixed (kv2/mlp half, linear, no_op ffn)": parent.with_layers(mixed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="megapuzzle checkpoint to take the shape from")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--passes", type=int, default=3, help="measurement passes pooled (spreads drift evenly)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (with --threads 1, immune to other jobs on a shared box)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--gen-batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--out-dir", default=None, help="keeps state.json (resumable) and the report")
    ap.add_argument("--force", action="store_true", help="re-measure the per-variant costs")
    args = ap.parse_args()

    if args.checkpoint:
        from megapuzzle.checkpoints.canonical import load_arch
        parent = load_arch(args.checkpoint)
    else:
        parent = embedded_parent()
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_cost_")
    os.makedirs(out_dir, exist_ok=True)
    state = os.path.join(out_dir, "state.json")
    if args.force and os.path.exists(state):
        os.unlink(state)
    cfg = MeasureConfig(batch_sizes=tuple(args.batch_sizes), seq_lens=tuple(args.seq_lens), threads=args.threads,
                        repeats=args.repeats, passes=args.passes, clock=args.clock, roofline_gpus=("h100",))
    t0 = time.perf_counter()
    costs = measure_costs(parent, cfg, state_path=state)
    lines = [f"# cost benchmark: {costs['device']}, {costs['threads']} threads, {costs['clock']} clock, "
             f"{costs['dtype']}, "
             f"runtime: {costs['runtime']}", "",
             f"per-variant costs (ms, medians; measured in {time.perf_counter() - t0:.0f} s)", "",
             format_costs(costs), "", "parent check stored in costs.json:", "", format_check(costs), ""]
    print("\n".join(lines), flush=True)

    from megapuzzle.costs.timing import GPTRunner, measure_model_throughput, resolve_dtype, time_model

    archs = {"parent": parent} | children(parent)
    rows = ["| arch | phase | b | s | predicted ms | measured ms | rel. error |", "|---|---|---:|---:|---:|---:|---:|"]
    errs: dict[str, list[float]] = {}
    for name, arch in archs.items():
        runner = GPTRunner(arch, dtype=resolve_dtype(cfg.dtype))
        for ph in cfg.phases:
            for b in cfg.batch_sizes:
                for s in cfg.seq_lens:
                    m = time_model(arch, ph, b, s, repeats=cfg.repeats * cfg.passes, warmup=cfg.warmup,
                                   min_sample_s=cfg.min_sample_s, runner=runner, clock=cfg.clock)["median"]
                    p = predict_runtime(costs, arch, b, s, ph)
                    errs.setdefault(name, []).append((p - m) / m)
                    rows.append(f"| {name} | {ph} | {b} | {s} | {1e3 * p:.2f} | {1e3 * m:.2f} | "
                                f"{100 * (p - m) / m:+.1f}% |")
        del runner
    summary = ["| arch | mean abs error | max abs error |", "|---|---:|---:|"]
    for name, e in errs.items():
        summary.append(f"| {name} | {100 * statistics.mean(map(abs, e)):.1f}% | {100 * max(map(abs, e)):.1f}% |")
    lines2 = ["whole-model runtime, predicted (sum of subblock costs) vs measured:", "", *rows, "", *summary, ""]
    print("\n".join(lines2), flush=True)

    gb, pl, gl = args.gen_batch, args.prefill_len, args.gen_len
    thr = ["| arch | predicted tok/s | measured tok/s | error | predicted speedup | measured speedup |",
           "|---|---:|---:|---:|---:|---:|"]
    base_p = base_m = None
    for name, arch in archs.items():
        m = measure_model_throughput(arch, "random", gb, pl, gl, repeats=3, threads=args.threads, clock=cfg.clock)
        p = predict_generation_time(costs, arch, gb, pl, gl)["tokens_per_s"]
        if base_p is None:
            base_p, base_m = p, m.tokens_per_s
        thr.append(f"| {name} | {p:.1f} | {m.tokens_per_s:.1f} | {100 * (p - m.tokens_per_s) / m.tokens_per_s:+.1f}% "
                   f"| {p / base_p:.3f} | {m.tokens_per_s / base_m:.3f} |")
    lines3 = [f"generation throughput (batch {gb}, prompt {pl}, {gl} new tokens):", "", *thr, ""]
    print("\n".join(lines3), flush=True)
    atomic_write_text(os.path.join(out_dir, "cost.md"), "\n".join(lines + lines2 + lines3) + "\n")
    print(f"report: {os.path.join(out_dir, 'cost.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
