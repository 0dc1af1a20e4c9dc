"""MIP core benchmark on a Llama-3.1-405B-sized synthetic library (not a unit test).

    python benchmarks/bench_mip.py [--repeats 3] [--points 50] [--out benchmarks/results/mip.md]

126 layers x (6 attention x 9 FFN) coupled variants = 54 candidates per layer, three budget
rows (runtime, memory, params). Costs follow the 405B shapes (hidden 16384, 128 heads of
128, 8 KV heads, FFN 53248) at FP8 with batch x seq KV cache; runtime is a bandwidth +
FLOP roofline per block with per-layer jitter and 5 % noise; scores grow as blocks shrink,
with U-shaped layer importance and 15 % noise. Prints a markdown table and writes it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megapuzzle.mip import (InfeasibleBudgetError, MIPProblem, SolverLicenceError, gurobi_licence,  # noqa: E402
                            pareto_sweep, solve, solve_diverse, solve_over_batches)

HIDDEN, HEADS, HEAD_DIM, KV_HEADS, FFN = 16384, 128, 128, 8, 53248
# (name, kv heads | "linear" | "noop", score factor relative to removing the block)
ATTN = [("kv8", 8, 0.0), ("kv4", 4, 0.06), ("kv2", 2, 0.14), ("kv1", 1, 0.28), ("linear", "linear", 0.65),
        ("noop", "noop", 1.0)]
FFN_V = [("ffn100", 1.0, 0.0), ("ffn87", 0.87, 0.05), ("ffn75", 0.75, 0.11), ("ffn50", 0.5, 0.27),
         ("ffn25", 0.25, 0.5), ("ffn20", 0.2, 0.57), ("ffn10", 0.1, 0.72), ("linear", "linear", 0.8),
         ("noop", "noop", 1.0)]
BW, PEAK, LAUNCH = 3.35e12, 1.98e15, 4e-6  # H100 HBM bytes/s, FP8 FLOP/s, per-kernel overhead


def library(num_layers: int = 126, batch: int = 32, seq: int = 4096, seed: int = 0,
            runtime_frac: float = 1 / 2.17, memory_frac: float = 0.6, params_frac: float = 0.7) -> MIPProblem:
    """Synthetic coupled (attention, FFN) library; budgets are fractions of the parent's totals."""
    rng = np.random.default_rng(seed)
    tokens = batch * seq
    pos = np.linspace(-1, 1, num_layers)
    importance = (0.3 + 1.2 * pos ** 4) * rng.lognormal(0, 0.3, num_layers)  # U-shaped
    attn_base, ffn_base = 0.02 * importance, 0.03 * importance * rng.lognormal(0, 0.2, num_layers)
    jitter = rng.lognormal(0, 0.03, num_layers)  # per-layer runtime differences (placement, clocks)
    scores, runtime, memory, params, names = [], [], [], [], []
    for l in range(num_layers):
        s_l, r_l, m_l, p_l, n_l = [], [], [], [], []
        for an, akv, af in ATTN:
            if akv == "noop":
                ap, akvb, aflop, ak = 0, 0, 0, 0
            elif akv == "linear":
                ap, akvb, aflop, ak = HIDDEN * HIDDEN, 0, 2 * HIDDEN * HIDDEN * batch, 1
            else:
                ap = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * akv * HEAD_DIM
                akvb = tokens * 2 * akv * HEAD_DIM  # FP8 KV cache for the whole batch
                aflop, ak = 2 * ap * batch + 4 * tokens * HEADS * HEAD_DIM, 4
            for fn, ff, fs in FFN_V:
                if ff == "noop":
                    fp, fk = 0, 0
                elif ff == "linear":
                    fp, fk = HIDDEN * HIDDEN, 1
                else:
                    fp, fk = 3 * HIDDEN * int(round(ff * FFN / 256) * 256), 3
                flops = aflop + 2 * fp * batch
                rt = (ap + fp + akvb) / BW + flops / PEAK + (ak + fk) * LAUNCH
                r_l.append(rt * jitter[l] * rng.lognormal(0, 0.05))
                m_l.append(float(ap + fp + akvb))
                p_l.append(float(ap + fp))
                sc = (attn_base[l] * af + ffn_base[l] * fs) * rng.lognormal(0, 0.15)
                s_l.append(0.0 if (af == 0 and fs == 0) else sc)  # the parent block scores 0
                n_l.append(f"{an}+{fn}")
        scores.append(s_l), runtime.append(r_l), memory.append(m_l), params.append(p_l), names.append(n_l)
    costs = {"runtime_s": runtime, "memory_bytes": memory, "params": params}
    parent = {r: sum(c[l][0] for l in range(num_layers)) for r, c in costs.items()}  # v=0: kv8+ffn100
    budgets = {"runtime_s": runtime_frac * parent["runtime_s"], "memory_bytes": memory_frac * parent["memory_bytes"],
               "params": params_frac * parent["params"]}
    return MIPProblem(scores, costs, budgets, candidate_names=names, name=f"405B-like {num_layers}x54")


