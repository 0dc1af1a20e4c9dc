"""MIP data model: the problem, its solution, errors, dominance pruning and the solver matrix.

The Puzzle MIP (stage 6, arXiv 2411.19146): binary x[l, v] picks candidate v at layer l,
exactly one per layer, minimising the summed scores subject to `sum_l cost[r][l][v_l] <=
budget[r]` for every constrained resource r. Everything here is solver-independent numpy;
`solvers.py` hands the compiled arrays to HiGHS or Gurobi.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

# A budget row counts as met when the exact total exceeds it by at most this fraction of
# max(|budget|, the row's scale). Solvers are run with the same tolerance on scaled rows, so
# what they accept we accept, and nothing looser.
FEAS_RTOL = 1e-9


class MIPError(RuntimeError):
    """The MIP could not be solved (solver failure, time limit without any solution, ...)."""


class InfeasibleBudgetError(MIPError):
    """No architecture meets the budgets. The message is one line naming the binding budgets."""

    def __init__(self, message: str, *, budgets: Mapping[str, float] | None = None,
                 least_alone: Mapping[str, float] | None = None,
                 least_with_others: Mapping[str, float | None] | None = None,
                 binding: Sequence[str] = ()):
        super().__init__(message)
        #: the budgets that were asked for
        self.budgets = dict(budgets or {})
        #: per resource: the least achievable total ignoring every other budget
        self.least_alone = dict(least_alone or {})
        #: per resource: the least achievable total under the other budgets (None: the
        #: other budgets are infeasible among themselves)
        self.least_with_others = dict(least_with_others or {})
        #: resources whose budget is below what is achievable (empty: only the combination fails)
        self.binding = tuple(binding)


class SolverLicenceError(MIPError):
    """Gurobi was forced on a model larger than the restricted (size-limited) licence allows."""


def _as_layers(name: str, data, num_layers: int | None) -> tuple[np.ndarray, ...]:
    """Normalise a per-layer ragged table (list of 1-D arrays or a 2-D array) to float64."""
    if isinstance(data, np.ndarray) and data.ndim == 2:
        data = list(data)
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise ValueError(f"{name}: expected one sequence of candidate values per layer")
    layers = []
    for l, row in enumerate(data):
        if isinstance(row, np.ndarray) and row.dtype == np.float64 and row.ndim == 1 and not row.flags.writeable:
            a = row  # frozen already (e.g. by another MIPProblem): share it, still check it below
        else:
            a = np.array(row, dtype=np.float64).reshape(-1) if np.ndim(row) <= 1 else None
        if a is None:
            raise ValueError(f"{name}[{l}]: expected a 1-D sequence, got shape {np.shape(row)}")
        if a.size == 0:
            raise ValueError(f"{name}[{l}]: layer {l} has no candidates")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name}[{l}]: non-finite value(s) {a[~np.isfinite(a)][:3].tolist()}")
        if a.flags.writeable:
            a.flags.writeable = False
        layers.append(a)
    if not layers:
        raise ValueError(f"{name}: no layers")
    if num_layers is not None and len(layers) != num_layers:
        raise ValueError(f"{name}: {len(layers)} layers, expected {num_layers}")
    return tuple(layers)


@dataclass(frozen=True)
class Cut:
    """An extra row: at most `max_selected` of the listed (layer, candidate) pairs may be chosen.

    Diversity cuts are of this shape; a caller can also forbid a pair (max_selected=0) or
    cap how many layers keep a given block kind.
    """

    pairs: tuple[tuple[int, int], ...]
    """(layer, candidate) pairs in the problem's original candidate indices; duplicates ignored."""
    max_selected: int
    """Right-hand side of the row `sum x[pair] <= max_selected`."""

    def __post_init__(self):
        pairs = tuple(sorted({(int(l), int(v)) for l, v in self.pairs}))
        object.__setattr__(self, "pairs", pairs)
        if int(self.max_selected) != self.max_selected or self.max_selected < 0:
            raise ValueError(f"Cut.max_selected must be a non-negative integer, got {self.max_selected}")
        object.__setattr__(self, "max_selected", int(self.max_selected))


