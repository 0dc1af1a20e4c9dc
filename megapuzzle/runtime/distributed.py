"""torch.distributed + Megatron parallel_state setup: NCCL on GPU, gloo on CPU, seeds.

Rank/world come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), from
SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT from the env or the
job's first node and a job-id-derived port), or default to a single process (world 1, an
in-process store: no port to collide with other runs on the same machine).
"""

from __future__ import annotations

import datetime
import json
import os
import random
import socket
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .cpu_compat import apply_cpu_compat


class DistributedError(RuntimeError):
    """Distributed setup cannot proceed; the message names the problem in one line."""


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the (TP, PP, DP) grid."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    tp_size: int
    """Tensor-parallel size."""
    pp_size: int
    """Pipeline-parallel size."""
    dp_size: int
    """Data-parallel size = world / (tp * pp)."""
    tp_rank: int
    """Rank inside the tensor-parallel group."""
    pp_rank: int
    """Pipeline stage of this rank."""
    dp_rank: int
    """Rank inside the data-parallel group."""
    device: torch.device
    """Where this rank's tensors live (cuda:LOCAL_RANK or cpu)."""
    backend: str
    """torch.distributed backend (nccl or gloo)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one that writes shared files and logs."""
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (for single-node multi-process launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"environment variable {name}={v!r} is not an integer") from None


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        # A single-name nodelist ("node01") needs no expansion.
        if "[" not in nodes and "," not in nodes:
            return nodes
        raise DistributedError(f"MASTER_ADDR is unset and `scontrol show hostnames {nodes}` failed; "
                               f"export MASTER_ADDR in the sbatch script") from None


def _launch_env() -> tuple[int, int, int, str | None]:
    """(rank, world, local_rank, launcher) from torchrun, SLURM, or the single-process default."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        local = _env_int("LOCAL_RANK")
        return rank, world, (rank if local is None else local), "torchrun"
    rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
    if rank is not None and world is not None and world > 1:
        local = _env_int("SLURM_LOCALID")
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        job = _env_int("SLURM_JOB_ID") or 0
        os.environ.setdefault("MASTER_PORT", str(15000 + job % 20000))
        return rank, world, (0 if local is None else local), "slurm"
    return 0, 1, 0, None


def set_seeds(seed: int, pp_rank: int = 0) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker.

    As Megatron-LM does, each pipeline stage gets `seed + 100 * pp_rank` so that stages do not
    initialise their layers identically; TP ranks of a stage share the seed (CPU initialisation
    draws the full master weight, then slices), and the tracker derives the per-TP-rank
    dropout streams from it.
    """
    from megatron.core import parallel_state, tensor_parallel

    s = seed + 100 * pp_rank
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    if parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(s)


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str | None = None,
                     timeout_minutes: float = 30.0) -> ParallelInfo:
    """Initialise torch.distributed, Megatron's parallel_state (TP x PP x DP) and all seeds.

    Re-entrant: an already initialised process group is reused, and model-parallel state with
    different sizes is rebuilt. DP = world / (tp * pp).
    """
    from megatron.core import parallel_state

    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_compat()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise DistributedError("backend 'nccl' needs CUDA, and this machine has none; use backend='gloo'")
    if tp < 1 or pp < 1:
        raise DistributedError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")

    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK") or _env_int("SLURM_LOCALID") or 0
        backend = dist.get_backend()
    else:
        rank, world, local, launcher = _launch_env()
        if world % (tp * pp):
            raise DistributedError(f"world size {world} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
                                   f"launch a multiple of {tp * pp} processes")
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if launcher is None:
            # Single process: an in-process store, no port that concurrent runs could race for.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if not os.environ.get(var):
                    raise DistributedError(f"{var} is not set; the {launcher} launch must export it")
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timeout)
    if world % (tp * pp):
        raise DistributedError(f"world size {world} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
                               f"launch a multiple of {tp * pp} processes")

    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != tp
                or parallel_state.get_pipeline_model_parallel_world_size() != pp):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp)

    info = parallel_info()
    set_seeds(seed, info.pp_rank)
    return info


def parallel_info() -> ParallelInfo:
    """The current process's ParallelInfo (after init_distributed)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        raise DistributedError("distributed state is not initialised; call init_distributed() first")
    cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    return ParallelInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        local_rank=(torch.cuda.current_device() if cuda else (_env_int("LOCAL_RANK") or 0)),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
        backend=dist.get_backend(),
    )


def _device() -> torch.device:
    # NCCL moves device tensors only; gloo (CPU) host tensors
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def broadcast_json(value, src: int = 0, group=None):
    """`value` (JSON-able) from rank `src` to every rank of `group`, as UTF-8 JSON bytes: no pickle
    crosses a process boundary (torch's *_object collectives unpickle what they receive)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    dev = _device()
    data = json.dumps(value).encode() if dist.get_rank() == src else b""
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(n, src=src, group=group)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if data else
           torch.empty(int(n.item()), dtype=torch.uint8, device=dev))
    dist.broadcast(buf, src=src, group=group)
    return json.loads(buf.cpu().numpy().tobytes().decode()) if dist.get_rank() != src else value


def all_gather_json(value, group=None) -> list:
    """Every rank's `value` (JSON-able), in rank order, on every rank of `group`; JSON, no pickle."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [value]
    dev = _device()
    data = json.dumps(value).encode()
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=dev), group=group)
    width = int(max(x.item() for x in sizes))
    mine = torch.zeros(width, dtype=torch.uint8, device=dev)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.empty(width, dtype=torch.uint8, device=dev) for _ in sizes]
    dist.all_gather(bufs, mine, group=group)
    return [json.loads(b[:int(k.item())].cpu().numpy().tobytes().decode()) for b, k in zip(bufs, sizes)]


def rank0_decides(decide, what: str, exceptions: tuple = ()):
    """`decide()` on rank 0, its JSON-able answer on every rank. When it raises one of `exceptions`,
    every rank raises (the others must not wait for a rank 0 that has given up): rank 0 re-raises
    its own error, the others a one-line UserError naming `what`."""
    from megapuzzle.errors import UserError

    answer = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            answer = {"ok": decide()}
        except exceptions as e:
            if not dist.is_initialized() or dist.get_world_size() == 1:
                raise
            answer = {"error": f"{type(e).__name__}: {e}"}
            broadcast_json(answer)
            raise
    answer = broadcast_json(answer)
    if "error" in answer:
        raise UserError(f"rank 0 could not {what}: {answer['error']}")
    return answer["ok"]


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
