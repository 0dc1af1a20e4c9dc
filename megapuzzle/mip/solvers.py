"""Solver backends (HiGHS, Gurobi), `--solver auto` selection, `solve()` and infeasibility diagnosis.

Gurobi licence detection (what `auto` relies on). pip's gurobipy ships a size-limited
licence (<= 2000 variables and <= 2000 constraints, error 10010 beyond) that needs no file.
A full licence always comes from somewhere Gurobi looks: GRB_LICENSE_FILE, a gurobi.lic in
a default location (~/, /opt/gurobi*/, /usr/local/gurobi/, /Library/gurobi/, C:\\gurobi\\),
or WLS / token-server / compute-server environment variables. If none of those exist we
know the licence is the restricted one without touching Gurobi. If one exists we probe once
per process: optimise an empty 2001-variable model (~10 ms once the licence is checked
out); error 10010 means restricted, success means full, any other error means Gurobi is
unusable. MEGAPUZZLE_GUROBI_LICENCE=full|restricted|none overrides detection. As a last
guard, a 10010 raised by a real solve makes `auto` fall back to HiGHS and forced Gurobi
raise our one-line SolverLicenceError, never Gurobi's bare error.
"""
from __future__ import annotations

import functools
import glob
import math
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .problem import (CompiledModel, Cut, InfeasibleBudgetError, MIPError, MIPProblem, Solution,
                      SolverLicenceError, compile_problem, local_search)

RESTRICTED_MAX_VARS = 2000
RESTRICTED_MAX_CONSTRS = 2000
SOLVERS = ("auto", "highs", "gurobi")
FEAS_TOL = 1e-9  # solver feasibility tolerance on the scaled budget rows (see problem.FEAS_RTOL)


# -- Gurobi licence ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LicenceInfo:
    """What Gurobi licence this process can use."""

    kind: str
    """"full", "restricted" (size-limited pip licence) or "none" (gurobipy missing/unusable)."""
    detail: str
    """Human-readable evidence for `kind`."""


def _licence_indicators() -> list[str]:
    found = []
    lic = os.environ.get("GRB_LICENSE_FILE")
    if lic and os.path.isfile(lic):
        found.append(f"GRB_LICENSE_FILE={lic}")
    for var in ("GRB_WLSACCESSID", "GRB_LICENSEID", "GRB_TOKENSERVER", "GRB_CSMANAGER", "GRB_COMPUTESERVER",
                "GRB_CLOUDACCESSID"):
        if os.environ.get(var):
            found.append(f"${var}")
    places = [os.path.expanduser("~/gurobi.lic"), "/opt/gurobi/gurobi.lic", "/usr/local/gurobi/gurobi.lic",
              "/Library/gurobi/gurobi.lic", "C:\\gurobi\\gurobi.lic"]
    places += glob.glob("/opt/gurobi*/gurobi.lic")
    found += [p for p in dict.fromkeys(places) if os.path.isfile(p)]
    return found


@functools.lru_cache(maxsize=None)
def _gurobi_env():
    import gurobipy as gp
    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 0)  # also hides the "Restricted license" banner
    env.start()
    return env


@functools.lru_cache(maxsize=None)
def gurobi_licence() -> LicenceInfo:
    """Detect the Gurobi licence once per process (see module docstring)."""
    override = os.environ.get("MEGAPUZZLE_GUROBI_LICENCE", "").strip().lower()
    if override in ("full", "restricted", "none"):
        return LicenceInfo(override, f"MEGAPUZZLE_GUROBI_LICENCE={override}")
    try:
        import gurobipy as gp
    except ImportError:
        return LicenceInfo("none", "gurobipy is not installed")
    found = _licence_indicators()
    if not found:
        return LicenceInfo("restricted", "no gurobi.lic, GRB_LICENSE_FILE or WLS/token-server settings: "
                                         "pip's size-limited licence")
    try:
        m = gp.Model(env=_gurobi_env())
        m.addMVar(RESTRICTED_MAX_VARS + 1, vtype="B")
        m.optimize()
        return LicenceInfo("full", f"probe with {RESTRICTED_MAX_VARS + 1} variables solved ({found[0]})")
    except gp.GurobiError as e:
        if e.errno == 10010:
            return LicenceInfo("restricted", f"{found[0]} found but it is size-limited (error 10010)")
        return LicenceInfo("none", f"Gurobi unusable: {e} (errno {e.errno})")


