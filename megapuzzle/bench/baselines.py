"""`megapuzzle baseline`: the compression baselines Puzzle must beat, at the same throughput target.

    megapuzzle run examples/cpu_demo.yaml --run-dir runs/cpu_demo --until mip      # parent, library, scores, costs
    megapuzzle baseline --config examples/cpu_demo.yaml --run-dir runs/cpu_demo --method uniform --throughput-x 2.0
    megapuzzle baseline ... --method depth|random|greedy [--seed 0] [--out CHILD_RUN] [--until select|gkd|evaluate]

Every method must meet exactly the budget the MIP meets: the `mip:` section's scenario (batch
sizes, prefill_len, gen_len), cost source and constraints, with `throughput_x` = --throughput-x.
Feasibility is decided by stages.mip.mip.build_problem's own budget rows (throughput, and latency /
memory / params when configured) on costs.json; a candidate counts as feasible when it meets
them at one of mip.batch_sizes (its best such batch size is recorded, as the MIP keeps its best).

* uniform: Minitron-style width pruning: the same (KV heads, FFN size) in every layer, the
  least-compressed setting that meets the target (most KV heads, then most parameters, then the
  lowest summed block score: FFN width is pruned before KV heads). Settings (--uniform-steps N, default 16): every KV-head count dividing the parent's,
  and every FFN width k*I/N, not just the library's grid (which capped it at 1.35x on cpu_demo);
  the widths costs.json did not measure are priced by linear interpolation in the width between
  measured ones (InterpolatedCosts); --uniform-steps 0 keeps the search space's grid. Weights:
  the INIT, not BLD: KV heads mean-pooled, FFN channels kept by contribution on the bld:
  section's calibration batches (megapuzzle.init, the very starting point BLD trains from).
* depth: ShortGPT: block influence BI_l = mean over held-out tokens (score: section's batches)
  of 1 - cos(residual entering layer l, residual leaving it); whole layers (no-op attention +
  no-op FFN) are dropped in increasing BI order until the target is met. The kept layers are
  the parent's own.
* random: per layer a uniformly random (attention, FFN) pair of the library's blocks, drawn by
  rejection sampling with --seed: the first draw that meets the budget with a predicted speedup
  within `--random-band` (5%) of the target wins, so it is compared at the same speed, not at
  whatever speed a random draw lands on; after --random-tries draws the tightest feasible draw
  seen is taken. Weights: the library's (BLD) blocks.
* greedy: Puzzle's library + scores, with mip.greedy instead of the MIP (from the parent, the
  replacement with the best score increase per cost saved, until the budget is met), at each
  batch size, the best objective kept. Weights: the library's blocks.

The child run directory (default RUN_baselines/<method>_x<X>) is a normal run directory, so
realize / gkd / evaluate run on it unchanged:

    parent/ data/ library/ scores.json costs.json   symlinks to RUN's (never written)
    mip/solutions.json     the chosen architecture as a one-solution MIP record (evaluate reads its scenario)
    baseline.json          how it was chosen (options tried, BI values, random draws, greedy moves)
    child/                 the child checkpoint;  gkd/  eval.json  report.md  pareto.png  as in any run
    manifest.json          stages select / gkd / evaluate; a re-run skips finished ones, and starts over
                           when the method, target, seed, config or RUN's files changed

`run_child` also builds the Puzzle child ("puzzle": run_mip at the target, then realize) the
same way, and "puzzle_fusion": run_mip with fused-run candidates (the config's
search_space.fusion_max_run >= 2; the base run needs library_runs/ with scored run blocks and
the fused widths in costs.json: tools/add_fusion_inputs.py adds them
to a finished run). `megapuzzle bench search-quality` (megapuzzle.bench.search_quality) uses it.
"""

from __future__ import annotations

import logging
import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch, SearchSpace, empty_layer
from megapuzzle.bench.baselines_uniform import InterpolatedCosts, interpolate_linear, uniform_grid  # noqa: F401
from megapuzzle.config import RunDir, load_config, section, section_dict
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json, sha256_file
from megapuzzle.stages.mip.runs import require_fusion_inputs

