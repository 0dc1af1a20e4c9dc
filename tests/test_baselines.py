"""Baselines (megapuzzle.bench.baselines, mip.greedy) and the search-quality bench on the debug parent.

Greedy equals brute force where it is provably optimal and never beats the MIP; uniform is the
same in every layer, meets the budget and carries the init (not BLD) weights; depth's block
influence is 1 - cos of each layer's own input and output and the lowest-BI layers go; random
is reproducible by seed and meets the budget; an infeasible target is a one-line error; the
bench builds resumable child run directories and writes its table, json and plot.

The run's costs.json is made deterministic (runtime proportional to parameters and KV bytes) so
that budgets do not depend on this machine's timing noise.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch

from conftest import SEARCH_CFG, make_searched_run
from _logs import captured
from megapuzzle.mip import InfeasibleBudgetError, MIPProblem, solve
from megapuzzle.mip.greedy import greedy

QUIET: dict = {}
CFG = {
    **SEARCH_CFG,
    "mip": {"throughput_x": 1.3, "batch_sizes": [2], "prefill_len": 8, "gen_len": 4, "solver": "highs"},
    "gkd": {"steps": 2, "batch_size": 4, "seq_len": 32, "eval_batches": 1, "log_every": 1, "checkpoint_every": 2},
    "evaluate": {"repeats": 1, "warmup": 0, "rounds": 1, "quality_batch_size": 4, "seq_len": 32, "eval_batches": 1},
}


# ----------------------------------------------------------------------------- greedy on MIPProblems

def brute_force(problem: MIPProblem) -> float:
    best = math.inf
    for combo in itertools.product(*[range(n) for n in problem.num_candidates]):
        obj, tot = problem.evaluate(combo)
        if not problem.violations(tot):
            best = min(best, obj)
    return best


def test_greedy_equals_brute_force_where_it_is_provably_optimal():
    """Keep-or-drop per layer, every drop saving the same cost: taking the cheapest drops in
    score order is optimal, and greedy's ratio order is exactly that."""
    rng = np.random.default_rng(0)
    for _ in range(25):
        L = int(rng.integers(2, 8))
        keep = rng.uniform(1.0, 2.0, L)
        scores = [[0.0, float(s)] for s in rng.uniform(0, 1, L)]
        runtime = [[float(k), float(k) - 0.5] for k in keep]
        k = int(rng.integers(0, L + 1))  # exactly k drops are needed
        p = MIPProblem(scores, {"runtime_s": runtime}, {"runtime_s": float(keep.sum()) - 0.5 * k + 1e-9})
        sol = greedy(p, [0] * L)
        assert sol.objective == pytest.approx(brute_force(p), abs=1e-12)
        assert sum(sol.choice) == k and sol.status == "heuristic" and sol.solver == "greedy"


def random_problem(rng, resources: int) -> MIPProblem:
    L, names = int(rng.integers(2, 6)), ["runtime_s", "memory_bytes"][:resources]
    counts = rng.integers(2, 6, size=L)
    scores = [np.concatenate([[0.0], rng.uniform(0, 1, c - 1)]) for c in counts]  # candidate 0: the parent
    costs = {r: [np.concatenate([[1.0], rng.uniform(0, 1, c - 1)]) for c in counts] for r in names}
    budgets = {r: L * rng.uniform(0.2, 1.0) for r in names}
    return MIPProblem(scores, costs, budgets)


@pytest.mark.parametrize("resources", [1, 2])
def test_greedy_meets_the_budget_and_never_beats_the_mip(resources):
    rng = np.random.default_rng(resources)
    feasible = 0
    for _ in range(40):
        p = random_problem(rng, resources)
        best = brute_force(p)
        try:
            sol = greedy(p, [0] * p.num_layers)
        except InfeasibleBudgetError as e:
            assert "\n" not in str(e)
            # with one budget greedy can always reach the all-cheapest choice
            assert resources > 1 or best == math.inf
            continue
        feasible += 1
        assert not p.violations(sol.totals)
        mip = solve(p, solver="highs")
        assert mip.objective <= sol.objective + 1e-12
        assert mip.objective == pytest.approx(best, abs=1e-12)
    assert feasible >= 15


