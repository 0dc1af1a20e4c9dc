"""`megapuzzle bld`: blockwise local distillation (Puzzle stage 3) into the block library.

    megapuzzle bld --config CFG --run-dir RUN
    torchrun --nproc-per-node 4 -m megapuzzle.cli bld --config CFG --run-dir RUN           # DP x TP
    torchrun --nproc-per-node 4 -m megapuzzle.cli bld --config CFG --run-dir RUN --tp 2 --pp 2

Reads RUN/parent (canonical checkpoint), RUN/data/train (training windows) and
RUN/data/heldout (the fixed eval batches); writes RUN/library (megapuzzle.library), the
work split and per-rank resumable state under RUN/state/bld/<block-set hash>/ (removed as ranks
finish) and tensorboard scalars (NMSE per block) under RUN/tb/bld/dp###/ (dp###_pp###/ with PP).

How BLD trains (the loss, decoupled / coupled, the work split, TP / PP, precision, resume):
docs/design.md, "BLD".
"""

from __future__ import annotations

import logging
import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from megapuzzle.arch import Architecture, SearchSpace
from megapuzzle.config import RunDir, load_config, section
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json
from megapuzzle.stages.bld.plan import (FP8_RECIPES, BLDConfig, BlockSpec, check_tensor_parallel, plan_blocks,  # noqa: F401
                                  split_work, tensor_sig)
from megapuzzle.library import BlockLibrary

log = logging.getLogger(__name__).info


def _plan_for_ranks(state_root: Path, todo: list[BlockSpec], arch: Architecture, dp: int, sig: str,
                    stages: list[range]) -> list[list[list[str]]]:
    """assign[pp_rank][dp_rank]: the blocks of each pipeline stage's layers split over its
    data-parallel ranks. Reuse the persisted split when it still covers the work (so a
    restarted rank gets the same blocks and can resume its state); otherwise make and persist a
    new one (PP = 1 keeps the flat per-DP-rank format)."""
    f = state_root / "plan.json"
    keys, pp = {b.key for b in todo}, len(stages)
    if f.is_file():
        try:
            p = json.loads(f.read_text())
            assign = p["assign"] if pp > 1 else [p["assign"]]
            if (p.get("signature") == sig and p.get("dp_size") == dp and p.get("pp_size", 1) == pp
                    and keys <= {k for st in assign for r in st for k in r}):
                return assign
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    assign = [split_work([b for b in todo if b.end in rng], arch, dp) for rng in stages]  # a run: its last layer's
    atomic_write_json(f, {"signature": sig, "dp_size": dp, "assign": assign[0]} if pp == 1 else
                      {"signature": sig, "dp_size": dp, "pp_size": pp, "assign": assign})
    return assign


# ----------------------------------------------------------------------------- entry points

def run_bld(run_dir: str | Path, cfg_dict: dict | None = None, *, progress: bool = True,
            threads: int | None = None) -> dict:
    """Build (or complete) RUN/library. `cfg_dict`: the whole run config (sections
    `search_space` and `bld`). Under `faults.kill_after("bld", n)` (tests) a rank stops after
    step n without saving, like a kill between checkpoints. Returns this rank's summary."""
    from megapuzzle.stages.bld.train import train_rank
    from megapuzzle.checkpoints.canonical import load_checkpoint, require_parent
    from megapuzzle.runtime.distributed import rank0_decides

    cfg_dict = cfg_dict or {}
    space = SearchSpace.from_dict(cfg_dict.get("search_space"))
    cfg = section(cfg_dict, "bld", BLDConfig)
    _check_fp8(cfg)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rd = RunDir(run_dir)
    stages, info = _ranks(rd, cfg)
    arch, parent_tensors, _ = load_checkpoint(require_parent(rd))
    rd.require_data("train")
    rd.require_data("heldout")  # the fixed eval batches for init / final NMSE
    blocks = plan_blocks(arch, space, cfg)
    check_tensor_parallel(arch, blocks, info.tp_size)
    lib = BlockLibrary(rd.library)
    # One state scope per block set: SLURM array jobs over layer shards share RUN but never
    # each other's plan or rank states.
    state_root = rd.state / "bld" / tensor_sig(",".join(b.key for b in blocks))
    sig = tensor_sig(cfg.training_signature() + arch.to_json())

    # Rank 0 checks the library (checksums) and decides; everyone gets the same answer (or the
    # same error: the other ranks must not wait for a rank 0 that has given up).
    d = rank0_decides(lambda: _decide(lib, arch, parent_tensors, blocks, state_root, info.dp_size, sig, stages),
                      "plan BLD", (UserError, ValueError, OSError))
    todo = set(d["todo"])
    plan_keys = d["assign"][info.pp_rank][info.dp_rank]
    mine = [b for b in blocks if b.key in todo and b.key in set(plan_keys)]
    summary = {"rank": info.rank, "dp_rank": info.dp_rank, "pp_rank": info.pp_rank, "trained": [b.key for b in mine],
               "parent_written": d["parent_written"], "corrupt": d["corrupt"], "todo": d["todo"],
               "steps": cfg.steps, "resumed_from": None, "timings": {}}
    role = _pipeline_role(info, d["assign"], todo)
    if mine or (role is not None and role.deepest >= 0):
        res = train_rank(rd, cfg, arch, parent_tensors, mine, lib, info,
                         state_dir=state_root / f"rank{info.rank:03d}", signature=sig,
                         plan_keys=plan_keys, progress=progress, role=role)
        summary.update(res)
    summary["timings"]["total_s"] = time.perf_counter() - t0
    return summary


