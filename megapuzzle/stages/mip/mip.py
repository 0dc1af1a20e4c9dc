"""`megapuzzle mip`: the library's scores and measured costs -> the best child architectures.

    megapuzzle mip --config examples/cpu_demo.yaml --run-dir runs/demo      # -> runs/demo/mip/solutions.json

Candidates at layer l are the (attention, FFN) pairs the block library holds for l. A pair's
score is the sum of its two replace-1-block scores (decoupled BLD: the paper's additive
estimate); its costs come from costs.json for the deployment scenario: one prefill of
`prefill_len` tokens then `gen_len - 1` decode steps at batch b (the same scenario
`megapuzzle evaluate` measures). Constraints, each optional:

    throughput   b * gen_len / generation_time(b) >= target   (target = throughput_x x parent's)
    latency      generation_time(b) <= latency_s
    memory       param bytes + b * (prefill_len + gen_len) * KV bytes/token <= memory_gb
    params       parameter count <= max_params

Everything outside the layers (embeddings, head, per-layer framework overhead) is a constant
moved into the budgets. Several batch sizes are solved and the best objective kept; diversity
cuts give `num_solutions` distinct candidates; `sweep_points` traces the quality/throughput
frontier (mip/pareto.json).
"""

from __future__ import annotations

import logging
import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megapuzzle.config.mip import MIPConfig, METRICS  # noqa: F401 (the stage's config)
from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch
from megapuzzle.config import RunDir, load_config, section, section_dict
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json

log = logging.getLogger(__name__).info



# ----------------------------------------------------------------------------- inputs