log = logging.getLogger(__name__).info

METHODS = ("uniform", "depth", "random", "greedy")
ALL_METHODS = ("puzzle", "puzzle_fusion") + METHODS
LINKS = ("parent", "data", "library", "scores.json", "costs.json")
FUSION_LINKS = ("library_runs",)  # puzzle_fusion: the run blocks (+ their scores in its index.json)
DROPPED = empty_layer()


# ----------------------------------------------------------------------------- the shared budget

@dataclass
class SearchContext:
    """Parent, library candidates and the MIP's budget rows at one throughput target."""

    run: RunDir
    parent: Architecture
    mcfg: Any            # MIPConfig with throughput_x = the target
    sc: Any              # stages.mip.mip.ScenarioCosts
    cands: Any           # stages.mip.mip.Candidates (every library pair per layer, with scores)
    parent_tps: dict[int, float]
    problems: dict[int, Any]  # batch size -> MIPProblem over the library candidates, budgets at the target
    parent_choice: list[int]

    @property
    def batches(self) -> list[int]:
        return list(self.problems)

    def target_tps(self, b: int) -> float:
        return self.mcfg.throughput_x * self.parent_tps[b]

    def assess(self, layers: list[LayerArch]) -> dict[int, tuple[bool, float]]:
        """Per batch size: (meets every budget row of the MIP, predicted speedup over the parent)."""
        from megapuzzle.stages.mip.mip import Candidates, build_problem

        L = self.parent.num_layers
        single = Candidates([[la] for la in layers], [[0.0] for _ in layers])
        arch = self.parent.with_layers(layers)
        out = {}
        for b in self.batches:
            p = build_problem(self.parent, single, self.sc, self.mcfg, b, self.target_tps(b))
            _, tot = p.evaluate((0,) * L)
            out[b] = (not p.violations(tot), self.sc.tokens_per_s(arch, b) / self.parent_tps[b])
        return out

    def best_batch(self, layers: list[LayerArch]) -> int | None:
        """The feasible batch size with the highest predicted tokens/s (the MIP's tie-break), else None."""
        ok = [b for b, (f, _) in self.assess(layers).items() if f]
        arch = self.parent.with_layers(layers)
        return max(ok, key=lambda b: self.sc.tokens_per_s(arch, b)) if ok else None

    def objective(self, layers: list[LayerArch]) -> float | None:
        """Summed block score (the MIP's objective), None when a pair is not in the library."""
        total = 0.0
        for l, la in enumerate(layers):
            if la not in self.cands.layers[l]:
                return None
            total += self.cands.scores[l][self.cands.layers[l].index(la)]
        return total

    def record(self, layers: list[LayerArch], method: str, reason: str) -> dict[str, Any]:
        """A mip/solutions.json solution entry (the fields evaluate and realize read)."""
        b = self.best_batch(layers)
        if b is None:
            raise UserError(f"{method}: the chosen architecture misses the {self.mcfg.throughput_x}x target")
        arch = self.parent.with_layers(layers)
        tps = self.sc.tokens_per_s(arch, b)
        return {"layers": [{"attention": la.attention.name, "ffn": la.ffn.name} for la in layers],
                "objective": self.objective(layers), "batch_size": b, "predicted_tokens_per_s": tps,
                "predicted_speedup": tps / self.parent_tps[b], "params": arch.num_params(),
                "memory_bytes": self.sc.memory_bytes(arch, b),
                "kv_bytes_per_token": arch.kv_cache_bytes_per_token(self.sc.bytes_per_param),
                "solver": method, "reason": reason, "status": "heuristic", "method": method}


def mip_config(cfg: dict, throughput_x: float):
    """The config's mip: section with throughput_x = the target (an absolute `throughput` dropped)."""
    from megapuzzle.stages.mip.mip import MIPConfig

    if not throughput_x or throughput_x <= 0:
        raise UserError(f"--throughput-x must be positive, got {throughput_x}")
    return dataclasses.replace(section(cfg, "mip", MIPConfig), throughput_x=float(throughput_x), throughput=None)