def _too_big(num_vars: int, num_rows: int) -> list[str]:
    over = []
    if num_vars > RESTRICTED_MAX_VARS:
        over.append(f"{num_vars} variables > {RESTRICTED_MAX_VARS}")
    if num_rows > RESTRICTED_MAX_CONSTRS:
        over.append(f"{num_rows} constraints > {RESTRICTED_MAX_CONSTRS}")
    return over


def licence_error(num_vars: int, num_rows: int) -> SolverLicenceError:
    over = " and ".join(_too_big(num_vars, num_rows)) or f"{num_vars} variables, {num_rows} constraints"
    return SolverLicenceError(
        f"gurobi: the model ({num_vars} variables, {num_rows} constraints after dominance pruning) exceeds "
        f"Gurobi's restricted licence ({over}); use --solver highs or install a full Gurobi licence")


def choose_solver(requested: str, num_vars: int, num_rows: int) -> tuple[str, str]:
    """(backend, reason) for `requested` in {"auto", "highs", "gurobi"}; may raise for forced gurobi."""
    if requested not in SOLVERS:
        raise ValueError(f"unknown solver {requested!r}; choose one of {SOLVERS}")
    if requested == "highs":
        return "highs", "forced (--solver highs)"
    lic = gurobi_licence()
    size = f"{num_vars} vars, {num_rows} constraints"
    if requested == "gurobi":
        if lic.kind == "none":
            raise MIPError(f"gurobi: {lic.detail}; use --solver highs")
        if lic.kind == "restricted" and _too_big(num_vars, num_rows):
            raise licence_error(num_vars, num_rows)
        return "gurobi", f"forced (--solver gurobi), {lic.kind} licence"
    if lic.kind == "full":
        return "gurobi", f"auto: full Gurobi licence ({lic.detail})"
    if lic.kind == "none":
        return "highs", f"auto: {lic.detail}"
    over = _too_big(num_vars, num_rows)
    if not over:
        return "gurobi", (f"auto: fits Gurobi's restricted licence ({size} <= "
                          f"{RESTRICTED_MAX_VARS}/{RESTRICTED_MAX_CONSTRS})")
    return "highs", f"auto: {' and '.join(over)} exceeds Gurobi's restricted licence, using HiGHS"


# -- backends ---------------------------------------------------------------------------------

@dataclass
class RawResult:
    """What a backend hands back to MIPSession."""

    status: str
    """"optimal" (within mip_gap), "time_limit" (feasible, unproven) or "infeasible"."""
    x: np.ndarray | None
    """Column values of the best solution (None when infeasible)."""
    bound: float
    """Proven lower bound on the objective."""
    gap: float
    """Relative gap of x to the bound."""
    seconds: float
    """Wall time spent in the backend."""


