"""The Puzzle MIP with multi-layer replacements (FFN Fusion runs, arXiv 2503.18908).

A candidate covers a run of consecutive layers [first, last] (a single-layer candidate is the
case first == last); an architecture is a tiling: exactly one chosen candidate covers each
layer. Binary x[c]; rows: for every layer l, sum of x[c] over the candidates covering l = 1;
for every budgeted resource r, sum_c cost[r][c] x[c] <= budget[r] (scaled like problem.py's
budget rows); minimise sum_c score[c] x[c]. Without budget rows the layer rows form an interval
matrix (totally unimodular), so the LP is already integral; the budgets are what makes it a MIP.

`fusion_max_run == 1` (the default) never comes here: `RunProblem.from_layer_problem` with no
run candidates is only used by the tests that check both formulations agree.
Both HiGHS and Gurobi (within the restricted licence's size) solve it; the model is a few
hundred columns at most, so neither needs problem.py's LP-guided core.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .problem import FEAS_RTOL, InfeasibleBudgetError, MIPError, MIPProblem, beaten_counts
from .solvers import FEAS_TOL, _gurobi_env, choose_solver, gurobi_optimize


@dataclass(frozen=True)
class RunCandidate:
    """One replacement covering layers first..last (inclusive)."""

    first: int
    last: int
    score: float
    """Quality loss (lower is better), e.g. replace-the-run KL."""
    costs: Mapping[str, float]
    """Per resource (runtime_s, memory_bytes, ...): its total over the covered layers."""
    name: str = ""


@dataclass
class RunSolution:
    """A tiling: the chosen candidates in layer order."""

    choice: tuple[int, ...]
    """Indices into RunProblem.candidates, in layer order (empty when infeasible)."""
    objective: float
    totals: dict[str, float]
    budgets: dict[str, float]
    solver: str
    reason: str
    status: str
    """"optimal", "time_limit" or "infeasible"."""
    solve_time_s: float
    num_vars: int
    num_pruned: int
    names: tuple[str, ...] = ()

    @property
    def feasible(self) -> bool:
        return self.status != "infeasible"

    def spans(self, problem: "RunProblem") -> list[tuple[int, int]]:
        return [(problem.candidates[c].first, problem.candidates[c].last) for c in self.choice]


@dataclass
class RunProblem:
    """Candidates over runs of layers, budgets; see the module docstring."""

    num_layers: int
    candidates: Sequence[RunCandidate]
    budgets: Mapping[str, float] = field(default_factory=dict)
    max_run: int | None = None
    """Drop candidates longer than this many layers (None: keep all)."""

    def __post_init__(self):
        L = int(self.num_layers)
        if L < 1:
            raise ValueError("a RunProblem needs at least one layer")
        cands = [c for c in self.candidates if self.max_run is None or c.last - c.first + 1 <= self.max_run]
        if not cands:
            raise ValueError("no candidates")
        resources = tuple(cands[0].costs)
        for k, c in enumerate(cands):
            if not (0 <= c.first <= c.last < L):
                raise ValueError(f"candidate {k} ({c.name or 'unnamed'}) covers [{c.first}, {c.last}] outside 0..{L - 1}")
            if tuple(c.costs) != resources:
                raise ValueError(f"candidate {k} has resources {sorted(c.costs)}, expected {sorted(resources)}")
            if not all(math.isfinite(v) for v in (c.score, *c.costs.values())):
                raise ValueError(f"candidate {k} ({c.name or 'unnamed'}) has a non-finite score or cost")
        reach = [True] + [False] * L  # reach[l]: some tiling covers layers 0..l-1 exactly
        for c in sorted(cands, key=lambda c: c.first):
            if reach[c.first]:
                reach[c.last + 1] = True
        if not reach[L]:
            raise ValueError(f"the candidates admit no tiling of the {L} layers (no way to cover them all, "
                             f"each exactly once); give every layer a single-layer candidate")
        for r, b in dict(self.budgets).items():
            if r not in resources:
                raise ValueError(f"budget for unknown resource {r!r}; candidates have {sorted(resources)}")
            if not math.isfinite(float(b)):
                raise ValueError(f"budget[{r!r}] must be finite")
        self.num_layers = L
        self.candidates = tuple(cands)
        self.resources = resources
        self.budgets = {r: float(b) for r, b in self.budgets.items()}
        self.first = np.array([c.first for c in cands], dtype=np.int64)
        self.last = np.array([c.last for c in cands], dtype=np.int64)
        self.scores = np.array([c.score for c in cands], dtype=np.float64)
        self.cost = {r: np.array([c.costs[r] for c in cands], dtype=np.float64) for r in resources}
        # a resource's natural size: over layers, the largest per-layer share of any covering candidate
        self._scale = {}
        lens = (self.last - self.first + 1).astype(np.float64)
        for r in resources:
            per = np.zeros(L)
            share = np.abs(self.cost[r]) / lens
            for k in range(len(cands)):
                seg = slice(self.first[k], self.last[k] + 1)
                per[seg] = np.maximum(per[seg], share[k])
            s = math.fsum(per.tolist())
            self._scale[r] = s if s > 0 else 1.0

    @classmethod
    def from_layer_problem(cls, problem: MIPProblem, runs: Sequence[RunCandidate] = (),
                           max_run: int | None = None) -> "RunProblem":
        """Every per-layer candidate of a MIPProblem (as a one-layer run) plus `runs`."""
        names = problem.candidate_names
        cands = [RunCandidate(l, l, float(problem.scores[l][v]), {r: float(problem.costs[r][l][v]) for r in problem.costs},
                              names[l][v] if names else f"{l}:{v}")
                 for l in range(problem.num_layers) for v in range(problem.num_candidates[l])]
        return cls(problem.num_layers, cands + list(runs), problem.budgets, max_run)

    @property
    def constrained(self) -> tuple[str, ...]:
        return tuple(r for r in self.resources if r in self.budgets)

    def scale(self, r: str) -> float:
        return self._scale[r]

    def tolerance(self, r: str, budget: float | None = None) -> float:
        b = self.budgets[r] if budget is None else budget
        return FEAS_RTOL * max(abs(b), self.scale(r))

    def is_tiling(self, choice: Sequence[int]) -> bool:
        at = 0
        for c in choice:
            if self.first[c] != at:
                return False
            at = int(self.last[c]) + 1
        return at == self.num_layers

    def evaluate(self, choice: Sequence[int]) -> tuple[float, dict[str, float]]:
        """Exact (fsum) objective and totals of a tiling."""
        if not self.is_tiling(choice):
            raise ValueError(f"choice {tuple(choice)} does not tile the {self.num_layers} layers")
        idx = np.asarray(choice, dtype=np.int64)
        return (math.fsum(self.scores[idx].tolist()),
                {r: math.fsum(c[idx].tolist()) for r, c in self.cost.items()})

    def violations(self, totals: Mapping[str, float]) -> dict[str, float]:
        return {r: totals[r] - b for r, b in self.budgets.items() if totals[r] > b + self.tolerance(r, b)}

    # -- the solver matrix ---------------------------------------------------------------------
    def prune_mask(self) -> np.ndarray:
        """Keep a candidate unless another of the same span beats it (score and every budgeted
        cost no worse, one strictly better, or identical with a lower index): exact for one solve."""
        keys = sorted(set(zip(self.first.tolist(), self.last.tolist())))
        group = {k: i for i, k in enumerate(keys)}
        gid = np.array([group[k] for k in zip(self.first.tolist(), self.last.tolist())])
        counts = np.bincount(gid, minlength=len(keys))
        M = int(counts.max())
        cols = [self.scores] + [self.cost[r] for r in self.constrained]
        feats = np.full((len(keys), M, len(cols)), np.inf)
        valid = np.zeros((len(keys), M), dtype=bool)
        slot = np.zeros(len(gid), dtype=np.int64)
        seen = np.zeros(len(keys), dtype=np.int64)
        for k, g in enumerate(gid):
            slot[k] = seen[g]
            seen[g] += 1
        feats[gid, slot] = np.stack(cols, axis=1)
        valid[gid, slot] = True
        return beaten_counts(feats, valid)[gid, slot] < 1

    def matrix(self, keep: np.ndarray):
        """(cols, A dense, lower, upper, obj): layer rows (= 1) then scaled budget rows (<=)."""
        cols = np.nonzero(keep)[0]
        L, R = self.num_layers, len(self.constrained)
        A = np.zeros((L + R, len(cols)))
        layer = np.arange(L)[:, None]
        A[:L] = (layer >= self.first[cols][None, :]) & (layer <= self.last[cols][None, :])
        scale = np.array([self.scale(r) for r in self.constrained])
        for k, r in enumerate(self.constrained):
            A[L + k] = self.cost[r][cols] / scale[k]
        lower = np.concatenate([np.ones(L), np.full(R, -np.inf)])
        upper = np.concatenate([np.ones(L), [self.budgets[r] / scale[k] for k, r in enumerate(self.constrained)]])
        return cols, A, lower, upper, self.scores[cols]


def _highs(A, lower, upper, obj, time_limit, verbose):
    import highspy
    h = highspy.Highs()
    h.setOptionValue("output_flag", bool(verbose))
    h.setOptionValue("presolve", "on")
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 0.0)
    h.setOptionValue("mip_feasibility_tolerance", FEAS_TOL)
    h.setOptionValue("primal_feasibility_tolerance", FEAS_TOL)
    h.setOptionValue("time_limit", math.inf if time_limit is None else float(time_limit))
    n, m = A.shape[1], A.shape[0]
    rows, cols = np.nonzero(A.T)  # column-wise: (col, row) pairs sorted by column
    start = np.searchsorted(rows, np.arange(n + 1)).astype(np.int32)
    index = cols.astype(np.int32)
    value = A.T[rows, cols]
    st = h.passModel(n, m, len(index), 1, 1, 0.0, obj, np.zeros(n), np.ones(n), lower, upper, start, index, value,
                     np.ones(n, dtype=np.int32))
    if st != highspy.HighsStatus.kOk:
        raise MIPError(f"highs: passModel failed ({st})")
    h.run()
    MS, info = highspy.HighsModelStatus, h.getInfo()
    status = h.getModelStatus()
    if status in (MS.kInfeasible, MS.kUnboundedOrInfeasible):
        return "infeasible", None
    if status == MS.kOptimal:
        return "optimal", np.asarray(h.getSolution().col_value)
    if info.primal_solution_status == 2:
        return "time_limit", np.asarray(h.getSolution().col_value)
    raise MIPError(f"highs: solve ended with status {h.modelStatusToString(status)}")


def _gurobi(A, lower, upper, obj, time_limit, verbose):
    import gurobipy as gp
    m = gp.Model(env=_gurobi_env())
    m.Params.OutputFlag = int(bool(verbose))
    m.Params.MIPGap = 0.0
    m.Params.MIPGapAbs = 0.0
    m.Params.FeasibilityTol = FEAS_TOL
    m.Params.IntFeasTol = FEAS_TOL
    m.Params.TimeLimit = math.inf if time_limit is None else float(time_limit)
    x = m.addMVar(A.shape[1], vtype=gp.GRB.BINARY, obj=obj)
    m.addMConstr(A, x, np.where(np.isfinite(lower), "=", "<"), upper)
    gurobi_optimize(m)
    S = gp.GRB.Status
    if m.Status in (S.INFEASIBLE, S.INF_OR_UNBD):
        return "infeasible", None
    if m.SolCount > 0 and m.Status in (S.OPTIMAL, S.TIME_LIMIT, S.INTERRUPTED):
        return ("optimal" if m.Status == S.OPTIMAL else "time_limit"), np.asarray(x.X)
    raise MIPError(f"gurobi: solve ended with status {m.Status}")


def solve_runs(problem: RunProblem, solver: str = "auto", time_limit: float | None = None, *,
               prune: bool = True, verbose: bool = False) -> RunSolution:
    """The optimal tiling under the budgets; InfeasibleBudgetError when none fits."""
    t = time.perf_counter()
    keep = problem.prune_mask() if prune else np.ones(len(problem.candidates), dtype=bool)
    cols, A, lower, upper, obj = problem.matrix(keep)
    name, reason = choose_solver(solver, A.shape[1], A.shape[0])
    status, x = (_gurobi if name == "gurobi" else _highs)(A, lower, upper, obj, time_limit, verbose)
    secs = time.perf_counter() - t
    common = dict(budgets=dict(problem.budgets), solver=name, reason=reason, solve_time_s=secs,
                  num_vars=len(cols), num_pruned=int((~keep).sum()))
    if status == "infeasible":
        least = {r: _least_total(problem, r) for r in problem.constrained}
        binding = [r for r in problem.constrained if problem.budgets[r] < least[r] - problem.tolerance(r)]
        msg = "; ".join(f"{r} budget {problem.budgets[r]:.6g} is below the least achievable {least[r]:.6g}"
                        for r in binding) or "the budgets are each achievable alone but not together"
        raise InfeasibleBudgetError(f"infeasible: {msg}", budgets=problem.budgets, least_alone=least, binding=binding)
    chosen = cols[np.nonzero(x > 0.5)[0]]
    choice = tuple(int(c) for c in chosen[np.argsort(problem.first[chosen])])
    if not problem.is_tiling(choice):
        raise MIPError(f"{name} returned a selection that does not tile the layers: {choice}")
    objective, totals = problem.evaluate(choice)
    over = {r: totals[r] - b for r, b in problem.budgets.items() if totals[r] > b + 10 * problem.tolerance(r, b)}
    if over:
        raise MIPError(f"{name} returned a choice over budget by {over}")
    return RunSolution(choice, objective, totals, status=status, names=tuple(problem.candidates[c].name for c in choice),
                       **common)


def _least_total(problem: RunProblem, r: str) -> float:
    """Least achievable total of one resource over all tilings (shortest path over layer boundaries)."""
    best = np.full(problem.num_layers + 1, np.inf)
    best[0] = 0.0
    order = np.argsort(problem.first, kind="stable")
    for k in order:  # candidates by start: best[first] is final once every earlier start is done
        f, l = int(problem.first[k]), int(problem.last[k])
        best[l + 1] = min(best[l + 1], best[f] + problem.cost[r][k])
    return float(best[-1])