def load_context(run_dir: str | Path, cfg: dict, throughput_x: float) -> SearchContext:
    from megapuzzle.checkpoints.canonical import load_arch, require_parent
    from megapuzzle.costs.table import load_costs
    from megapuzzle.library import BlockLibrary
    from megapuzzle.stages.mip.mip import ScenarioCosts, build_problem, library_candidates, load_scores

    run = RunDir(run_dir)
    mcfg = mip_config(cfg, throughput_x)
    parent = load_arch(require_parent(run))
    cands = library_candidates(parent, BlockLibrary(run.library), load_scores(run.scores), mcfg.metric)
    sc = ScenarioCosts(load_costs(run.costs), parent, mcfg)
    batches = [int(b) for b in mcfg.batch_sizes]
    parent_tps = {b: sc.tokens_per_s(parent, b) for b in batches}
    problems = {b: build_problem(parent, cands, sc, mcfg, b, mcfg.throughput_x * parent_tps[b]) for b in batches}
    choice = []
    for l, pairs in enumerate(cands.layers):
        if parent.layers[l] not in pairs:
            raise UserError(f"the library lacks the parent's own blocks of layer {l}; re-run `megapuzzle bld`")
        choice.append(pairs.index(parent.layers[l]))
    return SearchContext(run, parent, mcfg, sc, cands, parent_tps, problems, choice)


def _infeasible(method: str, ctx: SearchContext, detail: str) -> UserError:
    return UserError(f"{method}: no architecture meets {ctx.mcfg.throughput_x}x the parent's predicted throughput "
                     f"(scenario batch {ctx.batches}, prefill {ctx.mcfg.prefill_len} + gen {ctx.mcfg.gen_len}): "
                     f"{detail}; lower --throughput-x")


# ----------------------------------------------------------------------------- the four searches

def select_uniform(ctx: SearchContext, space: SearchSpace, ffn_steps: int | None = 16) -> tuple[list[LayerArch], dict]:
    """The same GQA KV-head count and MLP size in every layer (uniform_grid): the feasible one
    with the most KV heads, then the most parameters (then the lowest summed block score)."""
    L, p = ctx.parent.num_layers, ctx.parent
    common_a, common_f = uniform_grid(p, space, ffn_steps)
    if ffn_steps is not None and not isinstance(ctx.sc, InterpolatedCosts):
        ctx = dataclasses.replace(ctx, sc=InterpolatedCosts(ctx.sc))
    options = []
    for a in common_a:
        for f in common_f:
            layers = [LayerArch(a, f)] * L
            obj = ctx.objective(layers)
            fit = ctx.assess(layers)
            options.append({"attention": a.name, "ffn": f.name, "params": p.with_layers(layers).num_params(),
                            "objective": obj, "feasible": any(ok for ok, _ in fit.values()),
                            "predicted_speedup": max(s for _, s in fit.values())})
    # FFN width first, KV heads only when no FFN width at this KV count is fast enough (Minitron prunes
    # width before heads; most parameters alone picked KV 4 -> 1 at 1.2x, 50% retention untrained)
    options.sort(key=lambda o: (-AttentionVariant.from_name(o["attention"]).num_kv_heads, -o["params"],
                                o["objective"] if o["objective"] is not None else float("inf")))
    chosen = next((o for o in options if o["feasible"]), None)
    if chosen is None:
        best = max((o["predicted_speedup"] for o in options), default=0.0)
        raise _infeasible("uniform", ctx, f"the most compressed uniform setting reaches {best:.2f}x")
    la = LayerArch(AttentionVariant.from_name(chosen["attention"]), FFNVariant.from_name(chosen["ffn"]))
    return [la] * L, {"options": options, "chosen": chosen, "ffn_steps": ffn_steps,
                      "costs": "measured" if ffn_steps is None else "measured; unmeasured MLP widths interpolated"}