@dataclass
class MIPProblem:
    """One Puzzle MIP instance: per-layer candidate scores and costs, plus budgets.

    Candidate counts may differ between layers (ragged). Inputs are copied to read-only
    float64 arrays; flattened views (`offsets`, `flat_scores`, `flat_costs`) are built once.
    """

    scores: Sequence[Sequence[float]]
    """scores[l][v]: quality loss of candidate v at layer l (lower is better, e.g. KL)."""
    costs: Mapping[str, Sequence[Sequence[float]]]
    """costs[r][l][v]: resource r of candidate v at layer l ("runtime_s", "memory_bytes", ...)."""
    budgets: Mapping[str, float] = field(default_factory=dict)
    """Upper bound on sum_l costs[r][l][v_l] per constrained resource (offsets already removed).
    Resources in `costs` without a budget are only reported in Solution.totals."""
    candidate_names: Sequence[Sequence[str]] | None = None
    """Optional names, candidate_names[l][v], echoed in Solution.names."""
    name: str = ""
    """Free-form label for logs and benchmark tables."""

    offsets: np.ndarray = field(init=False, repr=False)
    """Candidates of layer l are flat indices offsets[l]:offsets[l+1]."""
    flat_scores: np.ndarray = field(init=False, repr=False)
    """All scores, layer after layer."""
    flat_costs: dict[str, np.ndarray] = field(init=False, repr=False)
    """All costs per resource, layer after layer."""

    def __post_init__(self):
        self.scores = _as_layers("scores", self.scores, None)
        L = len(self.scores)
        counts = np.array([len(s) for s in self.scores])
        if not isinstance(self.costs, Mapping):
            raise ValueError("costs: expected a mapping resource name -> per-layer costs")
        costs = {}
        for r, table in self.costs.items():
            if not isinstance(r, str) or not r:
                raise ValueError(f"costs: resource names must be non-empty strings, got {r!r}")
            table = _as_layers(f"costs[{r!r}]", table, L)
            bad = [l for l in range(L) if len(table[l]) != counts[l]]
            if bad:
                l = bad[0]
                raise ValueError(f"costs[{r!r}][{l}] has {len(table[l])} candidates, scores[{l}] has {counts[l]}")
            costs[r] = table
        self.costs = costs
        budgets = {}
        for r, b in dict(self.budgets).items():
            if r not in costs:
                raise ValueError(f"budget for unknown resource {r!r}; costs have {sorted(costs)}")
            try:
                b = float(b)
            except (TypeError, ValueError):
                raise ValueError(f"budget[{r!r}] must be a number, got {b!r}") from None
            if not math.isfinite(b):
                raise ValueError(f"budget[{r!r}] must be finite, got {b} (omit it to leave {r} unconstrained)")
            budgets[r] = b
        self.budgets = budgets
        if self.candidate_names is not None:
            names = [list(map(str, n)) for n in self.candidate_names]
            if len(names) != L or any(len(n) != c for n, c in zip(names, counts)):
                raise ValueError("candidate_names must have the same per-layer shape as scores")
            self.candidate_names = names
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.flat_scores = np.concatenate(self.scores)
        self.flat_costs = {r: np.concatenate(t) for r, t in costs.items()}
        self._scales = {}
        for r, c in self.flat_costs.items():
            sc = math.fsum(np.maximum.reduceat(np.abs(c), self.offsets[:-1]).tolist())
            self._scales[r] = sc if sc > 0 else 1.0

    # -- shape -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.scores)

    @property
    def num_candidates(self) -> np.ndarray:
        """Candidates per layer (before pruning)."""
        return np.diff(self.offsets)

    @property
    def resources(self) -> tuple[str, ...]:
        return tuple(self.costs)

    @property
    def constrained(self) -> tuple[str, ...]:
        """Resources with a budget, in `costs` order (the budget rows' order)."""
        return tuple(r for r in self.costs if r in self.budgets)

    def with_budgets(self, budgets: Mapping[str, float], replace_all: bool = False) -> "MIPProblem":
        """A copy with budgets updated (or replaced entirely); the frozen arrays are shared."""
        new = dict(budgets) if replace_all else {**self.budgets, **budgets}
        return replace(self, budgets=new)

    # -- evaluation --------------------------------------------------------------------------
    def scale(self, r: str) -> float:
        """Natural size of resource r: sum over layers of the largest |cost| (1 if all zero)."""
        return self._scales[r]

    def tolerance(self, r: str, budget: float | None = None) -> float:
        b = self.budgets[r] if budget is None else budget
        return FEAS_RTOL * max(abs(b), self.scale(r))

    def evaluate(self, choice: Sequence[int]) -> tuple[float, dict[str, float]]:
        """Exact (fsum) objective and per-resource totals of a choice (one index per layer)."""
        if len(choice) != self.num_layers:
            raise ValueError(f"choice has {len(choice)} entries for {self.num_layers} layers")
        idx = self.offsets[:-1] + np.asarray(choice, dtype=np.int64)
        # fsum is exactly rounded, so totals do not depend on summation order: a budget set
        # to a reported total is met by the same choice however anyone re-adds it.
        obj = math.fsum(self.flat_scores[idx].tolist())
        return obj, {r: math.fsum(c[idx].tolist()) for r, c in self.flat_costs.items()}

    def violations(self, totals: Mapping[str, float], budgets: Mapping[str, float] | None = None) -> dict[str, float]:
        """Budget overruns beyond tolerance, {resource: total - budget}."""
        budgets = self.budgets if budgets is None else budgets
        return {r: totals[r] - b for r, b in budgets.items() if totals[r] > b + self.tolerance(r, b)}


