"""Stage 6 core: the Puzzle MIP (one candidate per layer, min summed score under budgets).

Generic and file-free: a later stage turns scores.json / costs.json into a MIPProblem.

    from megapuzzle.mip import MIPProblem, solve
    p = MIPProblem(scores=[[0.0, 0.3, 0.9]] * 4,
                   costs={"runtime_s": [[3e-3, 2e-3, 1e-3]] * 4},
                   budgets={"runtime_s": 8e-3})
    sol = solve(p)            # sol.choice, sol.objective, sol.totals, sol.solver, sol.reason
"""
from .problem import (FEAS_RTOL, CompiledModel, Cut, InfeasibleBudgetError, MIPError, MIPProblem, Solution,
                      SolverLicenceError, compile_problem, prune_mask)
from .search import (BatchRow, BatchSearchResult, default_throughput, max_shared, pareto_sweep,
                     solve_diverse, solve_over_batches)
from .solvers import (RESTRICTED_MAX_CONSTRS, RESTRICTED_MAX_VARS, LicenceInfo, MIPSession, choose_solver,
                      diagnose_infeasible, gurobi_licence, solve)

__all__ = [
    "MIPProblem", "Solution", "Cut", "MIPError", "InfeasibleBudgetError", "SolverLicenceError",
    "solve", "solve_diverse", "pareto_sweep", "solve_over_batches", "BatchRow", "BatchSearchResult",
    "MIPSession", "choose_solver", "gurobi_licence", "LicenceInfo", "diagnose_infeasible",
    "compile_problem", "prune_mask", "CompiledModel", "default_throughput", "max_shared",
    "FEAS_RTOL", "RESTRICTED_MAX_VARS", "RESTRICTED_MAX_CONSTRS",
]
