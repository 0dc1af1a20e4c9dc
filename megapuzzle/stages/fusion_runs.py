"""Fused-run blocks (FFN Fusion inside the search, issue #16): BLD across a run, replace-the-run KL.

A run block replaces parent layers i..j by ONE layer: the parent's attention at i and an FFN of
width W, the run's other layers no-op / no-op (megapuzzle.fusion.run_arch). Both stages run the
blocks through the ordinary, scaled paths; no rank loads the whole parent:

* `run_bld`: the blocks are one more kind of BLD work item (a `BlockSpec` of kind ffn with a
  `last` layer), trained by megapuzzle.stages.bld.train.train_rank exactly like decoupled FFN blocks:
  the rank's teacher share (TP / PP-sharded, read lazily in the run's dtype) gives the parent's
  stream after layer i's attention (input) and out of layer j (target), normalized MSE on the
  run's update (out of j minus into i), a Megatron mixed-precision optimizer per block, lockstep,
  DP split, resume after kill -9 and progress output as bld's own. The block starts from the
  exact fold (megapuzzle.fusion.fold_run) of the parent's FFNs i..j (width = their sum) or of a
  narrower variant's trained library blocks at every layer of the run (fusion_library's
  `narrower_starts`); a rank reads only those FFN tensors for it. The parent's attention at i
  stays frozen (so the block pairs with any attention variant there and scores add up as in
  decoupled BLD). Written to RUN/library_runs (megapuzzle.fusion_library).
  Under PP a block trains on the stage of its last layer j; when layer i is on an earlier stage,
  the teacher streams x_i / m_i travel there with the boundary state (stages/bld/pp_relay.py: run_carries).
* `score_runs`: megapuzzle.stages.score.score's cached parent pass: per batch the parent's streams and
  log-probs once, then a run block's layer applied to the stream entering layer i, stacked with
  the other candidates of the same (i, j) through the parent's layers j+1..L-1 + head. KL(parent
  || run), LM loss minus the parent's, top-1 agreement, as before; blocks split over DP ranks,
  resumable per rank (RUN/state/score_runs/).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from megapuzzle.arch import Architecture, FFNVariant, LayerArch
from megapuzzle.errors import UserError
from megapuzzle.fusion import FFN_NAMES, fold_run, init_run_block, run_arch, run_block_layer  # noqa: F401
from megapuzzle.fusion_library import (RUNS_DIR, RunLibrary, iter_child_with_runs, load_run_index,  # noqa: F401
                                       narrower_starts, run_block_ffn, run_key, run_score_value, run_windows)

log = logging.getLogger(__name__).info


# ----------------------------------------------------------------------------- BLD

def plan_run_blocks(parent: Architecture, library, max_run: int):
    """(BlockSpecs, {key: first / last / start / sources}) of every run window of 2..max_run layers:
    the fold of the parent's FFNs, and per narrower FFN variant the library holds at all its layers,
    the fold of those blocks."""
    from megapuzzle.stages.bld.plan import BlockSpec

    specs, runs = [], {}
    for i, j in run_windows(parent, max_run):
        starts = [(None, [])] + narrower_starts(parent, library, i, j)
        for start, sources in starts:
            width = (run_block_layer(parent, i, j).ffn if start is None else
                     FFNVariant("mlp", start.intermediate_size * (j - i + 1)))
            key = run_key(i, j, width)
            specs.append(BlockSpec(key, i, "ffn", LayerArch(parent.layers[i].attention, width), False, last=j))
            runs[key] = {"first": i, "last": j, "start": "parent" if start is None else start.name,
                         "sources": sources}
    return specs, runs


def _decide(sink: RunLibrary, arch, specs, runs, state_root: Path, dp: int, sig: str, stages, max_run: int) -> dict:
    from megapuzzle.stages.bld.bld import _plan_for_ranks

    windows = set(run_windows(arch, max_run))
    with sink.locked_index() as idx:  # drop blocks of windows no longer asked for (a lower fusion_max_run)
        idx["blocks"] = {k: e for k, e in idx["blocks"].items() if (e["first"], e["last"]) in windows}
    entries = sink.entries()
    todo = [b for b in specs if not (sink.entry_ok(entries.get(b.key)) and entries[b.key].get("bld_signature") == sig
                                     and entries[b.key].get("sources") == runs[b.key]["sources"])]
    if todo:
        assign = _plan_for_ranks(state_root, todo, arch, dp, sig, stages)
    else:
        assign = [[[] for _ in range(dp)] for _ in stages]
        shutil.rmtree(state_root, ignore_errors=True)
    log(f"[bld-runs] {len(specs)} run blocks; {len(todo)} to train over {len(stages)} stage(s) x {dp} "
        f"data-parallel rank(s); {len(specs) - len(todo)} present")
    return {"todo": [b.key for b in todo], "assign": assign}


def run_bld(run_root, bld_cfg, max_run: int, *, progress: bool = False) -> dict:
    """Train (and store) the fused FFN of every run window of 2..max_run layers into RUN/library_runs
    with BLD's settings and parallelism (bld.tensor_parallel / pipeline_parallel; DP = the rest of the
    world). Blocks stored under the same BLD settings, parent and sources are kept. Returns the index."""
    from megapuzzle.stages.bld.plan import check_tensor_parallel, tensor_sig
    from megapuzzle.stages.bld.train import train_rank
    from megapuzzle.checkpoints.canonical import load_arch, load_checkpoint, require_parent
    from megapuzzle.config import RunDir
    from megapuzzle.library import BlockLibrary, ffn_key
    from megapuzzle.model.config import stage_layer_ranges
    from megapuzzle.runtime.distributed import init_distributed, rank0_decides

    cfg, run = bld_cfg, RunDir(run_root)
    stages = stage_layer_ranges(load_arch(require_parent(run)).num_layers, cfg.pipeline_parallel)
    info = init_distributed(tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel, seed=cfg.seed)
    arch, parent_tensors, _ = load_checkpoint(require_parent(run))  # lazy: each rank reads its share
    run.require_data("train")
    run.require_data("heldout")
    library = BlockLibrary(run.library)
    specs, runs = plan_run_blocks(arch, library, max_run)
    check_tensor_parallel(arch, specs, info.tp_size)
    sink = RunLibrary(run.root, runs)
    state_root = run.state / "bld_runs" / tensor_sig(",".join(b.key for b in specs))
    sig = tensor_sig(cfg.training_signature() + arch.to_json())
    d = rank0_decides(lambda: _decide(sink, arch, specs, runs, state_root, info.dp_size, sig, stages, max_run),
                      "plan the run blocks", (UserError, ValueError, OSError))
    todo, plan_keys = set(d["todo"]), d["assign"][info.pp_rank][info.dp_rank]
    mine = [b for b in specs if b.key in todo and b.key in set(plan_keys)]
    role = None
    if info.pp_size > 1:  # a block trains on its last layer's stage; x / m of its first layer travel there
        from megapuzzle.stages.bld.pp_relay import PipelineRole, deepest_stage, run_carries

        carries = run_carries(d["assign"], todo, info.dp_rank, {b.key: b.layer for b in specs}, stages)
        s = info.pp_rank
        role = PipelineRole(s, deepest_stage(d["assign"], todo, info.dp_rank), carries[s - 1] if s else (), carries[s])

    def fold_init(b):  # the exact fold: only FFNs i..j are read (parent, lazily, or library blocks)
        start = runs[b.key]["start"]
        ffns = None if start == "parent" else [library.load_block(ffn_key(k, FFNVariant.from_name(start)))
                                               for k in range(b.layer, b.last + 1)]
        return fold_run(arch, parent_tensors, b.layer, b.last, ffns)[1], f"fold of {start}"

    res: dict[str, Any] = {}
    if mine or (role is not None and role.deepest >= 0):
        res = train_rank(run, cfg, arch, parent_tensors, mine, sink, info, state_dir=state_root / f"rank{info.rank:03d}",
                         signature=sig, plan_keys=plan_keys, progress=progress, role=role, init=fold_init)
    if info.world_size > 1:
        torch.distributed.barrier()  # every rank's blocks are in the index before anyone reads it
    index = load_run_index(run.root)
    index["rank_result"] = {"trained": [b.key for b in mine], **{k: v for k, v in res.items() if k != "timings"}}
    return index


# ----------------------------------------------------------------------------- score

def score_runs(run_root, score_cfg, *, tp: int | None = None, pp: int | None = None,
               progress: bool = False) -> dict:
    """Replace-the-run scores of every stored run block (with the parent's attention at i), on
    score's batches, through score's cached parent pass: kl, lm_loss_delta (vs the parent, same
    batches), top1. Blocks split over the data-parallel ranks; finished ones survive a kill."""
    import json

    from megapuzzle.checkpoints.canonical import load_checkpoint, require_parent
    from megapuzzle.config import RunDir
    from megapuzzle.fileio import atomic_write_json
    from megapuzzle.runtime.distributed import init_distributed
    from megapuzzle.runtime.dtypes import resolve_dtype
    from megapuzzle.stages.score.score import (BlockRef, agree_on_done, build_parent_stage, heldout_batches,
                                               parent_metrics, score_blocks)
    from megapuzzle.train import faults

    run = RunDir(run_root)
    tp = score_cfg.tensor_parallel if tp is None else tp
    info = init_distributed(tp=tp, pp=score_cfg.pipeline_parallel if pp is None else pp)
    dtype = resolve_dtype(score_cfg.dtype)
    parent, tensors, _ = load_checkpoint(require_parent(run), dtype=dtype)  # lazy: the rank's share
    lib = RunLibrary(run.root)
    settings = {"batch_size": score_cfg.batch_size, "seq_len": score_cfg.seq_len, "num_batches": score_cfg.num_batches}
    if dtype != torch.float32:
        settings["dtype"] = str(dtype).replace("torch.", "")
    index = load_run_index(run.root)
    fresh = index.get("score_settings") != settings  # other scoring batches: every block is scored again
    refs = [BlockRef(k, e["first"], LayerArch(parent.layers[e["first"]].attention, FFNVariant.from_name(e["ffn"])),
                     last=e["last"]) for k, e in sorted(index["blocks"].items())]
    mine = [r for n, r in enumerate(refs) if n % info.dp_size == info.dp_rank]
    state = run.state / "score_runs" / f"rank{info.rank:03d}.json"
    done: dict[str, Any] = {}
    for f in sorted((run.state / "score_runs").glob("*.json")):  # any rank's finished blocks count
        saved = json.loads(f.read_text())
        if saved.get("settings") == settings:
            done.update({k: v for k, v in saved["blocks"].items() if k in index["blocks"]
                         and v.get("sha256") == index["blocks"][k]["sha256"]})
    if not fresh:
        done.update({k: {"kl": e["kl"], "lm_loss": None, "top1": e["top1"], "sha256": e["sha256"]}
                     for k, e in index["blocks"].items() if "kl" in e and k not in done})
    done = agree_on_done(mine, done, info.device)  # one schedule for every rank of a pipeline
    todo = [r for r in mine if r.key not in done]
    model = build_parent_stage(parent, tensors, dtype)
    batches = heldout_batches(run, score_cfg)
    counter = {"n": 0}

    def on_done(key, res):  # every rank of the pipeline; the metrics on its last stage
        if res is not None:
            done[key] = {**res, "sha256": index["blocks"][key]["sha256"]}
            if info.tp_rank == 0:  # one writer per pipeline: its last stage's TP rank 0
                atomic_write_json(state, {"settings": settings, "blocks": done})
            log(f"[fusion-score] {key}: KL {res['kl']:.4f}, top-1 agreement {res['top1']:.3f}")
        counter["n"] += 1
        if faults.reached("score_runs", counter["n"]):
            raise _Stop

    try:
        if todo:
            score_blocks(parent, tensors, model, lib, todo, batches, score_cfg, tp, {}, on_done)
    except _Stop:
        return {"stopped_after": counter["n"], "blocks": {}}
    if info.world_size > 1:
        torch.distributed.barrier()
    parent_lm = parent_metrics(model, batches, score_cfg.top_k)["lm_loss"]  # collective under TP / PP: every rank
    if info.rank != 0:
        return load_run_index(run.root)
    merged: dict[str, Any] = {}
    for f in sorted((run.state / "score_runs").glob("*.json")):
        saved = json.loads(f.read_text())
        if saved.get("settings") == settings:
            merged.update(saved["blocks"])
    with lib.locked_index() as idx:
        if idx.get("score_settings") != settings:
            for e in idx["blocks"].values():
                for k in ("kl", "lm_loss_delta", "top1"):
                    e.pop(k, None)
        idx["score_settings"] = settings
        for k, e in idx["blocks"].items():
            m = merged.get(k)
            if m is not None and m.get("sha256") == e["sha256"] and m.get("lm_loss") is not None:
                e.update(kl=m["kl"], lm_loss_delta=m["lm_loss"] - parent_lm, top1=m["top1"])
        missing = [k for k, e in idx["blocks"].items() if "kl" not in e]
    if missing:
        raise UserError(f"run-block scores missing after scoring (e.g. {missing[0]}); re-run score")
    return load_run_index(run.root)


class _Stop(Exception):
    pass