def timed(fn, repeats: int):
    """Median wall time of `repeats` calls (first call included: no hidden warm-up)."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def row(instance, sol, wall, vars_before, rows_before, note=""):
    return (f"| {instance} | {sol.solver} | {vars_before}/{rows_before} | {sol.num_vars}/{sol.num_constraints} | "
            f"{sol.solve_time_s:.3f} | {wall:.3f} | {sol.objective:.6f} | "
            f"{'yes' if sol.optimal else sol.status} (gap {sol.gap:.1e}) | {note} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--points", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mip.md"))
    args = ap.parse_args(argv)

    big, small = library(126), library(32, seed=1)
    lines = ["| instance | solver | vars/rows before | vars/rows after pruning | solver s | wall s (median) "
             "| objective | proven optimal | note |", "|---|---|---|---|---:|---:|---:|---|---|"]

    def before(p):
        return int(p.offsets[-1]), p.num_layers + len(p.constrained)

    for name, prob in (("126x54 (405B), 3 budgets", big), ("32x54 (reduced), 3 budgets", small)):
        for solver in ("highs", "gurobi"):
            try:
                sol, wall = timed(lambda: solve(prob, solver=solver), args.repeats)
                lines.append(row(name, sol, wall, *before(prob), sol.reason))
            except SolverLicenceError as e:
                lines.append(f"| {name} | gurobi | {before(prob)[0]}/{before(prob)[1]} | - | - | - | - | - | "
                             f"skipped: {str(e).split(';')[0]} |")
        sol, wall = timed(lambda: solve(prob, solver="highs", prune=False), args.repeats)
        lines.append(row(name + ", no pruning", sol, wall, *before(prob), "raw HiGHS for comparison"))
        auto = solve(prob)
        lines.append(row(name + ", --solver auto", auto, auto.solve_time_s + auto.build_time_s, *before(prob),
                         auto.reason))

    # Pareto sweep over the runtime budget: least achievable runtime (under the other budgets) .. parent.
    lo = solve(big.with_budgets({"runtime_s": 1.0}, replace_all=False)
               .__class__(big.costs["runtime_s"], big.costs, {k: v for k, v in big.budgets.items()
                                                              if k != "runtime_s"})).objective
    hi = sum(c[0] for c in big.costs["runtime_s"])
    grid = list(np.linspace(lo, hi, args.points))
    t = time.perf_counter()
    sweep = pareto_sweep(big, "runtime_s", grid, solver="highs")
    sweep_wall = time.perf_counter() - t
    per = [s.solve_time_s for s in sweep]
    n_opt = sum(s.optimal for s in sweep)
    sweep_line = (f"| 126x54 Pareto sweep, {args.points} runtime budgets | highs | - | {sweep[0].num_vars}/"
                  f"{sweep[0].num_constraints} | mean {statistics.mean(per):.3f}, max {max(per):.3f} | "
                  f"{sweep_wall:.2f} total | {sweep[0].objective:.4f} .. {sweep[-1].objective:.6f} | "
                  f"{n_opt}/{len(sweep)} | one model, row bound changed per point |")
    lines.append(sweep_line)

    t = time.perf_counter()
    div = solve_diverse(big, 5, 0.8, solver="highs")
    lines.append(f"| 126x54 diverse n=5, alpha=0.8 | highs | - | {div[0].num_vars}/{div[-1].num_constraints} | "
                 f"{sum(s.solve_time_s for s in div):.3f} | {time.perf_counter() - t:.3f} | "
                 f"{div[0].objective:.6f} .. {div[-1].objective:.6f} | {sum(s.optimal for s in div)}/{len(div)} | "
                 f"{len(div)} solutions, <= {int(0.8 * 126)} shared layers |")

    t = time.perf_counter()
    batches = solve_over_batches(lambda b: library(126, batch=b), [8, 16, 32, 64, 128], solver="highs")
    lines.append(f"| 126x54 batch loop 8..128 | highs | - | - | "
                 f"{sum(r.solution.solve_time_s for r in batches.table if r.solution):.3f} | "
                 f"{time.perf_counter() - t:.3f} | {batches.best.objective:.6f} | best batch "
                 f"{batches.best_batch_size} | 5 problems built + solved |")

    lic = gurobi_licence()
    header = [f"# MIP core benchmark ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()})", "",
              f"Gurobi licence: {lic.kind} ({lic.detail}). Times: median of {args.repeats} runs "
              "(first run included); 'solver s' is the solver call, 'wall s' adds pruning, matrix build and load.",
              ""]
    text = "\n".join(header + lines + ["", "Batch-size loop:", "", batches.format_table(), ""])
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"written {args.out}")
    try:  # show the infeasibility message once, on a budget nobody can meet
        solve(big.with_budgets({"runtime_s": 0.5 * lo}))
    except InfeasibleBudgetError as e:
        print("infeasible example:", e)


if __name__ == "__main__":
    main()