class HighsBackend:
    """HiGHS, the whole model passed in one passModel call (column-wise arrays).

    core=True (default) adds an exact LP-guided reduction in front of the MIP. The LP
    relaxation gives duals y and reduced costs d = c - A'y; by weak duality every 0/1
    point x has  c.x >= z + sum_j max(d_j, 0) x_j  with z = y.b + sum_j min(d_j, 0), so a
    solution using column j can never beat an incumbent of value inc when d_j > inc - z.
    We solve the MIP on the columns with small d, then check that every column it left out
    has d_j > inc - z; otherwise we add those columns and re-solve from the incumbent.
    A cheap local search (problem.local_search) from the rounded LP point supplies the first
    incumbent, so usually one MIP on ~200-300 of the 2,900 columns settles it. The answer
    is the proven optimum of the full model; on the 405B library plain HiGHS spends
    0.5-1.5 s (mostly heuristics hunting an incumbent), the core 0.05-0.2 s
    (benchmarks/bench_mip.py). core=False runs plain HiGHS on the full model.
    """

    name = "highs"

    def __init__(self, model: CompiledModel, verbose: bool = False, mip_gap: float = 0.0, core: bool = True):
        import highspy
        self._hs, self.model = highspy, model
        self.verbose, self.mip_gap, self.core = verbose, float(mip_gap), core
        self.arrays = list(model.csc())  # start, index, value, lower, upper
        self.obj = model.obj
        self.h = self._load(None, integer=not core)  # the LP relaxation when core, else the MIP

    def _load(self, cols: np.ndarray | None, integer: bool, seeded: bool = False):
        hs = self._hs
        h = hs.Highs()
        h.setOptionValue("output_flag", bool(self.verbose))
        if seeded:
            # A core MIP that starts from our incumbent: feasibility jump only hunts for a
            # first feasible point, and restarts redo the reduced-cost fixing we already did.
            # Measured on the 405B library: ~2.5x less CPU, same proven optimum.
            h.setOptionValue("mip_heuristic_run_feasibility_jump", False)
            h.setOptionValue("mip_allow_restart", False)
        h.setOptionValue("presolve", "on")
        h.setOptionValue("mip_rel_gap", self.mip_gap)
        h.setOptionValue("mip_abs_gap", 0.0)  # default 1e-6 would stop short of the true optimum
        h.setOptionValue("mip_feasibility_tolerance", FEAS_TOL)
        h.setOptionValue("primal_feasibility_tolerance", FEAS_TOL)
        start, index, value, lower, upper = self.arrays
        obj = self.obj
        if cols is not None:  # column subset: gather each kept column's entries
            lens = np.diff(start)[cols]
            new_start = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            pos = np.repeat(start[cols] - new_start[:-1], lens) + np.arange(new_start[-1])
            start, index, value, obj = new_start, index[pos], value[pos], obj[cols]
        n, m = len(obj), len(lower)
        integrality = np.ones(n, dtype=np.int32) if integer else np.zeros(n, dtype=np.int32)
        st = h.passModel(n, m, len(index), 1, 1, 0.0,  # 1 = column-wise, 1 = minimise
                         obj, np.zeros(n), np.ones(n), lower, upper, start, index, value,
                         integrality)  # integer on [0, 1] = binary
        if st != hs.HighsStatus.kOk:
            raise MIPError(f"highs: passModel failed ({st})")
        return h

    def set_row_upper(self, row: int, upper: float):
        self.arrays[4][row] = upper
        self.h.changeRowBounds(row, -math.inf, upper)

    def add_row(self, cols: np.ndarray, upper: float):
        self.arrays = list(self.model.csc())  # the model already holds the new cut row
        self.h.addRow(-math.inf, upper, len(cols), cols.astype(np.int32), np.ones(len(cols)))

    def _mip(self, h, time_limit, start: np.ndarray | None):
        """Run a loaded MIP -> (status, x, bound, gap); raises when it ends without any solution."""
        hs = self._hs
        h.setOptionValue("time_limit", math.inf if time_limit is None else max(float(time_limit), 0.0))
        if start is not None:
            sol = hs.HighsSolution()
            sol.col_value = list(map(float, start))
            sol.value_valid = True
            h.setSolution(sol)
        h.run()
        st, info = h.getModelStatus(), h.getInfo()
        MS = hs.HighsModelStatus
        if start is not None and st == MS.kOptimal and not self._consistent(h, info):
            # highspy 1.16.0 returns a MIP start as "optimal" with objective and bound 0 (1.15
            # did not): never trust a proof whose objective is not the solution's. Re-solve
            # from scratch; the start only ever saved time.
            return self._mip(self._reload(h), time_limit, None)
        if st in (MS.kInfeasible, MS.kUnboundedOrInfeasible):
            return "infeasible", None, math.inf, math.inf
        has_x = info.primal_solution_status == 2  # kSolutionStatusFeasible
        if st == MS.kOptimal or (st in (MS.kTimeLimit, MS.kInterrupt, MS.kIterationLimit,
                                         MS.kSolutionLimit) and has_x):
            return ("optimal" if st == MS.kOptimal else "time_limit", np.asarray(h.getSolution().col_value),
                    info.mip_dual_bound, max(0.0, info.mip_gap))
        if st == MS.kTimeLimit:
            return "no_solution", None, info.mip_dual_bound, math.inf
        raise MIPError(f"highs: solve ended with status {h.modelStatusToString(st)}")

    @staticmethod
    def _consistent(h, info) -> bool:
        """HiGHS's reported objective and dual bound agree with its solution's own objective."""
        lp = h.getLp()
        x = np.asarray(h.getSolution().col_value)
        value = float(np.dot(np.asarray(lp.col_cost_), x)) + lp.offset_
        tol = 1e-9 * max(1.0, abs(value)) + 1e-12
        return abs(info.objective_function_value - value) <= tol and info.mip_dual_bound <= value + tol

    def _reload(self, h):
        """A fresh Highs holding the same model and options as `h`, and no solution."""
        fresh = self._hs.Highs()
        fresh.passOptions(h.getOptions())
        fresh.passModel(h.getModel())
        return fresh

    def _reduced_costs_and_bound(self, n: int) -> tuple[np.ndarray, float, np.ndarray]:
        """From the optimal LP relaxation: the reduced costs d, a weak-duality lower bound z on the MIP
        objective, and the LP solution."""
        start_, index, value, lower, upper = self.arrays
        sol = self.h.getSolution()
        y = np.asarray(sol.row_dual, dtype=np.float64)
        y = np.where(np.isfinite(lower), y, np.minimum(y, 0.0))  # <= rows need y <= 0 for a valid bound
        col_of = np.repeat(np.arange(n), np.diff(start_))
        d = self.obj - np.bincount(col_of, weights=value * y[index], minlength=n)
        z = float(y @ upper + np.minimum(d, 0.0).sum())  # weak-duality lower bound (eq rows: upper = 1)
        # Solutions may overrun a row by the feasibility tolerance, which is worth |y_i| * tol
        # of objective: lower the bound by that so no tolerated solution escapes the proof.
        z -= float(np.abs(y[~np.isfinite(lower)]).sum()) * FEAS_TOL
        return d, z, np.asarray(sol.col_value)

    def _incumbent(self, d: np.ndarray, z: float, x_lp: np.ndarray, start: np.ndarray | None, t: float,
                   time_limit: float | None):
        """The local-search incumbent (x_best or None, its objective), the columns of the first restricted
        MIP, and the reduced-cost threshold tau used to pick them."""
        n = len(self.obj)
        # Columns within 0.1 % of the bound plus the 2 best per layer and the LP support: room
        # for the incumbent heuristic, and the first restricted MIP if the heuristic fails.
        tau = 1e-3 * max(abs(z), 1e-12)
        model = self.model
        rank = np.empty(n, dtype=np.int64)
        rank[np.lexsort((d, model.col_layer))] = np.arange(n) - np.repeat(model.offsets[:-1], np.diff(model.offsets))
        inside = (d <= tau) | (rank < 2) | (x_lp > 1e-9)
        seeds = [np.array([model.offsets[l] + np.argmax(x_lp[model.offsets[l]:model.offsets[l + 1]])
                           for l in range(len(model.offsets) - 1)])]
        if start is not None:
            inside |= start > 0.5
            seeds.append(np.nonzero(start > 0.5)[0])  # one column per layer, in layer order
        x_best, inc_best = None, math.inf
        cand = np.nonzero(inside)[0]
        cand = cand[np.argsort(d[cand], kind="stable")[:400]]  # pair moves are O(len(cand)^2)
        for seed in seeds:
            cols_h = local_search(model, seed, cand, tol=FEAS_TOL,
                                  deadline=None if time_limit is None else t + 0.2 * float(time_limit))
            if cols_h is not None and self.obj[cols_h].sum() < inc_best:
                inc_best = float(self.obj[cols_h].sum())
                x_best = np.zeros(n)
                x_best[cols_h] = 1.0
        if x_best is not None:
            # Exactly the columns that could still beat the heuristic: often a couple of hundred.
            inside = (d <= inc_best - z + 1e-12 * max(1.0, abs(inc_best))) | (x_best > 0.5)
        return x_best, inc_best, inside, tau

    def run(self, time_limit: float | None, start: np.ndarray | None) -> RawResult:
        t = time.perf_counter()
        if not self.core:
            status, x, bound, gap = self._mip(self.h, time_limit, start)
            if status == "no_solution":
                raise MIPError(f"highs: no feasible solution within the time limit ({time_limit} s)")
            return RawResult(status, x, bound, gap, time.perf_counter() - t)
        deadline = None if time_limit is None else t + float(time_limit)

        def left():
            return None if deadline is None else deadline - time.perf_counter()

        MS = self._hs.HighsModelStatus
        self.h.setOptionValue("time_limit", math.inf if time_limit is None else float(time_limit))
        self.h.run()  # LP relaxation (warm-started from the previous basis on re-solves)
        lp_status = self.h.getModelStatus()
        if lp_status in (MS.kInfeasible, MS.kUnboundedOrInfeasible):
            return RawResult("infeasible", None, math.inf, math.inf, time.perf_counter() - t)
        n = len(self.obj)
        if lp_status != MS.kOptimal:  # LP out of time (or odd): plain MIP on everything
            status, x, bound, gap = self._mip(self._load(None, True), left(), start)
            if status == "no_solution":
                raise MIPError(f"highs: no feasible solution within the time limit ({time_limit} s)")
            return RawResult(status, x, bound, gap, time.perf_counter() - t)
        d, z, x_lp = self._reduced_costs_and_bound(n)
        x_best, inc_best, inside, tau = self._incumbent(d, z, x_lp, start, t, time_limit)
        while True:
            cols = np.nonzero(inside)[0]
            x0 = None if x_best is None else x_best[cols]
            status, xs, rbound, _ = self._mip(self._load(cols, True, seeded=x0 is not None), left(), x0)
            if status == "no_solution":  # out of time before HiGHS even took our start
                if x_best is None:
                    raise MIPError(f"highs: no feasible solution within the time limit ({time_limit} s)")
                inc = float(self.obj @ x_best)
                return RawResult("time_limit", x_best, z, max(0.0, inc - z) / max(abs(inc), 1e-12),
                                 time.perf_counter() - t)
            if status == "infeasible":
                if cols.size == n:
                    return RawResult("infeasible", None, math.inf, math.inf, time.perf_counter() - t)
                tau *= 8  # too few columns to be feasible: widen
                inside |= d <= tau
                if inside.sum() == cols.size:
                    inside[:] = True
                continue
            x = np.zeros(n)
            x[cols] = xs
            inc = float(self.obj @ x)
            out_d = d[~inside]
            bound = min(rbound, z + float(out_d.min())) if out_d.size else rbound
            slack = 1e-12 * max(1.0, abs(inc))
            bound = min(bound, inc)
            gap = (inc - bound) / max(abs(inc), 1e-12) if inc - bound > slack else 0.0
            if inc - bound <= self.mip_gap * max(abs(inc), 1e-12) + slack:
                return RawResult(status, x, bound, gap, time.perf_counter() - t)
            grow = inside | (d <= inc - z + slack)
            if status != "optimal" or grow.sum() == inside.sum():  # out of time: report what is proven
                return RawResult("time_limit", x, bound, gap, time.perf_counter() - t)
            inside, x_best = grow, x