def _parent_model(arch: Architecture, tensors: dict):
    """A single-process (TP = PP = 1) Megatron GPTModel holding `tensors`, in eval mode."""
    from megapuzzle.costs.timing import ensure_runtime
    from megapuzzle.model import ModelOptions, build_gpt_model, load_canonical_into_model

    ensure_runtime(None)
    model = build_gpt_model(arch, options=ModelOptions(perform_initialization=False))
    load_canonical_into_model(model, tensors, arch)
    return model.eval()


def block_influence(run: RunDir, parent_arch: Architecture, parent_tensors: dict, batch_size: int, seq_len: int,
                    num_batches: int) -> list[float]:
    """ShortGPT's BI_l = mean over held-out tokens of 1 - cos(h_l, h_{l+1}), h_l the residual
    stream entering layer l (h_L: leaving the last layer)."""
    import torch

    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.model.forward import forward_hidden_states

    model = _parent_model(parent_arch, parent_tensors)  # fp32 model: each tensor is cast as it is loaded
    heldout = PackedSequenceDataset.from_prefix(run.require_data("heldout"))
    L = parent_arch.num_layers
    sums, tokens = torch.zeros(L, dtype=torch.float64), 0
    for batch in heldout.eval_batches(batch_size, seq_len, max_batches=num_batches):
        _, hs = forward_hidden_states(model, batch[:, :-1])
        for l in range(L):
            cos = torch.nn.functional.cosine_similarity(hs[l].float(), hs[l + 1].float(), dim=-1)
            sums[l] += (1.0 - cos).double().sum()
        tokens += batch[:, :-1].numel()
    return (sums / tokens).tolist()


def select_depth(ctx: SearchContext, bi: list[float]) -> tuple[list[LayerArch], dict]:
    """Drop whole layers in increasing BI order (ties: lower index) until the target is met."""
    layers = list(ctx.parent.layers)
    order = sorted(range(len(bi)), key=lambda l: (bi[l], l))
    dropped = []
    for l in [None] + order:
        if l is not None:
            layers[l] = DROPPED
            dropped.append(l)
        if ctx.best_batch(layers) is not None:
            return layers, {"block_influence": bi, "drop_order": order, "dropped": dropped}
    raise _infeasible("depth", ctx, "even with every layer dropped")