@dataclass
class Solution:
    """One solved MIP: the chosen candidate per layer and how it was obtained."""

    choice: tuple[int, ...]
    """Original candidate index per layer (empty when infeasible)."""
    objective: float
    """Exact sum of the chosen scores (inf when infeasible)."""
    totals: dict[str, float]
    """Exact per-resource sums of the chosen costs, for every resource in the problem."""
    budgets: dict[str, float]
    """The budgets this solution was solved under."""
    solver: str
    """"highs" or "gurobi"."""
    reason: str
    """Why that solver was used (auto selection, forced, licence fallback)."""
    status: str
    """"optimal", "time_limit" (feasible, gap may be > 0) or "infeasible"."""
    gap: float
    """Relative gap |objective - bound| / max(|objective|, 1e-12) as proven by the solver."""
    bound: float
    """Solver's proven lower bound on the objective."""
    solve_time_s: float
    """Wall time of the solver call(s) for this solution (excludes pruning/matrix build)."""
    build_time_s: float = 0.0
    """Wall time of pruning + matrix build + model load (0 when the model was reused)."""
    num_vars: int = 0
    """Binary variables after dominance pruning."""
    num_constraints: int = 0
    """Rows: one per layer + one per budget + cuts."""
    num_pruned: int = 0
    """Candidates dropped as dominated before the build."""
    names: tuple[str, ...] | None = None
    """candidate_names of the choice, when the problem has names."""

    @property
    def feasible(self) -> bool:
        return self.status != "infeasible"

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


# -- dominance pruning ---------------------------------------------------------------------