def gurobi_optimize(m) -> None:
    """m.optimize(), with Gurobi's errors as ours (10010: the restricted licence's size limit)."""
    import gurobipy as gp

    try:
        m.optimize()
    except gp.GurobiError as e:
        if e.errno == 10010:
            raise licence_error(m.NumVars, m.NumConstrs) from None
        raise MIPError(f"gurobi: {e} (errno {e.errno})") from None


class GurobiBackend:
    """Matrix API: one addMVar and one addMConstr for every row (numpy dense, zeros dropped)."""

    name = "gurobi"

    def __init__(self, model: CompiledModel, verbose: bool = False, mip_gap: float = 0.0):
        import gurobipy as gp
        self.gp, self.model = gp, model
        m = self.m = gp.Model(env=_gurobi_env())
        m.Params.OutputFlag = int(bool(verbose))
        m.Params.MIPGap = float(mip_gap)
        m.Params.MIPGapAbs = 0.0
        m.Params.FeasibilityTol = FEAS_TOL
        m.Params.IntFeasTol = FEAS_TOL
        n = model.num_vars
        self.x = m.addMVar(n, vtype=gp.GRB.BINARY, obj=model.obj)
        start, index, value, lower, upper = model.csc()
        A = np.zeros((len(lower), n))
        A[index, np.repeat(np.arange(n), np.diff(start))] = value
        sense = np.where(np.isfinite(lower), "=", "<")
        self.rows = m.addMConstr(A, self.x, sense, upper)

    def set_row_upper(self, row: int, upper: float):
        self.rows[row].RHS = upper

    def add_row(self, cols: np.ndarray, upper: float):
        self.m.addConstr(self.x[cols.astype(np.int64)].sum() <= upper)

    def run(self, time_limit: float | None, start: np.ndarray | None) -> RawResult:
        gp, m = self.gp, self.m
        m.Params.TimeLimit = math.inf if time_limit is None else float(time_limit)
        if start is not None:
            self.x.Start = start
        t = time.perf_counter()
        gurobi_optimize(m)
        secs = time.perf_counter() - t
        S = gp.GRB.Status
        if m.Status in (S.INFEASIBLE, S.INF_OR_UNBD):
            return RawResult("infeasible", None, math.inf, math.inf, secs)
        if m.SolCount > 0 and m.Status in (S.OPTIMAL, S.TIME_LIMIT, S.INTERRUPTED, S.NODE_LIMIT, S.SOLUTION_LIMIT):
            return RawResult("optimal" if m.Status == S.OPTIMAL else "time_limit", np.asarray(self.x.X),
                             m.ObjBound, max(0.0, m.MIPGap), secs)
        if m.Status == S.TIME_LIMIT:
            raise MIPError(f"gurobi: no feasible solution within the time limit ({time_limit} s)")
        raise MIPError(f"gurobi: solve ended with status {m.Status}")