def _check_fp8(cfg: BLDConfig) -> None:
    """bld.fp8 needs TransformerEngine and an FP8 GPU: fail at start, before the parent is loaded."""
    from megapuzzle.model.config import ModelConfigError, check_fp8, resolve_use_te

    if cfg.fp8:
        try:
            check_fp8(True, resolve_use_te(None))
        except ModelConfigError as e:
            raise UserError(f"bld.fp8: {e}") from None


def _ranks(rd: RunDir, cfg: BLDConfig):
    """(each pipeline stage's layers, this rank's ParallelInfo): torch.distributed + Megatron's groups."""
    from megapuzzle.checkpoints.canonical import load_arch, require_parent
    from megapuzzle.model.config import ModelConfigError, stage_layer_ranges
    from megapuzzle.runtime.distributed import DistributedError, init_distributed

    try:
        stages = stage_layer_ranges(load_arch(require_parent(rd)).num_layers, cfg.pipeline_parallel)
    except ModelConfigError as e:
        raise UserError(f"bld.pipeline_parallel={cfg.pipeline_parallel}: {e}") from None
    try:
        info = init_distributed(tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel, seed=cfg.seed)
    except DistributedError as e:
        raise UserError(f"bld (tensor_parallel={cfg.tensor_parallel}, pipeline_parallel="
                        f"{cfg.pipeline_parallel}): {e}") from None
    return stages, info


def _pipeline_role(info, assign: list[list[list[str]]], todo: set[str]):
    """PP > 1: this rank's PipelineRole (every stage of a pipeline with work takes part: relays,
    agrees on resume); None without PP."""
    if info.pp_size == 1:
        return None
    from megapuzzle.stages.bld.pp_relay import PipelineRole, deepest_stage

    return PipelineRole(info.pp_rank, deepest_stage(assign, todo, info.dp_rank))


def _decide(lib: BlockLibrary, arch: Architecture, parent_tensors: dict, blocks: list[BlockSpec], state_root: Path,
            dp: int, sig: str, stages: list[range]) -> dict:
    """Write the parent's own blocks, find the blocks to train (missing, failing their
    checksum, or trained under other BLD settings / another parent) and split each pipeline
    stage's share over the data-parallel ranks (assign[pp_rank][dp_rank])."""
    parent_written = _write_parent_blocks(lib, arch, parent_tensors, [b for b in blocks if b.parent_own])
    entries = lib.entries()
    stale = [b.key for b in blocks if not b.parent_own and lib.entry_ok(entries.get(b.key), verify=True)
             and entries[b.key].get("bld_signature") != sig]
    todo = [b for b in blocks if not b.parent_own and (b.key in stale or
                                                       not lib.entry_ok(entries.get(b.key), verify=True))]
    corrupt = [b.key for b in todo if b.key in entries and b.key not in stale]
    if stale:
        log(f"[bld] {len(stale)} block(s) were trained with other BLD settings or another parent "
            f"(e.g. {stale[0]}); retraining them")
    if todo:
        assign = _plan_for_ranks(state_root, todo, arch, dp, sig, stages)
    else:
        assign = [[[] for _ in range(dp)] for _ in stages]
        shutil.rmtree(state_root, ignore_errors=True)  # nothing left to resume
    for k in corrupt:
        log(f"[bld] {k}: block file missing or corrupted (checksum mismatch); retraining it")
    over = f"{dp} data-parallel rank(s)" if len(stages) == 1 else \
        f"{len(stages)} pipeline stages x {dp} data-parallel rank(s)"
    log(f"[bld] {len(blocks)} blocks in the search space; {len(todo)} to train over {over}; "
        f"{len(blocks) - len(todo)} present or written from the parent")
    return {"todo": [b.key for b in todo], "assign": assign, "parent_written": parent_written, "corrupt": corrupt}


def _write_parent_blocks(lib: BlockLibrary, arch: Architecture, tensors: dict, blocks: list[BlockSpec]) -> list[str]:
    from megapuzzle.init import attention_part, ffn_part, local_layer_tensors

    written, entries = [], lib.entries()
    for b in blocks:
        if lib.entry_ok(entries.get(b.key), verify=True):
            continue
        local = local_layer_tensors(tensors, b.layer)
        part = attention_part(local) if b.kind == "attention" else ffn_part(local) if b.kind == "ffn" else local
        lib.add_block(b.key, part, {"init": "parent", "tokens": 0, "steps": 0, "init_nmse": 0.0,
                                    "final_nmse": 0.0, "params": b.num_params(arch)})
        written.append(b.key)
    return written


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (sections search_space: and bld:)")
    p.add_argument("--run-dir", required=True, help="run directory with parent/ and data/; library/ is written here")
    p.add_argument("--tp", type=int, default=None, help="override bld.tensor_parallel")
    p.add_argument("--pp", type=int, default=None, help="override bld.pipeline_parallel")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for flag, key in ((args.tp, "tensor_parallel"), (args.pp, "pipeline_parallel")):
        if flag is not None:
            cfg = {**cfg, "bld": {**(cfg.get("bld") or {}), key: flag}}
    res = run_bld(args.run_dir, cfg, progress=not args.no_progress, threads=args.threads)
    if res["rank"] == 0:
        print(f"[bld] rank 0 done: trained {len(res['trained'])} block(s) in {res['timings']['total_s']:.1f}s; "
              f"library {RunDir(args.run_dir).library}")
    return 0