def test_greedy_trace_takes_the_best_ratio_first():
    p = MIPProblem([[0.0, 0.1, 0.5], [0.0, 0.3, 0.35]], {"runtime_s": [[1.0, 0.5, 0.0], [1.0, 0.5, 0.1]]},
                   {"runtime_s": 1.5})
    trace: list = []
    sol = greedy(p, [0, 0], trace=trace)
    assert trace[0]["layer"] == 0 and trace[0]["to"] == 1 and trace[0]["ratio"] == pytest.approx(0.1 / (0.5 / 2))  # saving in units of scale 2
    assert sol.choice == (1, 0) and len(trace) == 1


# ----------------------------------------------------------------------------- on the debug run

def synthetic_costs(costs: dict) -> dict:
    """Runtime proportional to parameters (+ KV bytes when decoding): a deterministic cost table."""
    c = copy.deepcopy(costs)
    bs, ss = c["grid"]["batch_sizes"], c["grid"]["seq_lens"]

    def table(f):
        return {"median": [[f(b, s) for s in ss] for b in bs], "iqr": [[0.0] * len(ss) for _ in bs]}

    for ph in c["phases"]:
        c["baseline"][ph] = table(lambda b, s: 1e-4)
        c["empty_layer"][ph] = table(lambda b, s: 1e-6)
    for v in c["variants"].values():
        n, kv = v["param_count"], v["kv_bytes_per_token"]
        v["runtime"] = {"prefill": table(lambda b, s, n=n: 1e-9 * n * b * s),
                        "decode": table(lambda b, s, n=n, kv=kv: 1e-9 * (n * b + kv * b * s))}
    return c


@pytest.fixture(scope="module")
def run(debug_parent, tmp_path_factory):
    return make_searched_run(debug_parent, tmp_path_factory.mktemp("baselines") / "run", CFG, synthetic_costs)


def _uniform_speedups(run) -> dict[str, float]:
    from megapuzzle.arch import SearchSpace
    from megapuzzle.bench.baselines import load_context, select_uniform

    ctx = load_context(run, CFG, 1.0)
    _, info = select_uniform(ctx, SearchSpace.from_dict(CFG["search_space"]), None)  # the library's grid
    return {(o["attention"], o["ffn"]): (o["params"], o["predicted_speedup"]) for o in info["options"]}


def test_uniform_is_the_same_everywhere_meets_the_budget_and_keeps_init_weights(run, tmp_path):
    from megapuzzle.arch import SearchSpace
    from megapuzzle.bench.baselines import load_context, run_child, select_uniform
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.init import local_layer_tensors, pool_kv_heads
    from megapuzzle.library import BlockLibrary, attention_key

    opts = _uniform_speedups(run)
    assert len(opts) == 4  # kv {2, 1} x ffn {256, 128}
    # FFN width first, then KV heads: (most KV heads, most parameters)
    order = sorted(opts.items(), key=lambda kv: (-int(kv[0][0].split("kv")[1]), -kv[1][0]))
    assert [k for k, _ in order] == [("gqa_kv2", "mlp_256"), ("gqa_kv2", "mlp_128"), ("gqa_kv1", "mlp_256"),
                                     ("gqa_kv1", "mlp_128")]
    x = order[1][1][1] * 1.01  # just beyond KV 2 at the smaller FFN: the first KV-1 setting that is fast enough
    want = next(k for k, (_, sp) in order[2:] if sp >= x)
    ctx = load_context(run, CFG, x)
    layers, info = select_uniform(ctx, SearchSpace.from_dict(CFG["search_space"]), None)
    assert len(set(layers)) == 1 and (layers[0].attention.name, layers[0].ffn.name) == want
    assert ctx.best_batch(layers) is not None and info["chosen"]["feasible"]

    res = run_child(run, CFG, "uniform", x, tmp_path / "u", until="select", uniform_steps=None, **QUIET)
    child_arch, child_t, _ = load_checkpoint(tmp_path / "u" / "child")
    assert list(child_arch.layers) == layers and res["record"]["predicted_speedup"] >= x * (1 - 1e-9)
    parent_arch, parent_t, _ = load_checkpoint(run / "parent")
    kv = layers[0].attention.num_kv_heads
    lib = BlockLibrary(run / "library")
    for l in range(parent_arch.num_layers):
        k = child_t[f"model.layers.{l}.self_attn.k_proj.weight"]
        if kv != parent_arch.layers[l].attention.num_kv_heads:  # the init (mean pooling), not the BLD block
            pooled = pool_kv_heads(local_layer_tensors(parent_t, l), parent_arch.layers[l].attention.num_kv_heads,
                                   kv, parent_arch.kv_channels)
            assert torch.equal(k, pooled["self_attn.k_proj.weight"])
            assert not torch.equal(k, lib.load_block(attention_key(l, layers[0].attention))["self_attn.k_proj.weight"])
    sol = json.loads((tmp_path / "u" / "mip" / "solutions.json").read_text())
    assert sol["best_batch_size"] == 2 and sol["solutions"][0]["method"] == "uniform"