# -- a built model that can be re-solved -------------------------------------------------------

class MIPSession:
    """A compiled model loaded into one backend; budgets can change and cuts be appended.

    `extra_rows` is how many cut rows may be added later (diversity), counted up front so
    `auto` does not pick the restricted Gurobi licence for a model that will outgrow it.
    """

    def __init__(self, problem: MIPProblem, solver: str = "auto", cuts: Sequence[Cut] = (), *,
                 verbose: bool = False, mip_gap: float = 0.0, levels: int = 1, extra_rows: int = 0,
                 prune: bool = True, core: bool = True):
        t = time.perf_counter()
        self.model = compile_problem(problem, cuts, levels=levels, prune=prune)
        self.verbose, self.mip_gap, self.core = verbose, mip_gap, core
        name, self.reason = choose_solver(solver, self.model.num_vars, self.model.num_rows + extra_rows)
        self.forced = solver != "auto"
        self.backend = self._make(name)
        self.build_time_s = time.perf_counter() - t
        self._build_reported = False

    def _make(self, name: str):
        if name == "gurobi":
            return GurobiBackend(self.model, verbose=self.verbose, mip_gap=self.mip_gap)
        return HighsBackend(self.model, verbose=self.verbose, mip_gap=self.mip_gap, core=self.core)

    @property
    def solver(self) -> str:
        return self.backend.name

    def set_budget(self, resource: str, budget: float):
        if resource not in self.model.resources:
            raise ValueError(f"{resource!r} has no budget row in this model")
        self.model.budgets[resource] = float(budget)
        self.backend.set_row_upper(self.model.budget_row(resource), self.model.scaled_budget(resource, budget))

    def add_cut(self, cut: Cut):
        cols, rhs = self.model.add_cut(cut)
        self.backend.add_row(cols, rhs)

    def _run(self, time_limit, start):
        try:
            return self.backend.run(time_limit, start)
        except SolverLicenceError:
            if self.forced:
                raise
            # Detection said the licence fits but Gurobi disagrees: rebuild on HiGHS.
            self.reason += "; Gurobi refused the size (10010), fell back to HiGHS"
            self.backend = self._make("highs")
            return self.backend.run(time_limit, start)

    def solve(self, time_limit: float | None = None, start: Sequence[int] | None = None) -> Solution:
        """Solve under the current budgets/cuts. Infeasible -> a Solution with status "infeasible"."""
        model, problem = self.model, self.model.problem
        x0 = None
        if start is not None:
            try:
                x0 = np.zeros(model.num_vars)
                x0[model.columns_of(start)] = 1.0
            except ValueError:
                x0 = None  # a hint from another model; just skip it
        raw = self._run(time_limit, x0)
        build = 0.0 if self._build_reported else self.build_time_s
        self._build_reported = True
        common = dict(budgets=dict(model.budgets), solver=self.solver, reason=self.reason,
                      solve_time_s=raw.seconds, build_time_s=build, num_vars=model.num_vars,
                      num_constraints=model.num_rows, num_pruned=model.num_pruned)
        if raw.status == "infeasible":
            return Solution((), math.inf, {}, status="infeasible", gap=math.inf, bound=math.inf, **common)
        choice = model.choice_from(raw.x)
        objective, totals = problem.evaluate(choice)
        over = {r: totals[r] - b for r, b in model.budgets.items()
                if totals[r] > b + 10 * problem.tolerance(r, b)}
        if over:  # would be a solver bug: never hand out an architecture that breaks a budget
            raise MIPError(f"{self.solver} returned a choice over budget by {over}")
        names = None
        if problem.candidate_names is not None:
            names = tuple(problem.candidate_names[l][v] for l, v in enumerate(choice))
        gap = raw.gap if raw.gap > 1e-12 else 0.0  # solvers report ~1e-17 "gaps" at optimality
        return Solution(tuple(choice), objective, totals, status=raw.status, gap=gap, bound=raw.bound,
                        names=names, **common)


