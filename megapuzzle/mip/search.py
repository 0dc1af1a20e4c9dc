"""Searches built on the MIP core: diverse candidates, budget sweeps, the batch-size loop.

Each reuses one loaded model where it can: diversity appends a cut row per solution, the
sweep only changes one row bound between points, so neither re-prunes nor rebuilds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

from .problem import Cut, InfeasibleBudgetError, MIPProblem, Solution
from .solvers import MIPSession, diagnose_infeasible

TIE_RTOL = 1e-12  # objectives this close are ties in the batch-size loop


def max_shared(num_layers: int, alpha: float) -> int:
    """Layers a diverse solution may share with each earlier one: floor(alpha*L), capped at L-1
    so that every solution differs from every earlier one in at least one layer."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return min(math.floor(alpha * num_layers + 1e-9), num_layers - 1)


def solve_diverse(problem: MIPProblem, n: int, alpha: float, solver: str = "auto",
                  time_limit: float | None = None, cuts: Sequence[Cut] = (), *,
                  verbose: bool = False, mip_gap: float = 0.0) -> list[Solution]:
    """Up to n distinct solutions, best first; solution k shares at most max_shared(L, alpha)
    layer choices with EACH earlier one (cut: sum_l x[l, v_l^(j)] <= floor(alpha*L) for every
    earlier j). Stops early when the cuts leave nothing feasible; raises InfeasibleBudgetError
    only if even the first solve is infeasible. Each solution is optimal given the cuts."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    share = max_shared(problem.num_layers, alpha)
    # levels=n keeps candidates beaten by fewer than n others: exact under n-1 diversity cuts.
    session = MIPSession(problem, solver, cuts, verbose=verbose, mip_gap=mip_gap, levels=n, extra_rows=n - 1)
    out: list[Solution] = []
    for k in range(n):
        sol = session.solve(time_limit)
        if not sol.feasible:
            if k == 0:
                raise diagnose_infeasible(problem, cuts, solver=solver)
            break
        out.append(sol)
        if k < n - 1:
            session.add_cut(Cut(tuple(enumerate(sol.choice)), share))
    return out


def pareto_sweep(problem: Union[MIPProblem, Callable[[float], MIPProblem]], resource: str,
                 budgets: Sequence[float], solver: str = "auto", time_limit: float | None = None,
                 cuts: Sequence[Cut] = (), *, verbose: bool = False, mip_gap: float = 0.0,
                 warm_start: bool = True) -> list[Solution]:
    """Objective vs budget of one resource: one Solution per entry of `budgets`, same order.

    With a MIPProblem the model is pruned and loaded once (the resource gets a budget row if
    it had none) and only that row's bound changes between points; points are solved in
    ascending budget order so each previous optimum is a feasible warm start. With a
    callable builder(budget) -> MIPProblem each point is built and solved afresh. Infeasible
    points come back as Solutions with status "infeasible" (no exception).
    """
    budgets = [float(b) for b in budgets]
    if not budgets:
        return []
    if callable(problem) and not isinstance(problem, MIPProblem):
        out = []
        for b in budgets:
            sess = MIPSession(problem(b), solver, cuts, verbose=verbose, mip_gap=mip_gap)
            out.append(sess.solve(time_limit))
        return out
    if resource not in problem.costs:
        raise ValueError(f"unknown resource {resource!r}; costs have {sorted(problem.costs)}")
    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    session = MIPSession(problem.with_budgets({resource: budgets[order[0]]}), solver, cuts,
                         verbose=verbose, mip_gap=mip_gap)
    out: list[Solution | None] = [None] * len(budgets)
    prev = None
    for i in order:
        session.set_budget(resource, budgets[i])
        sol = session.solve(time_limit, start=prev if warm_start else None)
        if sol.feasible:
            prev = sol.choice
        out[i] = sol
    return out  # type: ignore[return-value]


@dataclass
class BatchRow:
    """One batch size of the batch-size loop."""

    batch_size: int
    """The batch size the problem was built for."""
    solution: Solution | None
    """Its optimum, or None when infeasible."""
    throughput: float | None
    """throughput(batch_size, solution) (tie-breaker), None when infeasible."""
    error: str | None = None
    """The infeasibility diagnosis, when infeasible."""


@dataclass
class BatchSearchResult:
    """Result of solve_over_batches: the winner and the whole table."""

    best: Solution
    """Lowest objective over all batch sizes; ties go to the higher throughput."""
    best_batch_size: int
    """Batch size of `best`."""
    table: list[BatchRow] = field(default_factory=list)
    """Every batch size in the order given."""

    def format_table(self) -> str:
        lines = ["| batch | status | objective | throughput | solver | solve s |",
                 "|---:|---|---:|---:|---|---:|"]
        for row in self.table:
            s = row.solution
            if s is None:
                lines.append(f"| {row.batch_size} | infeasible | - | - | - | - |")
            else:
                mark = " (best)" if row.batch_size == self.best_batch_size else ""
                lines.append(f"| {row.batch_size} | {s.status}{mark} | {s.objective:.6g} | "
                             f"{row.throughput:.6g} | {s.solver} | {s.solve_time_s:.3f} |")
        return "\n".join(lines)


def default_throughput(runtime_resource: str = "runtime_s") -> Callable[[int, Solution], float]:
    """batch_size / summed runtime (sequences/s; x seq_len = tokens/s); batch size if no runtime."""
    def throughput(batch_size: int, sol: Solution) -> float:
        rt = sol.totals.get(runtime_resource)
        return batch_size / rt if rt and rt > 0 else float(batch_size)
    return throughput


def solve_over_batches(build_problem: Callable[[int], MIPProblem], batch_sizes: Sequence[int],
                       solver: str = "auto", time_limit: float | None = None, cuts: Sequence[Cut] = (), *,
                       throughput: Callable[[int, Solution], float] | None = None,
                       verbose: bool = False, mip_gap: float = 0.0) -> BatchSearchResult:
    """Re-solve for each batch size (costs and budgets depend on it: KV-cache memory, per-batch
    runtime, the throughput row b*s/T) and keep the lowest objective; ties -> higher throughput.
    Raises InfeasibleBudgetError, naming every batch size's diagnosis, if none is feasible."""
    tp = throughput or default_throughput()
    table: list[BatchRow] = []
    for b in batch_sizes:
        problem = build_problem(b)
        sol = MIPSession(problem, solver, cuts, verbose=verbose, mip_gap=mip_gap).solve(time_limit)
        if sol.feasible:
            table.append(BatchRow(int(b), sol, float(tp(b, sol))))
        else:
            err = diagnose_infeasible(problem, cuts, solver=solver)
            table.append(BatchRow(int(b), None, None, str(err)))
    feasible = [r for r in table if r.solution is not None]
    if not feasible:
        detail = "; ".join(f"[batch {r.batch_size}] {r.error.removeprefix('infeasible: ')}" for r in table)
        raise InfeasibleBudgetError(f"infeasible at every batch size: {detail}")
    best = feasible[0]
    for row in feasible[1:]:
        a, c = row.solution.objective, best.solution.objective
        tie = abs(a - c) <= TIE_RTOL * max(1.0, abs(a), abs(c))
        if (not tie and a < c) or (tie and row.throughput > best.throughput):
            best = row
    return BatchSearchResult(best.solution, best.batch_size, table)