def beaten_counts(features: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """For padded per-layer candidates, how many candidates of the same layer beat each one.

    features: (L, M, K) values where lower is better in every column; valid: (L, M) mask.
    i beats j when i is no worse in every feature and strictly better in one, or identical to
    j with a lower index (so exact ties keep the first candidate, deterministically). This is
    a strict partial order, so every layer keeps at least one unbeaten candidate.
    """
    L, M, K = features.shape
    out = np.zeros((L, M), dtype=np.int64)
    idx = np.arange(M)
    lower_index = idx[:, None] < idx[None, :]
    chunk = max(1, int(4e6 // max(1, M * M)))  # bounds the (chunk, M, M) temporaries
    for a in range(0, L, chunk):
        F = features[a:a + chunk]
        # One feature at a time: K small 3-D ops beat a 4-D broadcast reduced over a tiny axis.
        le = valid[a:a + chunk, :, None] & valid[a:a + chunk, None, :]
        lt_any = np.zeros_like(le)
        for k in range(K):
            fi, fj = F[:, :, None, k], F[:, None, :, k]
            le &= fi <= fj
            lt_any |= fi < fj
        beats = le & (lt_any | lower_index)  # le & ~lt_any is exact equality: lower index wins
        out[a:a + chunk] = beats.sum(axis=1)
    return out


def prune_mask(problem: MIPProblem, resources: Sequence[str], cuts: Sequence[Cut] = (),
               levels: int = 1) -> np.ndarray:
    """Flat boolean mask of candidates to keep.

    A candidate beaten (see `beaten_counts`) by `levels` or more others is dropped. levels=1
    is plain Pareto pruning and exact for a single solve. For n diverse solutions use
    levels=n: each later solution is only penalised on the <= n-1 candidates per layer that
    earlier ones chose, so a candidate with >= n beaters always has an unpenalised beater to
    swap in at no loss. Cut membership counts as a cost so cuts cannot make pruning unsafe.
    """
    L, counts = problem.num_layers, problem.num_candidates
    M = int(counts.max())
    cols = [problem.flat_scores] + [problem.flat_costs[r] for r in resources]
    for cut in cuts:
        member = np.zeros(problem.offsets[-1])
        for l, v in cut.pairs:
            member[problem.offsets[l] + v] = 1.0
        cols.append(member)
    flat = np.stack(cols, axis=1)  # (N, K)
    feats = np.full((L, M, flat.shape[1]), np.inf)
    valid = np.arange(M)[None, :] < counts[:, None]
    feats[valid] = flat  # row-major fill of the valid slots matches the flat layer order
    keep = beaten_counts(feats, valid) < levels
    return keep[valid]


# -- compiled solver arrays ------------------------------------------------------------------

@dataclass
class CompiledModel:
    """The pruned problem as solver-ready arrays. Rows: layers, then budgets, then cuts.

    Budget rows are divided by the resource scale so that the solvers' absolute feasibility
    tolerance means the same relative slack (FEAS_RTOL) for seconds and for bytes.
    """

    problem: MIPProblem
    """The source problem (original indices, exact evaluation)."""
    resources: tuple[str, ...]
    """Constrained resources, one budget row each, in row order."""
    budgets: dict[str, float]
    """Budgets the rows currently encode (unscaled)."""
    cols: np.ndarray
    """Flat original index of each kept column; columns are grouped by layer."""
    col_layer: np.ndarray
    """Layer of each column."""
    offsets: np.ndarray
    """Columns of layer l are offsets[l]:offsets[l+1]."""
    row_scale: np.ndarray
    """Divisor of each budget row."""
    cut_rows: list[tuple[np.ndarray, float]]
    """Extra rows as (column indices, rhs), all coefficients 1."""
    num_pruned: int
    """Candidates dropped by dominance."""

    @property
    def num_vars(self) -> int:
        return len(self.cols)

    @property
    def num_rows(self) -> int:
        return self.problem.num_layers + len(self.resources) + len(self.cut_rows)

    @property
    def obj(self) -> np.ndarray:
        return self.problem.flat_scores[self.cols]

    def budget_row(self, r: str) -> int:
        return self.problem.num_layers + self.resources.index(r)

    def scaled_budget(self, r: str, budget: float) -> float:
        # No headroom: the solvers' 1e-9 tolerance on the scaled row already absorbs the
        # rounding of a budget set exactly to an achievable total, and stays within FEAS_RTOL.
        return budget / self.row_scale[self.resources.index(r)]

    def cost_matrix(self) -> np.ndarray:
        """(R, N) scaled budget-row coefficients."""
        if not self.resources:
            return np.zeros((0, self.num_vars))
        return np.stack([self.problem.flat_costs[r][self.cols] for r in self.resources]) / self.row_scale[:, None]

    def csc(self):
        """Whole matrix in one go: (start, index, value, row_lower, row_upper), column-wise."""
        L, N, R = self.problem.num_layers, self.num_vars, len(self.resources)
        rows = [self.col_layer, ]
        colz = [np.arange(N)]
        vals = [np.ones(N)]
        C = self.cost_matrix()
        for k in range(R):
            nz = np.nonzero(C[k])[0]
            rows.append(np.full(nz.size, L + k)), colz.append(nz), vals.append(C[k, nz])
        for k, (cc, _) in enumerate(self.cut_rows):
            rows.append(np.full(cc.size, L + R + k)), colz.append(cc), vals.append(np.ones(cc.size))
        row, col, val = (np.concatenate(a) for a in (rows, colz, vals))
        order = np.lexsort((row, col))
        start = np.searchsorted(col[order], np.arange(N + 1)).astype(np.int32)
        lower = np.concatenate([np.ones(L), np.full(R + len(self.cut_rows), -np.inf)])
        upper = np.concatenate([np.ones(L), [self.scaled_budget(r, self.budgets[r]) for r in self.resources],
                                [rhs for _, rhs in self.cut_rows]])
        return start, row[order].astype(np.int32), val[order], lower, upper

    def inequality_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense (G, h) of every <= row (scaled budgets, then cuts): G @ x <= h."""
        G = [self.cost_matrix()]
        h = [[self.scaled_budget(r, self.budgets[r]) for r in self.resources]]
        for cols, rhs in self.cut_rows:
            row = np.zeros((1, self.num_vars))
            row[0, cols] = 1.0
            G.append(row), h.append([rhs])
        return np.concatenate(G), np.concatenate([np.asarray(v, dtype=np.float64) for v in h])

    def columns_of(self, choice: Sequence[int]) -> np.ndarray:
        """Kept column index of each layer's choice (original indices -> columns)."""
        flat = self.problem.offsets[:-1] + np.asarray(choice, dtype=np.int64)
        pos = np.searchsorted(self.cols, flat)
        if np.any(pos >= len(self.cols)) or np.any(self.cols[np.minimum(pos, len(self.cols) - 1)] != flat):
            raise ValueError("choice uses a candidate that dominance pruning removed")
        return pos

    def choice_from(self, x: np.ndarray) -> tuple[int, ...]:
        """Per-layer original candidate index from a (near-)binary column vector."""
        x = np.asarray(x, dtype=np.float64)
        best = [self.offsets[l] + int(np.argmax(x[self.offsets[l]:self.offsets[l + 1]]))
                for l in range(self.problem.num_layers)]
        return tuple(int(c) for c in self.cols[best] - self.problem.offsets[:-1])

    def add_cut(self, cut: Cut):
        """Append a cut row; pairs must be kept candidates (pruning saw them, see prune_mask)."""
        flat = np.array([self.problem.offsets[l] + v for l, v in cut.pairs], dtype=np.int64)
        pos = np.searchsorted(self.cols, flat)
        ok = (pos < len(self.cols)) & (self.cols[np.minimum(pos, len(self.cols) - 1)] == flat)
        # A pruned pair can never be chosen, so leaving it out of the row is exact.
        self.cut_rows.append((pos[ok].astype(np.int32), float(cut.max_selected)))
        return self.cut_rows[-1]


def compile_problem(problem: MIPProblem, cuts: Sequence[Cut] = (), levels: int = 1,
                    prune: bool = True) -> CompiledModel:
    """Prune dominated candidates and lay out the matrix (see CompiledModel)."""
    L = problem.num_layers
    for cut in cuts:
        for l, v in cut.pairs:
            if not (0 <= l < L and 0 <= v < problem.num_candidates[l]):
                raise ValueError(f"cut pair ({l}, {v}) is outside the problem")
    resources = problem.constrained
    keep = prune_mask(problem, resources, cuts, levels) if prune else np.ones(problem.offsets[-1], bool)
    cols = np.nonzero(keep)[0]
    col_layer = np.repeat(np.arange(L), problem.num_candidates)[cols]
    offsets = np.searchsorted(col_layer, np.arange(L + 1)).astype(np.int64)
    scale = np.array([problem.scale(r) for r in resources])
    model = CompiledModel(problem, resources, dict(problem.budgets), cols, col_layer, offsets, scale,
                          [], int(keep.size - keep.sum()))
    for cut in cuts:
        model.add_cut(cut)
    return model


def local_search(model: CompiledModel, cur: np.ndarray, cand: np.ndarray, tol: float = 1e-9,
                 max_moves: int = 2000, deadline: float | None = None) -> np.ndarray | None:
    """Cheap incumbent for the MIP: repair `cur` (one column per layer) into feasibility,
    then apply improving moves (best single swap, else best pair of swaps in two layers)
    drawn from the columns `cand`. Returns columns per layer, or None if repair fails.

    Only a warm start: optimality is proven by the solver. Near the LP optimum the true
    optimum differs in a few layers with small reduced costs, which is where `cand` comes
    from; pairs matter because a tight budget needs "upgrade here, downgrade there".
    """
    G, h = model.inequality_rows()
    obj, lay_of = model.obj, model.col_layer
    cur = np.array(cur, dtype=np.int64)
    cand = np.asarray(cand, dtype=np.int64)
    lay = lay_of[cand]
    t = G[:, cur].sum(axis=1)

    def apply(j):
        nonlocal t
        t = t + G[:, j] - G[:, cur[lay_of[j]]]
        cur[lay_of[j]] = j

    for _ in range(4 * len(cur) + 4):  # repair: greedily shrink the total overrun
        over = np.maximum(t - h - tol, 0.0)
        if not over.any():
            break
        dG = G[:, cand] - G[:, cur[lay]]
        new_over = np.maximum(t[:, None] + dG - h[:, None] - tol, 0.0).sum(axis=0)
        best = np.lexsort((obj[cand] - obj[cur[lay]], new_over))[0]
        if new_over[best] >= over.sum():
            return None
        apply(cand[best])
    else:
        return None
    for _ in range(max_moves):
        if deadline is not None and time.perf_counter() > deadline:
            break
        s = h + tol - t
        dG = G[:, cand] - G[:, cur[lay]]
        dobj = obj[cand] - obj[cur[lay]]
        ok = np.all(dG <= s[:, None], axis=0) & (dobj < 0)
        if ok.any():
            apply(cand[np.argmin(np.where(ok, dobj, np.inf))])
            continue
        gain = dobj[:, None] + dobj[None, :]
        ok = (gain < 0) & (lay[:, None] != lay[None, :])
        for k in range(G.shape[0]):
            ok &= dG[k][:, None] + dG[k][None, :] <= s[k]
        if not ok.any():
            break
        a, b = np.unravel_index(np.argmin(np.where(ok, gain, np.inf)), gain.shape)
        apply(cand[a]), apply(cand[b])
    return cur