# -- public entry point -----------------------------------------------------------------------

def solve(problem: MIPProblem, solver: str = "auto", time_limit: float | None = None,
          cuts: Sequence[Cut] = (), *, verbose: bool = False, mip_gap: float = 0.0,
          prune: bool = True, core: bool = True, start: Sequence[int] | None = None) -> Solution:
    """Minimise the summed scores under the budgets (and extra `cuts`).

    solver: "auto" (Gurobi if licensed for this size, else HiGHS; Solution.reason says why),
    "highs" or "gurobi". mip_gap: relative optimality gap to stop at (0 = proven optimum).
    time_limit: seconds; when hit, the best solution found comes back with status
    "time_limit" and its proven gap (MIPError if none was found).
    verbose: show the solver's log. start: a warm-start choice (original indices).
    prune=False / core=False switch off dominance pruning / HiGHS's LP-guided core (A/B checks).
    Raises InfeasibleBudgetError (one-line diagnosis) when no architecture fits.
    """
    session = MIPSession(problem, solver, cuts, verbose=verbose, mip_gap=mip_gap, prune=prune, core=core)
    sol = session.solve(time_limit, start)
    if not sol.feasible:
        raise diagnose_infeasible(problem, cuts, solver=solver)
    return sol


def _least(problem: MIPProblem, resource: str, others: dict[str, float], cuts, solver) -> float | None:
    """Least achievable total of `resource` under the `others` budgets and cuts (None: infeasible)."""
    sub = MIPProblem(problem.costs[resource], problem.costs, others)
    # "auto" rather than a forced gurobi: a diagnosis must not fail on the licence size.
    sol = MIPSession(sub, "highs" if solver == "highs" else "auto", cuts).solve()
    return sol.totals[resource] if sol.feasible else None