def test_uniform_at_any_width_interpolates_costs_reaches_further_and_prunes_the_parent(run, tmp_path):
    from megapuzzle.arch import FFNVariant, SearchSpace
    from megapuzzle.bench.baselines import InterpolatedCosts, interpolate_linear, load_context, run_child, select_uniform
    from megapuzzle.checkpoints.canonical import load_checkpoint

    space = SearchSpace.from_dict(CFG["search_space"])
    ctx = load_context(run, CFG, 1.0)
    _, grid = select_uniform(ctx, space, None)
    _, fine = select_uniform(ctx, space, 4)  # debug parent: FFN 256 -> 256, 192, 128, 64; KV 2, 1
    assert {(o["attention"], o["ffn"]) for o in fine["options"]} == {
        (a, f) for a in ("gqa_kv2", "gqa_kv1") for f in ("mlp_256", "mlp_192", "mlp_128", "mlp_64")}
    top_grid = max(o["predicted_speedup"] for o in grid["options"])
    top_fine = max(o["predicted_speedup"] for o in fine["options"])
    assert top_fine > top_grid * 1.05
    # synthetic costs are linear in the FFN's parameters, so interpolation must be exact on them
    ic = InterpolatedCosts(ctx.sc)
    t = {n: ic.variant_time(FFNVariant("mlp", n), 2) for n in (64, 128, 192, 256)}
    assert t[192] == pytest.approx((t[128] + t[256]) / 2, rel=1e-9)
    assert t[64] == pytest.approx(t[128] - (t[256] - t[128]) / 2, rel=1e-9) and t[64] > 0
    assert t[128] == ctx.sc.variant_time(FFNVariant("mlp", 128), 2)  # measured ones untouched
    assert interpolate_linear([1.0, 2.0], [1.0, 2.0], -5.0) == 0.0 and interpolate_linear([1.0, 2.0], [1.0, 3.0], 4.0) == 7.0

    x = (top_grid + top_fine) / 2  # beyond the grid: only off-grid widths meet it
    res = run_child(run, CFG, "uniform", x, tmp_path / "u", until="select", uniform_steps=4, **QUIET)
    child_arch, child_t, _ = load_checkpoint(tmp_path / "u" / "child")
    la = child_arch.layers[0]
    assert len(set(child_arch.layers)) == 1 and la.ffn.intermediate_size == 64
    assert res["record"]["predicted_speedup"] >= x * (1 - 1e-9)
    _, parent_t, _ = load_checkpoint(run / "parent")
    for l in range(child_arch.num_layers):  # the pruning init: every kept channel is one of the parent's
        down_c = child_t[f"model.layers.{l}.mlp.down_proj.weight"]
        down_p = parent_t[f"model.layers.{l}.mlp.down_proj.weight"]
        assert down_c.shape == (down_p.shape[0], 64)
        for j in range(64):
            assert any(torch.equal(down_c[:, j], down_p[:, i]) for i in range(down_p.shape[1]))