def select_random(ctx: SearchContext, seed: int, tries: int = 20000, band: float = 0.05
                  ) -> tuple[list[LayerArch], dict]:
    """Rejection sampling over uniform per-layer library pairs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    L = ctx.parent.num_layers
    counts = np.array([len(p) for p in ctx.cands.layers])
    x = ctx.mcfg.throughput_x
    drawn, feasible_seen, tight = 0, 0, None  # tight: (speedup, choice) of the tightest feasible draw
    chunk = 2048
    while drawn < tries:
        n = min(chunk, tries - drawn)
        ch = (rng.random((n, L)) * counts).astype(np.int64)  # uniform index per layer
        ok_any = np.zeros(n, bool)
        speed = np.full(n, np.inf)
        for b, prob in ctx.problems.items():
            flat = prob.offsets[:-1][None, :] + ch
            ok = np.ones(n, bool)
            for r in prob.constrained:
                ok &= prob.flat_costs[r][flat].sum(axis=1) <= prob.budgets[r] + prob.tolerance(r)
            rt = prob.flat_costs["runtime_s"][flat].sum(axis=1) + ctx.sc.fixed_time(b, L)
            sp = b * ctx.mcfg.gen_len / rt / ctx.parent_tps[b]
            speed = np.where(ok & (~ok_any | (sp < speed)), sp, speed)  # the feasible batch closest to x
            ok_any |= ok
        feasible_seen += int(ok_any.sum())
        hit = np.nonzero(ok_any & (speed <= x * (1 + band)))[0]
        if hit.size:
            i = int(hit[0])
            choice, drawn, how = ch[i], drawn + i + 1, "first draw within the band"
            break
        if ok_any.any():
            i = int(np.argmin(np.where(ok_any, speed, np.inf)))
            if tight is None or speed[i] < tight[0]:
                tight = (float(speed[i]), ch[i].copy())
        drawn += n
    else:
        if tight is None:
            raise _infeasible("random", ctx, f"none of {tries} random draws (seed {seed}) meets it")
        choice, how = tight[1], f"no draw within the band in {tries}: the tightest feasible one"
    layers = [ctx.cands.layers[l][int(v)] for l, v in enumerate(choice)]
    return layers, {"seed": seed, "draws": drawn, "feasible_draws_seen": feasible_seen, "band": band,
                    "accepted": how, "choice": [int(v) for v in choice]}


def select_greedy(ctx: SearchContext) -> tuple[list[LayerArch], dict]:
    """mip.greedy from the parent at every batch size; best objective (ties: higher tokens/s)."""
    from megapuzzle.mip import InfeasibleBudgetError
    from megapuzzle.mip.greedy import greedy

    best, info = None, {"per_batch": {}}
    for b, prob in ctx.problems.items():
        trace: list = []
        try:
            sol = greedy(prob, ctx.parent_choice, trace=trace)
        except InfeasibleBudgetError as e:
            info["per_batch"][str(b)] = {"error": str(e)}
            continue
        layers = [ctx.cands.layers[l][v] for l, v in enumerate(sol.choice)]
        tps = ctx.sc.tokens_per_s(ctx.parent.with_layers(layers), b)
        info["per_batch"][str(b)] = {"objective": sol.objective, "moves": trace, "predicted_tokens_per_s": tps}
        if best is None or sol.objective < best[0] - 1e-12 or (abs(sol.objective - best[0]) <= 1e-12 and tps > best[1]):
            best = (sol.objective, tps, layers)
    if best is None:
        raise _infeasible("greedy", ctx, "; ".join(f"[batch {b}] {v['error']}" for b, v in info["per_batch"].items()))
    return best[2], info


# ----------------------------------------------------------------------------- weights

def init_child_tensors(run: RunDir, parent_arch: Architecture, parent_tensors: dict, layers: list[LayerArch],
                       bld_cfg) -> dict:
    """The child's canonical tensors straight from the parent by megapuzzle.init (no training):
    KV mean pooling, FFN channel-contribution pruning calibrated like BLD calibrates
    (bld.calibration_batches training batches of bld.batch_size x bld.seq_len, bld.seed)."""
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes
    from megapuzzle.init import InitError, init_attention, init_ffn, local_layer_tensors, with_layer_prefix

    prune = {l for l, la in enumerate(layers) if la.ffn.kind_spec.needs_calibration(parent_arch.layers[l].ffn, la.ffn)}
    scores = ffn_channel_scores(run, parent_arch, parent_tensors, prune, bld_cfg) if prune else {}
    out = {k: parent_tensors[k] for k in parent_tensors if not k.startswith("model.layers.")}
    for l, la in enumerate(layers):
        local, own = local_layer_tensors(parent_tensors, l), parent_arch.layers[l]
        try:
            a, _ = init_attention(parent_arch, own.attention, la.attention, local)
            f, _ = init_ffn(own.ffn, la.ffn, local, scores.get(l))
        except InitError as e:
            raise UserError(f"layer {l}: {e}") from None
        out.update(with_layer_prefix({**a, **f}, l))
    want = expected_canonical_shapes(parent_arch.with_layers(layers))
    bad = [k for k, s in want.items() if k not in out or tuple(out[k].shape) != tuple(s)]
    if bad or set(out) - set(want):
        raise UserError(f"initialised child tensors do not match the child architecture ({(bad or sorted(set(out) - set(want)))[0]})")
    return {k: out[k] for k in want}


def ffn_channel_scores(run: RunDir, parent_arch: Architecture, parent_tensors: dict, layers: set[int],
                       bld_cfg) -> dict:
    """C_i per FFN channel of each layer in `layers` (megapuzzle.init), on BLD's calibration batches."""
    from megapuzzle.stages.bld.blocks import Teacher
    from megapuzzle.stages.bld.train import _calibrate
    from megapuzzle.data.datasets import PackedSequenceDataset

    teacher = Teacher(_parent_model(parent_arch, parent_tensors), set(layers), set(layers))
    train = PackedSequenceDataset.from_prefix(run.require_data("train"))
    return _calibrate(teacher, train, bld_cfg, parent_arch, parent_tensors, set(layers))


