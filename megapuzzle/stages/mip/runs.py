"""The mip stage with fused-run candidates (search_space.fusion_max_run > 1).

Single-layer candidates are exactly the stage's usual ones (build_problem); a run candidate over
layers [i, j] is one attention variant at i (from the library, as for layer i) + the fused FFN of
RUN/library_runs (trained across the run, megapuzzle.stages.fusion_runs) + no-op / no-op layers:

    score   = replace-the-run score of the fused FFN (with the parent's attention at i)
              + the attention variant's replace-1-block score at i (0 for the parent's own)
    runtime = attention variant + FFN of the summed width (costs.json measures those widths when
              fusion_max_run > 1; the emptied layers stay in the model and are in the fixed part)
    memory / params like any layer.

The tiling MIP (megapuzzle.mip.runs) is solved per batch size; the best objective wins (ties: the
higher throughput). One solution (no diversity cuts or sweep over runs yet).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch
from megapuzzle.errors import UserError

log = logging.getLogger(__name__).info


def run_candidates(parent: Architecture, cands, sc, b: int, index: dict, metric: str, max_run: int):
    from megapuzzle.stages.fusion_runs import run_score_value

    from megapuzzle.mip.runs import RunCandidate

    out = []
    bpp = sc.bytes_per_param
    for key, e in sorted(index["blocks"].items()):
        i, j = int(e["first"]), int(e["last"])
        if j - i + 1 > max_run:
            continue
        ffn = FFNVariant.from_name(e["ffn"])
        base = run_score_value(e, metric)
        own = parent.layers[i].attention
        for la, s in zip(cands.layers[i], cands.scores[i]):
            if la.ffn != parent.layers[i].ffn:
                continue  # one (attention, parent FFN) pair per attention variant: its score is the attention's
            a = la.attention
            attn_score = 0.0 if a == own else s
            p = parent.attention_params(a) + parent.ffn_params(ffn)
            kv = sc.kv_tokens(b) * parent.with_layers([LayerArch(a, ffn)]).kv_cache_bytes_per_token(bpp)
            out.append(RunCandidate(i, j, base + attn_score,
                                    {"runtime_s": sc.variant_time(a, b) + sc.variant_time(ffn, b),
                                     "memory_bytes": p * bpp + kv, "params": float(p)},
                                    f"{a.name}+{ffn.name}@{i}-{j}"))
    return out


def expand(parent: Architecture, problem, sol) -> tuple[list[LayerArch], list[tuple[int, int]]]:
    """Per-layer architecture and runs of a tiling solution."""
    layers: list[LayerArch] = []
    runs = []
    for c in sol.choice:
        cand = problem.candidates[c]
        a_name, rest = cand.name.split("+", 1)
        f_name = rest.split("@", 1)[0]
        layers.append(LayerArch(AttentionVariant.from_name(a_name), FFNVariant.from_name(f_name)))
        if cand.last > cand.first:
            runs.append((cand.first, cand.last))
            layers += [LayerArch(AttentionVariant("no_op"), FFNVariant("no_op"))] * (cand.last - cand.first)
    return layers, runs


def run_mip_with_runs(run, parent: Architecture, cands, sc, cfg, batches, parent_tps, target, build_problem,
                      max_run: int) -> dict[str, Any]:
    from megapuzzle.stages.fusion_runs import load_run_index

    from megapuzzle.mip.problem import InfeasibleBudgetError, MIPError
    from megapuzzle.mip.runs import RunProblem, solve_runs

    index = load_run_index(run.root)
    if not index["blocks"]:
        raise UserError(f"search_space.fusion_max_run {max_run}: {run.root}/library_runs holds no run blocks; "
                        f"re-run bld and score (megapuzzle run trains them when fusion_max_run > 1)")
    t0 = time.perf_counter()
    best = None
    table = []
    for b in batches:
        lp = build_problem(parent, cands, sc, cfg, b, target(b))
        rp = RunProblem.from_layer_problem(lp, run_candidates(parent, cands, sc, b, index, cfg.metric, max_run))
        try:
            sol = solve_runs(rp, cfg.solver, cfg.time_limit_s)
        except InfeasibleBudgetError as e:
            table.append(f"| {b} | infeasible | - | - |")
            log(f"[mip] batch {b}: {e}")
            continue
        except MIPError as e:
            raise UserError(str(e)) from None
        layers, runs = expand(parent, rp, sol)
        child = parent.with_layers(layers)
        tps = sc.tokens_per_s(child, b)
        table.append(f"| {b} | {sol.status} | {sol.objective:.6g} | {tps:.6g} |")
        if best is None or sol.objective < best[1].objective - 1e-12 or (
                abs(sol.objective - best[1].objective) <= 1e-12 and tps > best[4]):
            best = (b, sol, layers, runs, tps, rp)
    if best is None:
        raise UserError("infeasible at every batch size (with fused-run candidates); relax the budgets")
    b, sol, layers, runs, tps, rp = best
    child = parent.with_layers(layers)
    rec = {"layers": [{"attention": la.attention.name, "ffn": la.ffn.name} for la in layers],
           "runs": [list(r) for r in runs], "objective": sol.objective, "batch_size": b,
           "predicted_tokens_per_s": tps, "predicted_speedup": tps / parent_tps[b], "params": child.num_params(),
           "memory_bytes": sc.memory_bytes(child, b), "kv_bytes_per_token": child.kv_cache_bytes_per_token(sc.bytes_per_param),
           "solver": sol.solver, "reason": sol.reason, "status": sol.status, "gap": 0.0,
           "solve_time_s": sol.solve_time_s, "num_vars": sol.num_vars, "num_constraints": rp.num_layers + len(rp.constrained)}
    if cfg.num_solutions > 1 or cfg.sweep_points:
        log("[mip] with fused-run candidates only the best solution is solved (no diversity cuts or sweep yet)")
    log(f"[mip] {sol.solver} (tiling MIP, fusion_max_run {max_run}, {len(index['blocks'])} run blocks): objective "
        f"{sol.objective:.5f} at batch {b}; runs {runs or 'none'}; predicted {tps:.1f} tokens/s = "
        f"{rec['predicted_speedup']:.2f}x the parent")
    return {"target_tokens_per_s": target(b), "parent_predicted_tokens_per_s": {str(k): v for k, v in sorted(parent_tps.items())},
            "best_batch_size": b, "fusion_max_run": max_run,
            "batch_table": "\n".join(["| batch | status | objective | tokens/s |", "|---:|---|---:|---:|"] + table),
            "solutions": [rec], "wall_s": time.perf_counter() - t0}


def require_fusion_inputs(base, cfg: dict) -> int:
    """search_space.fusion_max_run of the config (>= 2), checked against the base run's run blocks:
    RUN/library_runs with scored blocks and costs.json with the fused widths (tools/add_fusion_inputs.py
    or `megapuzzle run` with fusion_max_run > 1 adds them)."""
    from megapuzzle.arch import SearchSpace
    from megapuzzle.costs.table import load_costs
    from megapuzzle.errors import UserError
    from megapuzzle.stages.fusion_runs import load_run_index

    max_run = SearchSpace.from_dict(cfg.get("search_space")).fusion_max_run
    if max_run < 2:
        raise UserError("puzzle_fusion needs search_space.fusion_max_run >= 2 in the config")
    fix = (f"run tools/add_fusion_inputs.py CONFIG {base.root} (or `megapuzzle run` with fusion_max_run "
           f"{max_run}) first")
    blocks = load_run_index(base.root)["blocks"]
    if not blocks:
        raise UserError(f"puzzle_fusion: {base.root} has no run blocks (library_runs/); {fix}")
    unscored = [k for k, e in blocks.items() if "kl" not in e]
    if unscored:
        raise UserError(f"puzzle_fusion: run blocks {unscored} of {base.root} have no scores; {fix}")
    have = set(load_costs(base.costs)["variants"])
    missing = sorted({e["ffn"] for e in blocks.values()} - {n.split(".", 1)[1] for n in have if n.startswith("ffn.")})
    if missing:
        raise UserError(f"puzzle_fusion: {base.costs} has no timing of the fused width(s) {missing}; {fix}")
    return max_run
