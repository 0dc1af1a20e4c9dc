"""Multi-process test helpers: run a worker on N gloo ranks (TP x PP x DP) and collect results.

Children come from a *forkserver* that has already imported torch + Megatron-core, so each
launch costs a fork instead of a ~5-10 s Megatron import per rank; they still start from a
clean interpreter state (no process group, no parallel_state) because the server itself never
initialises torch.distributed. Each child pins torch to one thread (2-core machines, tests
run concurrently).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

PRELOAD = ["torch", "megapuzzle.runtime", "megapuzzle.model", "megatron.core.models.gpt",
           "megatron.core.pipeline_parallel"]


def _entry(rank: int, world: int, port: int, tp: int, pp: int, worker, args, outdir: str):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from megapuzzle.runtime import destroy_distributed, init_distributed

    try:
        info = init_distributed(tp=tp, pp=pp, seed=1234)
        result = worker(info, *args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        # Keep the child's traceback readable in the parent's failure report.
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        destroy_distributed()


def run_distributed(worker, world: int, tp: int = 1, pp: int = 1, args: tuple = (), timeout: float = 300):
    """Run `worker(info, *args)` on `world` ranks; return the list of per-rank results.

    `worker` must be a module-level function (it is pickled by reference).
    """
    from megapuzzle.runtime import free_port

    try:
        mp.set_forkserver_preload(PRELOAD)
    except Exception:  # already running: preload was set by an earlier call
        pass
    last_err = None
    for _ in range(3):  # a "free" port can be grabbed by a concurrent test run: retry
        with tempfile.TemporaryDirectory() as outdir:
            try:
                ctx = mp.start_processes(_entry, args=(world, free_port(), tp, pp, worker, args, outdir),
                                         nprocs=world, join=False, start_method="forkserver")
                deadline = time.monotonic() + timeout
                while not ctx.join(timeout=1.0):
                    if time.monotonic() > deadline:
                        for proc in ctx.processes:
                            if proc.is_alive():
                                proc.terminate()
                        raise TimeoutError(f"distributed workers still running after {timeout} s")
                # our own children's results in our own temp dir (dicts of tensors and ParallelInfo):
                # trusted, unlike any checkpoint, which megapuzzle only ever reads as safetensors
                return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
            except Exception as e:
                errs = sorted(Path(outdir).glob("rank*.err"))
                text = "\n".join(p.read_text() for p in errs) or str(e)
                if "Address already in use" in text or "EADDRINUSE" in text:
                    last_err = text
                    continue
                raise RuntimeError(f"distributed worker failed:\n{text}") from None
    raise RuntimeError(f"could not get a free port after 3 tries:\n{last_err}")


# ----------------------------------------------------------------------------- AdamW parity of weights
#
# A parallel run (TP / PP / DP) sums its fp32 gradients in another order than one process, so
# each gradient element differs by rounding noise of relative size delta ~ 1e-6 (of its tensor's
# gradient scale). AdamW amplifies that noise wherever an element's gradients have stayed at the
# noise level: at step 1 its update is lr * g / (|g| + eps) = +-lr whatever |g| is, so noise that
# flips the sign of a near-zero g moves the element by 2 lr in one run against the other; so
# elementwise tolerances on the weights after a few AdamW steps test rounding luck. What Adam
# does guarantee, and what the parity checks below use:
#
# 1. Per element, bias-corrected Adam moves by at most lr_t * rho_t at step t, whatever the
#    gradients: with m_t = (1-b1) sum_k b1^(t-k) g_k, v_t = (1-b2) sum_k b2^(t-k) g_k^2,
#    Cauchy-Schwarz gives |m_t| <= (1-b1) sqrt(sum_{j<t} (b1^2/b2)^j) sqrt(v_t / (1-b2)), so
#        |m_t/(1-b1^t)| / sqrt(v_t/(1-b2^t)) <= rho_t = (1-b1)/(1-b1^t) sqrt((1-b2^t)/(1-b2) sum_{j<t} (b1^2/b2)^j)
#    (tight: g_k proportional to (b1/b2)^(t-k); rho_1 = 1; eps only shrinks the step; gradient
#    clipping only rescales the g_k). Decoupled weight decay multiplies both runs' difference by
#    (1 - lr wd) <= 1 per step, so two runs from the same init differ per element by at most
#        B = 2 sum_t lr_t rho_t.
# 2. In L2 per tensor: noise of size delta (relative to the tensor's gradient scale) changes an
#    element's Adam update by about min(1, delta / |g_i|) x B (g_i in units of that scale; once
#    an element has a gradient history above the noise, v keeps it there). Summed over a gradient
#    distribution with a bounded density around 0, that is ||w_par - w_ref||^2 <~ N delta B^2
#    for a tensor of N elements (the elements within delta of 0 move by up to B, the rest by
#    O(delta / |g_i|) B). With delta = NOISE = 1e-4 (100 x the fp32 reduction-order noise, for
#    the constants and for heavy-tailed gradients):
#        ||w_par - w_ref|| <= sqrt(NOISE * N) * B,  i.e. an rms difference <= 1 % of B.
#    (Below N = 1 / NOISE elements that budget is under one element moving by B; the chance that
#    fp32 noise moves one of them that far is ~ N x 1e-6.) bf16 compute: NOISE = 2^-8.
#    A real bug (a missing all-reduce, a wrong shard, a dropped micro-batch or pipeline-stage
#    grad) changes the gradient direction by O(1), hence the bulk of the updates by O(lr) per
#    step: an rms difference ~ the rms update, 0.2-0.45 B in these tests, 20-45 x over the
#    bound (asserted per tensor where the init is at hand: bound <= `teeth` x ||update||).
#    (A missing 1/DP grad scaling is invisible to Adam, which is scale-invariant: the tests'
#    per-step grad-norm comparison catches that one.)
NOISE = 1e-4


def adam_step_bound(t: int, beta1: float, beta2: float) -> float:
    """rho_t: the largest |bias-corrected m| / sqrt(bias-corrected v) at step t (1-based) over every
    gradient sequence, i.e. the most one Adam step can move an element, in units of lr."""
    s = sum((beta1 * beta1 / beta2) ** j for j in range(t))
    return (1 - beta1) / (1 - beta1 ** t) * math.sqrt((1 - beta2 ** t) / (1 - beta2) * s)


def adamw_divergence_bound(lrs, betas: tuple[float, float]) -> float:
    """B = 2 sum_t lr_t rho_t: the most an element can differ between two AdamW runs from the same
    init with the learning rates `lrs` (one per step), whatever their gradients."""
    return 2 * sum(lr * adam_step_bound(t, *betas) for t, lr in enumerate(lrs, start=1))


def assert_adamw_parity(ref: dict, par: dict, lrs, betas: tuple[float, float], init: dict | None = None,
                        noise: float = NOISE, teeth: float = 0.1) -> dict[str, float]:
    """Asserts the weights `par` of a parallel run are those of the reference `ref` (same init,
    same AdamW, learning rates `lrs` per step) up to what rounding noise of relative size `noise`
    can do through AdamW: per tensor ||par - ref|| <= sqrt(noise * numel) * B and every element
    within B (see above). With `init`, also asserts the L2 bound is under `teeth` x each trained
    tensor's update ||ref - init|| (so a bug that changes the update by that much fails), and
    counts in numel only the elements that moved in either run (an element without gradients
    moves the same in both: no noise to amplify). Returns the worst ratios to the bounds."""
    assert ref.keys() == par.keys(), sorted(ref.keys() ^ par.keys())
    b = adamw_divergence_bound(lrs, betas)
    worst = {"l2/bound": 0.0, "max/B": 0.0, "bound/update": 0.0}
    for k, r in ref.items():
        r, p = r.double(), par[k].double()
        d = p - r
        n = r.numel() if init is None else int(((r != init[k]) | (p != init[k])).sum())
        l2 = math.sqrt(noise * n) * b
        if n == 0:  # neither run moved it
            continue
        worst["l2/bound"] = max(worst["l2/bound"], d.norm().item() / l2)
        worst["max/B"] = max(worst["max/B"], d.abs().max().item() / b)
        assert d.norm().item() <= l2, (k, f"||par - ref|| = {d.norm().item():.3g} > {l2:.3g}")
        assert d.abs().max().item() <= b, (k, f"max |par - ref| = {d.abs().max().item():.3g} > B = {b:.3g}")
        if init is not None:
            upd = (r - init[k].double()).norm().item()
            if upd > 0:
                worst["bound/update"] = max(worst["bound/update"], l2 / upd)
                assert l2 <= teeth * upd, (k, f"bound {l2:.3g} not under {teeth} x the update {upd:.3g}")
    return worst