# ----------------------------------------------------------------------------- the child run

def prepare_child_dir(base: RunDir, out: Path, links: tuple[str, ...] = LINKS) -> RunDir:
    """OUT with symlinks to RUN's parent/, data/, library/, scores.json, costs.json (+ library_runs/
    for puzzle_fusion)."""
    if out.resolve() == base.root.resolve():
        raise UserError(f"--out {out} is the base run itself; give a new directory")
    for name in links:
        if not (base.root / name).exists():
            raise UserError(f"{base.root / name} does not exist; run `megapuzzle run CFG --run-dir {base.root} "
                            f"--until mip` first")
    out.mkdir(parents=True, exist_ok=True)
    for name in links:
        src, dst = (base.root / name).resolve(), out / name
        if dst.is_symlink():
            if dst.resolve() != src:
                raise UserError(f"{dst} links to {dst.resolve()}, not {src}: {out} belongs to another run")
            continue
        if dst.exists():
            raise UserError(f"{dst} exists and is not a link to {src}; pick another --out")
        dst.symlink_to(src, target_is_directory=src.is_dir())
    return RunDir(out)


def _fingerprint(base: RunDir, fusion: bool = False) -> dict[str, str]:
    from megapuzzle.checkpoints.canonical import checkpoint_fingerprint

    out = {n: sha256_file(base.root / n) for n in ("scores.json", "costs.json", "library/index.json",
                                                    "parent/arch.json")
           + (("library_runs/index.json",) if fusion else ())}
    # key kept from single-file days; the value is the sha256 of model.safetensors for those (< 4 GB)
    out["parent/model.safetensors"] = checkpoint_fingerprint(base.parent)
    return out