def load_scores(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `megapuzzle score --run-dir {path.parent}` first")
    return json.loads(path.read_text())


def block_score(scores: dict[str, Any], key: str, metric: str) -> float:
    """Quality loss of one library block (0 for the parent's own block, by construction)."""
    try:
        b = scores["blocks"][key]
    except KeyError:
        raise UserError(f"scores.json has no score for library block {key}; re-run `megapuzzle score`") from None
    if metric == "kl":
        return max(0.0, float(b["kl"]))
    if metric == "lm_loss":
        return float(b["lm_loss"]) - float(scores["parent"]["lm_loss"])
    return 1.0 - float(b["top1"])


@dataclass
class Candidates:
    """Per-layer candidate (attention, FFN) pairs with their block keys and scores."""

    layers: list[list[LayerArch]]
    scores: list[list[float]]


def library_candidates(parent: Architecture, library, scores: dict[str, Any], metric: str) -> Candidates:
    """Every (attention, FFN) pair the library holds per layer; coupled blocks win over decoupled sums."""
    from megapuzzle.library import attention_key, ffn_key, layer_key

    entries = library.entries()
    cand_layers, cand_scores = [], []
    for l in range(parent.num_layers):
        attn = sorted({e["attention"] for e in entries.values() if e["layer"] == l and e["kind"] == "attention"})
        ffn = sorted({e["ffn"] for e in entries.values() if e["layer"] == l and e["kind"] == "ffn"})
        if not attn or not ffn:
            raise UserError(f"the library has no attention or FFN blocks for layer {l}; run `megapuzzle bld` first")
        pairs, sc = [], []
        for a in attn:
            for f in ffn:
                la = LayerArch(AttentionVariant.from_name(a), FFNVariant.from_name(f))
                coupled = layer_key(l, la)
                if coupled in entries and coupled in scores.get("blocks", {}):
                    s = block_score(scores, coupled, metric)
                else:
                    s = block_score(scores, attention_key(l, a), metric) + block_score(scores, ffn_key(l, f), metric)
                pairs.append(la)
                sc.append(s)
        cand_layers.append(pairs)
        cand_scores.append(sc)
    return Candidates(cand_layers, cand_scores)


# ----------------------------------------------------------------------------- costs

class ScenarioCosts:
    """Per-variant generation time and memory for the deployment scenario, from costs.json."""

    def __init__(self, costs: dict[str, Any], parent: Architecture, cfg: MIPConfig):
        self.costs, self.parent, self.cfg = costs, parent, cfg
        self.source = None if cfg.cost_source == "measured" else cfg.cost_source
        self._cache: dict[tuple, float] = {}
        dtype_bytes = int(costs.get("settings", {}).get("bytes_per_param", 0) or 0)
        self.bytes_per_param = dtype_bytes or _dtype_bytes(costs)

    def _gen(self, fn, b: int) -> float:
        P, G = self.cfg.prefill_len, self.cfg.gen_len
        return fn("prefill", b, P) + sum(fn("decode", b, P + t) for t in range(G - 1))

    def variant_time(self, v, b: int) -> float:
        from megapuzzle.costs.table import variant_cost

        key = (v, b)
        if key not in self._cache:
            self._cache[key] = self._gen(lambda ph, bb, s: variant_cost(self.costs, v, ph, bb, s, source=self.source), b)
        return self._cache[key]

    def fixed_time(self, b: int, num_layers: int) -> float:
        from megapuzzle.costs.table import fixed_runtime

        return self._gen(lambda ph, bb, s: fixed_runtime(self.costs, num_layers, ph, bb, s, source=self.source), b)

    def generation_time(self, arch: Architecture, b: int) -> float:
        return self.fixed_time(b, arch.num_layers) + sum(
            self.variant_time(l.attention, b) + self.variant_time(l.ffn, b) for l in arch.layers)

    def tokens_per_s(self, arch: Architecture, b: int) -> float:
        return b * self.cfg.gen_len / self.generation_time(arch, b)

    def kv_tokens(self, b: int) -> int:
        return b * (self.cfg.prefill_len + self.cfg.gen_len)

    def memory_bytes(self, arch: Architecture, b: int) -> float:
        return arch.num_params() * self.bytes_per_param + self.kv_tokens(b) * arch.kv_cache_bytes_per_token(
            self.bytes_per_param)


def _dtype_bytes(costs: dict[str, Any]) -> int:
    name = str(costs.get("settings", {}).get("dtype", costs.get("dtype", "bf16")))
    return {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}.get(name, 2)


# ----------------------------------------------------------------------------- problem

def build_problem(parent: Architecture, cands: Candidates, sc: ScenarioCosts, cfg: MIPConfig, b: int,
                  target_tps: float | None):
    from megapuzzle.mip import MIPProblem

    L = parent.num_layers
    runtime, memory, params = [], [], []
    for pairs in cands.layers:
        runtime.append([sc.variant_time(p.attention, b) + sc.variant_time(p.ffn, b) for p in pairs])
        memory.append([(parent.attention_params(p.attention) + parent.ffn_params(p.ffn)) * sc.bytes_per_param
                       + sc.kv_tokens(b) * parent.with_layers([p]).kv_cache_bytes_per_token(sc.bytes_per_param)
                       for p in pairs])
        params.append([parent.attention_params(p.attention) + parent.ffn_params(p.ffn) for p in pairs])
    fixed_params = parent.num_params() - sum(parent.layer_params(i) for i in range(L))
    budgets: dict[str, float] = {}
    fixed_t = sc.fixed_time(b, L)
    limits = []
    if target_tps:
        limits.append(b * cfg.gen_len / target_tps)
    if cfg.latency_s:
        limits.append(cfg.latency_s)
    if limits:
        budgets["runtime_s"] = min(limits) - fixed_t
    if cfg.memory_gb:
        budgets["memory_bytes"] = cfg.memory_gb * 2**30 - fixed_params * sc.bytes_per_param
    if cfg.max_params:
        budgets["params"] = cfg.max_params - fixed_params
    names = [[p.name for p in pairs] for pairs in cands.layers]
    return MIPProblem(scores=cands.scores, costs={"runtime_s": runtime, "memory_bytes": memory, "params": params},
                      budgets=budgets, candidate_names=names, name=f"batch {b}")


def unreachable_throughput(parent: Architecture, cands: Candidates, sc: ScenarioCosts, cfg: MIPConfig,
                           parent_tps: dict[int, float], target) -> str | None:
    """The error for a throughput target no child of this library reaches, in the user's terms:
    the fastest speedup there is (every layer at its cheapest candidate) per batch size, and the
    knob that widens it. None when some batch size could reach the target (another budget binds)."""
    fastest = {}
    for b in parent_tps:
        layer_min = sum(min(sc.variant_time(p.attention, b) + sc.variant_time(p.ffn, b) for p in pairs)
                        for pairs in cands.layers)
        fastest[b] = b * cfg.gen_len / (sc.fixed_time(b, parent.num_layers) + layer_min)
    if any(fastest[b] >= target(b) for b in fastest):
        return None
    best = max(fastest, key=lambda b: fastest[b] / parent_tps[b])
    x = fastest[best] / parent_tps[best]
    asked = f"mip.throughput {cfg.throughput:g} tokens/s" if cfg.throughput else f"mip.throughput_x {cfg.throughput_x:g}"
    widen = [f"search_space.{k}: true" for k, present in (
        ("attention_no_op", any(p.attention.identity for pairs in cands.layers for p in pairs)),
        ("ffn_no_op", any(p.ffn.identity for pairs in cands.layers for p in pairs)))
        if not present]
    how = (f"widen the search space ({', '.join(widen)}, then re-run bld and score)" if widen else
           "the embedding and LM head bound it once every layer is at its cheapest, so try larger mip.batch_sizes "
           "or a longer mip.gen_len")
    return (f"{asked} is unreachable: the fastest child of this search space runs {x:.2f}x the parent "
            f"({fastest[best]:.1f} tokens/s at batch {best}, prefill {cfg.prefill_len} + gen {cfg.gen_len}); "
            f"ask for at most {x:.2f}x, or {how}")


def solution_record(parent: Architecture, cands: Candidates, sol, sc: ScenarioCosts, b: int,
                    parent_tps: dict[int, float]) -> dict[str, Any]:
    layers = [cands.layers[l][v] for l, v in enumerate(sol.choice)]
    child = parent.with_layers(layers)
    tps = sc.tokens_per_s(child, b)
    return {
        "layers": [{"attention": la.attention.name, "ffn": la.ffn.name} for la in layers],
        "objective": sol.objective, "batch_size": b,
        "predicted_tokens_per_s": tps, "predicted_speedup": tps / parent_tps[b],
        "params": child.num_params(), "memory_bytes": sc.memory_bytes(child, b),
        "kv_bytes_per_token": child.kv_cache_bytes_per_token(sc.bytes_per_param),
        "solver": sol.solver, "reason": sol.reason, "status": sol.status, "gap": sol.gap,
        "solve_time_s": sol.solve_time_s, "num_vars": sol.num_vars, "num_constraints": sol.num_constraints,
    }


def run_mip(run_dir: str | Path, cfg: MIPConfig, *, fusion_max_run: int = 1) -> dict[str, Any]:
    from megapuzzle.checkpoints.canonical import load_arch, require_parent
    from megapuzzle.costs.table import load_costs
    from megapuzzle.library import BlockLibrary
    from megapuzzle.mip import InfeasibleBudgetError, MIPError, pareto_sweep, solve_diverse, solve_over_batches

    run = RunDir(run_dir)
    parent = load_arch(require_parent(run))
    costs = load_costs(run.costs)
    scores = load_scores(run.scores)
    cands = library_candidates(parent, BlockLibrary(run.library), scores, cfg.metric)
    sc = ScenarioCosts(costs, parent, cfg)
    batches = [int(b) for b in cfg.batch_sizes]
    parent_tps = {b: sc.tokens_per_s(parent, b) for b in batches}

    def target(b: int) -> float | None:
        return cfg.throughput or (cfg.throughput_x * parent_tps[b] if cfg.throughput_x else None)

    log(f"[mip] {parent.num_layers} layers x {len(cands.layers[0])} candidates; parent predicted "
        + ", ".join(f"{parent_tps[b]:.1f}" for b in batches) + f" tokens/s at batch {batches}; target "
        + (f"{cfg.throughput:.1f} tokens/s" if cfg.throughput else f"{cfg.throughput_x}x the parent" if cfg.throughput_x
           else "none") + f" (scenario prefill {cfg.prefill_len} + gen {cfg.gen_len}, costs: {cfg.cost_source})")
    if fusion_max_run > 1:  # candidates covering runs of layers (FFN Fusion): the tiling MIP
        from megapuzzle.stages.mip.runs import run_mip_with_runs

        out = run_mip_with_runs(run, parent, cands, sc, cfg, batches, parent_tps, target, build_problem,
                                fusion_max_run)
        out["config"] = section_dict(cfg)
        run.mip.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.mip / "solutions.json", out)
        return out
    t0 = time.perf_counter()
    try:
        result = solve_over_batches(lambda b: build_problem(parent, cands, sc, cfg, b, target(b)), batches,
                                    solver=cfg.solver, time_limit=cfg.time_limit_s,
                                    throughput=lambda b, s: b * cfg.gen_len / (s.totals["runtime_s"] + sc.fixed_time(b, parent.num_layers)))
        b = result.best_batch_size
        problem = build_problem(parent, cands, sc, cfg, b, target(b))
        sols = solve_diverse(problem, cfg.num_solutions, cfg.alpha, solver=cfg.solver, time_limit=cfg.time_limit_s)
    except InfeasibleBudgetError as e:
        if cfg.throughput or cfg.throughput_x:
            reach = unreachable_throughput(parent, cands, sc, cfg, parent_tps, target)
            if reach:
                raise UserError(reach) from None
        raise UserError(f"{e}") from None
    except MIPError as e:
        raise UserError(str(e)) from None
    records = [solution_record(parent, cands, s, sc, b, parent_tps) for s in sols]
    out: dict[str, Any] = {
        "config": section_dict(cfg), "target_tokens_per_s": target(b),
        "parent_predicted_tokens_per_s": {str(k): v for k, v in sorted(parent_tps.items())},
        "best_batch_size": b, "batch_table": result.format_table(), "solutions": records,
        "wall_s": time.perf_counter() - t0,
    }
    if cfg.sweep_points:
        xs = np.linspace(1.0, cfg.sweep_max_x, cfg.sweep_points)
        fixed = sc.fixed_time(b, parent.num_layers)
        budgets = [b * cfg.gen_len / (x * parent_tps[b]) - fixed for x in xs]
        sweep = pareto_sweep(build_problem(parent, cands, sc, cfg, b, None), "runtime_s", budgets,
                             solver=cfg.solver, time_limit=cfg.time_limit_s)
        out["pareto"] = [
            {"target_speedup": float(x), "feasible": s.feasible, "objective": s.objective if s.feasible else None,
             **({"predicted_speedup": solution_record(parent, cands, s, sc, b, parent_tps)["predicted_speedup"],
                 "layers": solution_record(parent, cands, s, sc, b, parent_tps)["layers"]} if s.feasible else {})}
            for x, s in zip(xs, sweep)]
    run.mip.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.mip / "solutions.json", out)
    best = records[0]
    log(f"[mip] {result.best.solver}: {best['status']} objective {best['objective']:.5f} at batch {b}; predicted "
        f"{best['predicted_tokens_per_s']:.1f} tokens/s = {best['predicted_speedup']:.2f}x the parent; "
        f"{len(records)} solution(s) -> {run.mip / 'solutions.json'} ({result.best.reason})")
    log(result.format_table())
    return out


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="run directory (parent/, library/, scores.json, costs.json)")
    p.add_argument("--config", help="YAML with a mip: section (defaults otherwise)")
    p.add_argument("--solver", choices=("auto", "highs", "gurobi"), help="override mip.solver")
    p.add_argument("--throughput-x", type=float, help="override mip.throughput_x")


def run_cli(args: argparse.Namespace) -> int:
    import dataclasses

    cfg = section(load_config(args.config) if args.config else {}, "mip", MIPConfig)
    over = {k: v for k, v in (("solver", args.solver), ("throughput_x", args.throughput_x)) if v is not None}
    if over:
        cfg = dataclasses.replace(cfg, **over)
    run_mip(args.run_dir, cfg)
    return 0