def diagnose_infeasible(problem: MIPProblem, cuts: Sequence[Cut] = (), solver: str = "auto") -> InfeasibleBudgetError:
    """Explain an infeasible problem: for each budget, the least achievable total alone and
    under the other budgets (one small MIP per resource); the message names the binding ones."""
    budgets = dict(problem.budgets)
    alone = {r: math.fsum(float(c.min()) for c in problem.costs[r]) for r in budgets}
    with_others = {r: _least(problem, r, {k: v for k, v in budgets.items() if k != r}, cuts, solver)
                   for r in budgets}
    parts, fixes, binding = [], [], []
    for r, b in budgets.items():
        tol = problem.tolerance(r, b)
        if b < alone[r] - tol:
            least, how = alone[r], "even with no other budget"
        elif with_others[r] is not None and b < with_others[r] - tol:
            least, how = with_others[r], "with the other budgets"
        else:
            continue
        binding.append(r)
        parts.append(f"{r} budget {b:.6g} is below the least achievable {least:.6g} ({how})")
        fixes.append(f"{r} to >= {least:.6g}")
    if parts:
        msg = f"infeasible: {'; '.join(parts)}; raise {' or '.join(fixes)}"
        if any("runtime" in r or "latency" in r for r in binding):
            msg += " (a lower throughput target / a looser latency limit raises the runtime budget)"
    elif not budgets:
        msg = f"infeasible: the {len(cuts)} extra cut(s) exclude every architecture (no budgets involved)"
    else:
        msg = (f"infeasible: each of {', '.join(budgets)} is achievable on its own, but not all together "
               f"(with cuts: {len(cuts)}); relax at least two of them")
    return InfeasibleBudgetError(msg, budgets=budgets, least_alone=alone, least_with_others=with_others,
                                 binding=binding)