def select_and_realize(base: RunDir, child: RunDir, cfg: dict, method: str, x: float, *, seed: int = 0,
                       random_tries: int = 20000, random_band: float = 0.05, uniform_steps: int | None = 16) -> dict:
    """Pick the architecture, write mip/solutions.json + baseline.json + child/; returns the record."""
    from megapuzzle.checkpoints.canonical import load_checkpoint, save_checkpoint, tokenizer_path
    from megapuzzle.stages.realize.realize import realize

    mcfg = mip_config(cfg, x)
    if method == "puzzle":
        from megapuzzle.stages.mip.mip import run_mip

        out = run_mip(child.root, mcfg)
        realize(child.root, 0)
        atomic_write_json(child.root / "baseline.json", {"method": "puzzle", "throughput_x": x})
        return out["solutions"][0]
    if method == "puzzle_fusion":  # the tiling MIP: single-layer candidates + fused runs of 2..max_run layers
        from megapuzzle.stages.mip.mip import run_mip

        max_run = require_fusion_inputs(base, cfg)
        out = run_mip(child.root, mcfg, fusion_max_run=max_run)
        realize(child.root, 0)
        rec = out["solutions"][0]
        atomic_write_json(child.root / "baseline.json", {"method": method, "throughput_x": x,
                                                         "fusion_max_run": max_run, "runs": rec.get("runs", [])})
        return rec
    t0 = time.perf_counter()
    ctx = load_context(base.root, cfg, x)
    info: dict[str, Any]
    if method == "uniform":
        if uniform_steps is not None:  # widths off the library's grid: their costs are interpolated
            ctx = dataclasses.replace(ctx, sc=InterpolatedCosts(ctx.sc))
        layers, info = select_uniform(ctx, SearchSpace.from_dict(cfg.get("search_space")), uniform_steps)
        reason = "uniform width: most parameters that meet the target"
    elif method == "depth":
        from megapuzzle.stages.score.score import ScoreConfig

        s = section(cfg, "score", ScoreConfig)
        _, pt, _ = load_checkpoint(base.parent)
        layers, info = select_depth(ctx, block_influence(base, ctx.parent, pt, s.batch_size, s.seq_len, s.num_batches))
        reason = f"ShortGPT: dropped layers {info['dropped']} (lowest block influence)"
    elif method == "random":
        layers, info = select_random(ctx, seed, random_tries, random_band)
        reason = f"random library pairs, seed {seed}, {info['accepted']} after {info['draws']} draws"
    elif method == "greedy":
        layers, info = select_greedy(ctx)
        reason = "greedy: best score increase per cost saved, from the parent"
    else:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(ALL_METHODS)}")
    rec = ctx.record(layers, method, reason)
    b = rec["batch_size"]
    atomic_write_json(child.mip / "solutions.json", {
        "config": section_dict(ctx.mcfg), "method": method, "target_tokens_per_s": ctx.target_tps(b),
        "parent_predicted_tokens_per_s": {str(k): v for k, v in sorted(ctx.parent_tps.items())},
        "best_batch_size": b, "wall_s": time.perf_counter() - t0,
        "solutions": [rec]})  # objective None when a variant has no library score
    atomic_write_json(child.root / "baseline.json", {"method": method, "throughput_x": x, "reason": reason, **info})
    if method in ("uniform", "depth"):  # the init from the parent, not BLD blocks
        from megapuzzle.stages.bld.bld import BLDConfig

        pa, pt, _ = load_checkpoint(base.parent)
        tensors = init_child_tensors(base, pa, pt, layers, section(cfg, "bld", BLDConfig))
        save_checkpoint(child.child, pa.with_layers(layers), tensors, force=True,
                        meta={"source": f"baseline {method}", "solution": 0, "objective": rec["objective"],
                              "predicted_speedup": rec["predicted_speedup"]}, tokenizer_dir=tokenizer_path(base.parent))
    else:
        realize(child.root, 0)
    log(f"[baseline] {method} @ {x}x: predicted {rec['predicted_speedup']:.3f}x at batch {b}, "
        f"{rec['params'] / 1e6:.2f}M params, objective {rec['objective'] if rec['objective'] is None else round(rec['objective'], 5)}"
        f" -> {child.child}")
    return rec


def default_out(run_dir: str | Path, method: str, x: float) -> Path:
    root = Path(run_dir).resolve()
    return root.with_name(f"{root.name}_baselines") / f"{method}_x{x:g}"


