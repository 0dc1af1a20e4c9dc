"""Run one `megapuzzle` command on N processes of this machine under torchrun.

`megapuzzle run` runs every stage in its own process; a stage whose config asks for a TP x PP
layout (evaluate.tensor_parallel x pipeline_parallel > 1) needs that many ranks. When the pipeline
itself was started as one process (no torchrun / srun around it), it hands the stage to

    python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node N -m megapuzzle.cli CMD ...

and waits (the same launch slurm/common.sh's mp_launch makes inside a job, minus the nodes). When
the pipeline already runs on the ranks (torchrun, or an sbatch script's mp_stage), the stage runs
in process. Torch-free: the pipeline and the CLI import it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from megapuzzle.errors import UserError

log = logging.getLogger(__name__).info


def launched_world() -> int:
    """Processes this one was launched among: torchrun's WORLD_SIZE, srun's SLURM_NTASKS, else 1."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        v = os.environ.get(var)
        if v and v.isdigit() and (var == "WORLD_SIZE" or os.environ.get("SLURM_PROCID")):
            return int(v)
    return 1


def torchrun(nproc: int, args: list[str], *, what: str) -> None:
    """`megapuzzle ARGS` on `nproc` local processes (torchrun, a free rendezvous port of its own);
    their output goes to ours. Raises UserError naming `what` when a rank fails. On CPU each
    process gets its share of this process's cores (as mp_launch does), not all of them."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # torchrun sets its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "-m", "megapuzzle.cli", *args]
    log(f"[launch] {what}: {nproc} processes: {' '.join(cmd[1:])}")
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise UserError(f"{what}: the torchrun launch of {nproc} processes failed (exit code {rc}); "
                        f"its ranks' errors are printed above")
