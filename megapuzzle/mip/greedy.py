"""Greedy search on a MIPProblem: the obvious heuristic, to show what the MIP buys.

    megapuzzle baseline --config examples/cpu_demo.yaml --run-dir runs/cpu_demo --method greedy --throughput-x 2.0

    from megapuzzle.mip.greedy import greedy
    sol = greedy(problem, start=parent_choice)     # a Solution with solver "greedy", status "heuristic"

Start from `start` (Puzzle: the parent's own block at every layer; default: each layer's
lowest-score candidate) and, while any budget is exceeded, apply the single per-layer
replacement with the smallest score increase per unit of cost saved:

    ratio(l, v) = (score[l][v] - score[l][cur_l]) / saved(l, v),
    saved(l, v) = sum over the exceeded resources r of (cost_r[l][cur_l] - cost_r[l][v]) / scale_r

(scale_r = MIPProblem.scale(r), so seconds and bytes add up). Only moves with saved > 0 that
push no other resource over its budget are considered; ties go to the larger saving, then the
lower (layer, candidate). A replaced layer can be replaced again (by a cheaper variant). It
stops the moment every budget is met: no second pass spends the slack, that is the
difference with the MIP, which optimises the whole assignment at once. Every move lowers the
weighted overrun of a set of exceeded resources that never grows, so the loop ends; with one
budget it reaches feasibility whenever the all-cheapest choice is feasible.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from .problem import InfeasibleBudgetError, MIPProblem, Solution


def greedy(problem: MIPProblem, start: Sequence[int] | None = None, *, trace: list | None = None,
           max_moves: int | None = None) -> Solution:
    """Greedy replacements from `start` until the budgets are met (see the module docstring).

    trace: when a list, each move is appended as {"layer", "from", "to", "score_increase",
    "saved", "ratio"} (candidate indices). Raises InfeasibleBudgetError (one line) when no
    move can reduce the overrun any further."""
    t0 = time.perf_counter()
    L = problem.num_layers
    offsets = problem.offsets
    layer_of = np.repeat(np.arange(L), problem.num_candidates)
    scores = problem.flat_scores
    if start is None:
        start = [int(np.argmin(s)) for s in problem.scores]
    cur = np.asarray(start, dtype=np.int64)
    if cur.shape != (L,) or np.any(cur < 0) or np.any(cur >= problem.num_candidates):
        raise ValueError(f"start must hold one valid candidate index per layer ({L} layers), got {list(start)}")
    res = problem.constrained
    budgets = np.array([problem.budgets[r] for r in res], dtype=np.float64)
    tol = np.array([problem.tolerance(r) for r in res], dtype=np.float64)
    scale = np.array([problem.scale(r) for r in res], dtype=np.float64)
    C = np.stack([problem.flat_costs[r] for r in res]) if res else np.zeros((0, len(scores)))
    limit = max_moves if max_moves is not None else 4 * int(problem.num_candidates.sum()) + 4
    moves = 0
    while True:
        flat_cur = offsets[:-1] + cur
        totals = np.array([math.fsum(C[k, flat_cur].tolist()) for k in range(len(res))])
        over = totals > budgets + tol
        if not over.any():
            break
        if moves >= limit:
            raise InfeasibleBudgetError(f"greedy: no feasible choice after {moves} moves (budgets "
                                        f"{dict(zip(res, budgets.tolist()))})", budgets=problem.budgets)
        base = flat_cur[layer_of]                    # the current choice of each candidate's layer
        delta = C[:, base] - C                        # cost saved per resource by switching to it
        saved = (delta[over] / scale[over, None]).sum(axis=0)
        new_totals = totals[:, None] - delta
        ok_other = np.all(new_totals[~over] <= (budgets + tol)[~over, None], axis=0)
        ok = (saved > 0) & ok_other & (np.arange(len(scores)) != base)
        if not ok.any():
            least = {r: float(t) for r, t, o in zip(res, totals, over) if o}
            raise InfeasibleBudgetError(
                f"greedy: no single-layer replacement lowers the overrun of {sorted(least)} any further "
                f"(stuck at {least}, budgets { {r: float(b) for r, b, o in zip(res, budgets, over) if o} })",
                budgets=problem.budgets)
        dscore = scores - scores[base]
        ratio = np.where(ok, dscore / np.where(ok, saved, 1.0), np.inf)
        # lexsort: last key is primary -> ratio, then larger saving, then lower flat index
        order = np.lexsort((np.arange(len(scores)), -np.where(ok, saved, -np.inf), ratio))
        j = int(order[0])
        l = int(layer_of[j])
        if trace is not None:
            trace.append({"layer": l, "from": int(cur[l]), "to": int(j - offsets[l]),
                          "score_increase": float(dscore[j]), "saved": float(saved[j]), "ratio": float(ratio[j])})
        cur[l] = j - offsets[l]
        moves += 1
    choice = tuple(int(c) for c in cur)
    objective, tot = problem.evaluate(choice)
    names = None
    if problem.candidate_names is not None:
        names = tuple(problem.candidate_names[l][v] for l, v in enumerate(choice))
    return Solution(choice, objective, tot, budgets=dict(problem.budgets), solver="greedy",
                    reason=f"greedy: {moves} replacement(s), best score increase per cost saved",
                    status="heuristic", gap=math.nan, bound=-math.inf, solve_time_s=time.perf_counter() - t0,
                    num_vars=int(problem.offsets[-1]), num_constraints=L + len(res), names=names)
