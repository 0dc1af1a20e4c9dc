"""Multi-process test helpers: run a worker on N gloo ranks (TP x PP x DP) and collect results.

Children come from a *forkserver* that has already imported torch + Megatron-core, so each
launch costs a fork instead of a ~5-10 s Megatron import per rank; they still start from a
clean interpreter state (no process group, no parallel_state) because the server itself never
initialises torch.distributed. Each child pins torch to one thread (2-core machines, tests
run concurrently).
"""

from __future__ import annotations

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