def run_child(run_dir: str | Path, cfg: dict, method: str, x: float, out: str | Path | None = None, *,
              seed: int = 0, until: str = "evaluate", random_tries: int = 20000, random_band: float = 0.05,
              uniform_steps: int | None = 16) -> dict:
    """select (+ realize) -> gkd -> evaluate in OUT, skipping stages OUT's manifest.json marks done
    for the same key; returns {"method", "throughput_x", "dir", "record", "eval", "stages"}."""
    from megapuzzle.stages.evaluate.evaluate import EvaluateConfig, run_evaluate
    from megapuzzle.stages.gkd.gkd import GKDConfig, run_gkd
    from megapuzzle.stages.runner import Step, run_steps

    if method not in ALL_METHODS:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(ALL_METHODS)}")
    stages = ("select", "gkd", "evaluate")
    if until not in stages:
        raise UserError(f"--until {until!r} unknown; use one of {', '.join(stages)}")
    base = RunDir(Path(run_dir))
    fusion = method == "puzzle_fusion"
    if fusion:
        require_fusion_inputs(base, cfg)  # refuse a base run without run blocks / scores / fused-width costs
    child = prepare_child_dir(base, Path(out) if out is not None else default_out(run_dir, method, x),
                              LINKS + FUSION_LINKS if fusion else LINKS)
    key_src = {"method": method, "throughput_x": float(x), "seed": seed if method == "random" else None,
               "random": [random_tries, random_band] if method == "random" else None, "base": str(base.root.resolve()),
               "uniform_steps": uniform_steps if method == "uniform" else None,
               "files": _fingerprint(base, fusion),
               "config": {s: cfg.get(s) for s in ("search_space", "bld", "score", "mip", "gkd", "evaluate")}}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    mf_path = child.manifest
    manifest = json.loads(mf_path.read_text()) if mf_path.is_file() else {}
    if manifest.get("key") != key:
        if manifest:
            log(f"[baseline] {child.root}: method, target, config or base run changed; starting over")
        for name in ("child", "gkd", "mip", "tb", "state"):
            shutil.rmtree(child.root / name, ignore_errors=True)
        for name in ("eval.json", "report.md", "pareto.png", "baseline.json"):
            (child.root / name).unlink(missing_ok=True)
        manifest = {"kind": "megapuzzle baseline child", "key": key, **{k: key_src[k] for k in
                                                                          ("method", "throughput_x", "seed", "base")},
                    "stages": {}}
        atomic_write_json(mf_path, manifest)

    steps = [Step("select", key_src, lambda: select_and_realize(
                 base, child, cfg, method, x, seed=seed, random_tries=random_tries, random_band=random_band,
                 uniform_steps=uniform_steps)),
             Step("gkd", {"gkd": cfg.get("gkd")}, lambda: {
                 k: v for k, v in run_gkd(child.root, section(cfg, "gkd", GKDConfig), progress=False).items()
                 if k in ("steps", "tokens", "final")}),
             Step("evaluate", {"evaluate": cfg.get("evaluate")}, lambda: {
                 "speedup": run_evaluate(child.root, section(cfg, "evaluate", EvaluateConfig))["speedup"]})]
    run_steps(mf_path, manifest, steps, until=until, label=f"[baseline] {method} @ {x}x: ")
    ev = child.root / "eval.json"
    return {"method": method, "throughput_x": float(x), "dir": str(child.root),
            "record": manifest["stages"]["select"]["result"],
            "eval": json.loads(ev.read_text()) if ev.is_file() and manifest["stages"].get("evaluate", {}).get("status") == "done"
            else None,
            "stages": {k: v.get("wall_s") for k, v in manifest["stages"].items()}}


# ----------------------------------------------------------------------------- CLI

def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run's config YAML (mip:, gkd:, evaluate:, bld:, score:)")
    p.add_argument("--run-dir", required=True, help="base run: parent/, data/, library/, scores.json, costs.json")
    p.add_argument("--method", required=True, choices=ALL_METHODS, help="baseline (puzzle = the MIP, for reference)")
    p.add_argument("--throughput-x", type=float, required=True, help="target: this multiple of the parent's throughput")
    p.add_argument("--out", help="child run directory (default RUN_baselines/<method>_x<X>)")
    p.add_argument("--seed", type=int, default=0, help="random: the sampling seed")
    p.add_argument("--random-tries", type=int, default=20000, help="random: draws before taking the tightest feasible")
    p.add_argument("--random-band", type=float, default=0.05, help="random: accept a speedup within x*(1+band)")
    p.add_argument("--until", default="evaluate", choices=("select", "gkd", "evaluate"), help="stop after this stage")
    p.add_argument("--uniform-steps", type=int, default=16, help="uniform: FFN widths k*I/N, k = 1..N (0: the "
                                                                  "search space's grid only)")


def run_cli(args: argparse.Namespace) -> int:
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.arch_table import architecture_table

    res = run_child(args.run_dir, load_config(args.config), args.method, args.throughput_x, args.out, seed=args.seed,
                    until=args.until, random_tries=args.random_tries, random_band=args.random_band,
                    uniform_steps=args.uniform_steps or None)
    print(architecture_table(load_arch(Path(res["dir"]) / "child")))
    ev = res["eval"]
    if ev:
        print(f"[baseline] {args.method} @ {args.throughput_x}x: measured {ev['speedup']['measured']:.2f}x "
              f"(predicted {ev['speedup']['predicted']:.2f}x), accuracy retention {ev['quality_retention_pct']:.1f}%, "
              f"KL {ev['child']['kl_to_parent']:.4f} -> {res['dir']}/report.md")
    return 0
