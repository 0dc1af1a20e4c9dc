"""MIP with multi-layer replacements (megapuzzle.mip.runs): optimum == brute force over all tilings."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megapuzzle.mip import InfeasibleBudgetError, solve
from megapuzzle.mip.runs import RunCandidate, RunProblem, solve_runs

SOLVERS = ["highs", "gurobi"]
N_SEEDS = 40


def random_run_problem(seed: int, max_run: int = 3) -> RunProblem:
    """L in 2..6, 1..4 single-layer candidates per layer, 0..2 run candidates per span of 2..max_run
    layers (a fused run is usually cheaper than the sum of its layers and scores differently);
    1-3 resources; budgets from below the least achievable to above the most (some infeasible).
    Some seeds round values (ties, exact duplicates)."""
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 7))
    names = ["runtime_s", "memory_bytes", "params"][:int(rng.integers(1, 4))]
    scale = {"runtime_s": 1e-3, "memory_bytes": 1e9, "params": 1e8}
    coarse = seed % 3 == 0

    def val(x, r=None):
        x = round(x, 1) if coarse else x
        return x * scale[r] if r else x

    cands = []
    for l in range(L):
        for v in range(int(rng.integers(1, 5))):
            cands.append(RunCandidate(l, l, val(rng.uniform(0, 1)), {r: val(rng.uniform(0, 1), r) for r in names},
                                      f"{l}:{v}"))
    for n in range(2, max_run + 1):
        for i in range(L - n + 1):
            for v in range(int(rng.integers(0, 3))):
                cands.append(RunCandidate(i, i + n - 1, val(rng.uniform(0, 1.5)),
                                          {r: val(rng.uniform(0, 0.8 * n), r) for r in names}, f"{i}-{i + n - 1}:{v}"))
    p = RunProblem(L, cands)
    budgets = {}
    for r in names:
        lo, hi = least_and_most(p, r)
        budgets[r] = lo + rng.uniform(-0.15, 1.0) * (hi - lo)
    if seed % 5 == 1:  # a budget exactly at some tiling's total
        t = list(tilings(p))[int(rng.integers(len(list(tilings(p)))))]
        budgets[names[0]] = p.evaluate(t)[1][names[0]]
    return RunProblem(L, cands, budgets)


def tilings(p: RunProblem, at: int = 0):
    """Every tiling (candidate indices in layer order) by plain recursion."""
    if at == p.num_layers:
        yield ()
        return
    for k, c in enumerate(p.candidates):
        if c.first == at:
            for rest in tilings(p, c.last + 1):
                yield (k,) + rest


def least_and_most(p: RunProblem, r: str) -> tuple[float, float]:
    totals = [p.evaluate(t)[1][r] for t in tilings(p)]
    return min(totals), max(totals)


def brute_force(p: RunProblem):
    best, arg = math.inf, []
    for t in tilings(p):
        obj, tot = p.evaluate(t)
        if p.violations(tot):
            continue
        if obj < best - 1e-12:
            best, arg = obj, [t]
        elif abs(obj - best) <= 1e-12:
            arg.append(t)
    return best, arg


@pytest.mark.parametrize("solver", SOLVERS)
def test_runs_match_brute_force_over_all_tilings(solver):
    n_infeasible = n_fused = 0
    for seed in range(N_SEEDS):
        p = random_run_problem(seed)
        best, args = brute_force(p)
        for kw in (dict(), dict(prune=False)):
            if best == math.inf:
                with pytest.raises(InfeasibleBudgetError):
                    solve_runs(p, solver=solver, **kw)
                continue
            sol = solve_runs(p, solver=solver, **kw)
            assert sol.solver == solver and sol.status == "optimal"
            assert abs(sol.objective - best) <= 1e-9, (seed, kw, sol.objective, best)
            assert p.is_tiling(sol.choice) and not p.violations(sol.totals)
            assert sol.choice in args or abs(p.evaluate(sol.choice)[0] - best) <= 1e-9
            n_fused += any(a < b for a, b in sol.spans(p))
        n_infeasible += best == math.inf
    assert 3 <= n_infeasible <= N_SEEDS - 10  # the draw exercises both outcomes
    assert n_fused >= 5  # and optima that use a multi-layer candidate


@pytest.mark.parametrize("solver", SOLVERS)
def test_single_layer_runs_equal_the_layer_mip(solver):
    """With no run candidates (fusion_max_run 1), the run formulation finds the layer MIP's optimum."""
    from test_mip import random_problem

    for seed in range(20):
        lp = random_problem(seed)
        rp = RunProblem.from_layer_problem(lp)
        try:
            ref = solve(lp, solver=solver)
        except InfeasibleBudgetError:
            with pytest.raises(InfeasibleBudgetError):
                solve_runs(rp, solver=solver)
            continue
        sol = solve_runs(rp, solver=solver)
        assert abs(sol.objective - ref.objective) <= 1e-9
        assert all(a == b for a, b in sol.spans(rp))


def test_max_run_drops_long_candidates_and_validation():
    c = [RunCandidate(0, 0, 1.0, {"t": 1.0}), RunCandidate(1, 1, 1.0, {"t": 1.0}),
         RunCandidate(0, 1, 0.5, {"t": 1.5})]
    assert solve_runs(RunProblem(2, c, {"t": 1.6}), "highs").spans(RunProblem(2, c)) == [(0, 1)]
    p1 = RunProblem(2, c, {"t": 2.0}, max_run=1)
    assert len(p1.candidates) == 2 and solve_runs(p1, "highs").objective == 2.0
    with pytest.raises(InfeasibleBudgetError, match="t budget 1.2 is below the least achievable 1.5"):
        solve_runs(RunProblem(2, c, {"t": 1.2}), "highs")
    with pytest.raises(ValueError, match="no tiling"):
        RunProblem(3, c)
    with pytest.raises(ValueError, match="outside"):
        RunProblem(2, c + [RunCandidate(1, 2, 0.0, {"t": 0.0})])


def test_search_space_fusion_max_run():
    from megapuzzle.arch import ArchitectureError, SearchSpace

    assert SearchSpace.from_dict({}).fusion_max_run == 1
    assert SearchSpace.from_dict({"fusion_max_run": 3}).fusion_max_run == 3
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ArchitectureError, match="fusion_max_run"):
            SearchSpace.from_dict({"fusion_max_run": bad})