def test_depth_block_influence_is_one_minus_cos_and_the_lowest_go(run, tmp_path):
    from megapuzzle.bench.baselines import DROPPED, block_influence, load_context, run_child, select_depth
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.config import RunDir
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.stages.evaluate.evaluate import build_model
    from megapuzzle.model import forward_logits

    arch, tensors, _ = load_checkpoint(run / "parent")
    bi = block_influence(RunDir(run), arch, tensors, 2, 32, 2)
    # direct: each layer's own input and output, from hooks on the layer modules
    model = build_model(arch, {k: v.float() for k, v in tensors.items()})
    acc = torch.zeros(arch.num_layers, dtype=torch.float64)
    io: dict[int, tuple] = {}

    def keep(i):
        def hook(mod, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            io[i] = (x, out[0] if isinstance(out, tuple) else out)
        return hook

    hooks = [layer.register_forward_hook(keep(i), with_kwargs=True) for i, layer in enumerate(model.decoder.layers)]
    n = 0
    with torch.no_grad():
        for batch in PackedSequenceDataset.from_prefix(run / "data" / "heldout").eval_batches(2, 32, max_batches=2):
            forward_logits(model, batch[:, :-1])
            for i, (x, y) in io.items():
                acc[i] += (1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum()
            n += batch[:, :-1].numel()
    for h in hooks:
        h.remove()
    assert bi == pytest.approx((acc / n).tolist(), rel=1e-5, abs=1e-7)

    order = sorted(range(len(bi)), key=lambda l: bi[l])
    two = [DROPPED if l in order[:2] else arch.layers[l] for l in range(arch.num_layers)]
    x = load_context(run, CFG, 1.0).assess(two)[2][1]  # exactly the two lowest-BI layers must go
    ctx = load_context(run, CFG, x)
    layers, info = select_depth(ctx, bi)
    k = len(info["dropped"])
    assert k == 2 and info["dropped"] == order[:k]
    assert all((la == DROPPED) == (l in order[:k]) for l, la in enumerate(layers))
    fewer = [DROPPED if l in order[:k - 1] else arch.layers[l] for l in range(arch.num_layers)]
    assert ctx.best_batch(layers) is not None and ctx.best_batch(fewer) is None  # the fewest drops

    run_child(run, CFG, "depth", x, tmp_path / "d", until="select", **QUIET)
    child_arch, child_t, _ = load_checkpoint(tmp_path / "d" / "child")
    assert list(child_arch.layers) == layers
    for name, t in child_t.items():  # every kept tensor is the parent's own
        assert torch.equal(t, tensors[name])
    assert len(child_t) < len(tensors)


def test_random_is_reproducible_by_seed_and_meets_the_budget(run):
    from megapuzzle.bench.baselines import load_context, select_random

    ctx = load_context(run, CFG, 1.4)
    a, info = select_random(ctx, seed=7)
    b, _ = select_random(ctx, seed=7)
    assert a == b and ctx.best_batch(a) is not None
    assert 1.4 * (1 - 1e-9) <= ctx.record(a, "random", "")["predicted_speedup"]
    others = [select_random(ctx, seed=s)[0] for s in range(4)]
    assert any(o != a for o in others)
    if info["accepted"] == "first draw within the band":
        assert ctx.record(a, "random", "")["predicted_speedup"] <= 1.4 * 1.05 + 1e-9
    assert all(la in ctx.cands.layers[l] for l, la in enumerate(a))  # library pairs only


@pytest.mark.parametrize("method", ["uniform", "depth", "random", "greedy"])
def test_an_infeasible_target_is_a_one_line_user_error(run, tmp_path, capsys, method):
    import yaml

    from megapuzzle.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    rc = main(["baseline", "--config", str(cfg), "--run-dir", str(run), "--method", method, "--throughput-x", "1000",
               "--out", str(tmp_path / "c"), "--until", "select", "--random-tries", "200"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "1000" in err and "lower --throughput-x" in err, err


def test_bench_sweeps_stops_compares_at_equal_speed_and_resumes(run, tmp_path):
    logs: list[str] = []
    out = run_search_quality_cfg(run, tmp_path, [1000, 1.3], logs)
    rows = {(r["method"], r["target"]): r for r in out["rows"]}
    assert set(rows) == {(m, t) for m in ("puzzle", "greedy", "uniform") for t in (1.3, 1000.0)}
    for m in ("puzzle", "greedy", "uniform"):
        r = rows[(m, 1.3)]
        assert r["predicted_x"] >= 1.3 * (1 - 1e-9) and r["measured_x"] > 0 and 0 < r["retention_pct"]
        assert r["retention_before_gkd_pct"] > 0 and {"lm_loss", "accuracy", "kl", "params"} <= set(r)
        ev = json.loads((tmp_path / "work" / f"{m}_x1.3" / "eval.json").read_text())
        assert ev["gkd"]["steps"] == 3 and ev["scenario"]["batch_size"] == 2  # --gkd-steps for every child
        assert rows[(m, 1000.0)]["error"] and out["stopped"][m]["max"] == 1.3  # stops, records its max
    assert rows[("puzzle", 1.3)]["objective"] <= rows[("greedy", 1.3)]["objective"] + 1e-12
    table = (tmp_path / "res" / "table.md").read_text()
    assert "megapuzzle bench search-quality" in table and "--gkd-steps 3" in table and "3 steps" in table
    assert "measured speedup is >= s" in table and "Where each method is best" in table
    best = max(("puzzle", "greedy", "uniform"), key=lambda m: rows[(m, 1.3)]["retention_pct"])
    fastest = {m: rows[(m, 1.3)]["measured_x"] for m in ("puzzle", "greedy", "uniform")}
    # at the slowest child's speed every method competes: the best retention must be the bold one there
    s0 = min(fastest.values())
    from megapuzzle.bench.frontier import best_ranges
    ranges, _ = best_ranges({m: [(fastest[m], rows[(m, 1.3)]["retention_pct"])] for m in fastest}, lo=0.0)
    assert any(a < s0 <= b for a, b in ranges[best])
    assert out["envelopes"]["retention_pct"][best] == [(fastest[best], rows[(best, 1.3)]["retention_pct"])]
    assert (tmp_path / "res" / "quality_vs_throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "res" / "results.json").read_text())["rows"] == json.loads(json.dumps(out["rows"]))

    logs.clear()  # a re-run skips every finished stage of every child
    run_search_quality_cfg(run, tmp_path, [1.3, 1000], logs)
    assert sum("skipped" in s for s in logs) == 3 * 4 and not any("[gkd]" in s for s in logs)


def test_bench_does_not_retrain_the_same_architecture(run, tmp_path):
    logs: list[str] = []  # dropping the lowest-BI layer of 4 is far above both targets: one architecture
    out = run_search_quality_cfg(run, tmp_path, [1.02, 1.01], logs, methods=("depth",))
    a, b = out["rows"]
    assert a["target"] == 1.01 and b["target"] == 1.02 and a["layers"] == b["layers"]
    assert b["same_as"] == 1.01 and b["measured_x"] == a["measured_x"] and a["retention_pct"] > 0
    assert not (tmp_path / "work" / "depth_x1.02" / "gkd").exists() and any("not retrained" in s for s in logs)
    assert "same child as 1.01x" in (tmp_path / "res" / "table.md").read_text()


def run_search_quality_cfg(run, tmp_path, targets, logs, methods=("puzzle", "greedy", "uniform")):
    import yaml

    from megapuzzle.bench.search_quality import run_search_quality

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    with captured() as lines:
        out = run_search_quality(cfg, run, targets, tmp_path / "res", work_dir=tmp_path / "work", methods=methods,
                                 gkd_steps=3, uniform_steps=4, command="megapuzzle bench search-quality --gkd-steps 3")
    logs.extend(lines)
    return out
