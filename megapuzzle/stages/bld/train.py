"""One BLD rank's training (megapuzzle.stages.bld.bld decides, this trains): build the teacher and the
rank's student blocks, initialise them from the parent (FFN channel calibration for pruned
MLPs), measure the init NMSE, train every block in lockstep on the same global batches
(one teacher forward per batch, one backward per block, a Megatron mixed-precision AdamW per
block: fp32 master weights for bf16 params, per-block gradient clipping; cosine schedule),
checkpoint every `checkpoint_every` steps, measure the final NMSE and write the blocks to the
library.

Resume: a rank restarts from its last checkpoint when the checkpoint belongs to the same plan
(signature + planned keys). TP ranks (and with PP > 1 every rank of the pipeline,
megapuzzle.stages.bld.pp_relay) agree on the step or all restart. With PP > 1 every stage of a
pipeline up to the deepest one with work runs the same teacher passes (relaying the boundary
hidden state), whether it trains blocks or not.
"""

from __future__ import annotations

import logging
import json
import shutil
import time
from pathlib import Path

import torch

from megapuzzle.arch import Architecture
from megapuzzle.stages.bld.plan import BLDConfig, BlockSpec, tensor_sig
from megapuzzle.checkpoints.canonical import first_dtype
from megapuzzle.config import RunDir
from megapuzzle.fileio import save_safetensors_atomic
from megapuzzle.library import BlockLibrary

log = logging.getLogger(__name__).info


def _saved_state(state_dir: Path) -> tuple[str, int, list[str]] | None:
    """(signature, step, block keys) of a rank's last checkpoint, or None."""
    from megapuzzle.train.state import latest_step_dir

    d = latest_step_dir(state_dir)
    if d is None:
        return None
    try:
        st = json.loads((d / "state.json").read_text())
        return st["extra"]["signature"], int(st["step"]), list(st["extra"]["keys"])
    except (json.JSONDecodeError, KeyError, OSError, TypeError, ValueError):
        return None


def _tp_agree(value: int) -> bool:
    """True when every rank of this TP group passes the same value."""
    from megatron.core import parallel_state as ps

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lo = torch.tensor([value], dtype=torch.int64, device=dev)
    hi = lo.clone()
    group = ps.get_tensor_model_parallel_group()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=group)
    return lo.item() == hi.item()


def _nmse_terms(student, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors, sum of squared targets) on the layer's update o = out - in (a
    fused-run block: on the run's update, the stream out of its last layer minus the one into its first)."""
    i = student.layer_index
    x = t.x[i].float()  # in fp32 whatever the params' dtype: bf16 differences would lose the small updates
    target = t.y[student.last].float() - x
    err = (student(t).float() - x) - target
    return err.pow(2).sum(), target.pow(2).sum()


def evaluate(teacher, students, heldout, cfg: BLDConfig) -> dict[str, float]:
    """NMSE per block over the fixed held-out batches (ratio of sums over all their tokens)."""
    num = {s.key: 0.0 for s in students}
    den = dict(num)
    with torch.no_grad():
        for batch in heldout.eval_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches):
            t = teacher.forward(batch[:, :-1])
            for s in students:
                a, b = _nmse_terms(s, t)
                num[s.key] += a.item()
                den[s.key] += b.item()
    return {k: num[k] / max(den[k], 1e-30) for k in num}


def _calibrate(teacher, train, cfg: BLDConfig, arch: Architecture, tensors: dict, layers: set[int]) -> dict:
    """C_i per channel of each layer's parent FFN, on the first calibration_batches training batches."""
    from megapuzzle.init import FFNChannelScorer, local_layer_tensors

    scorers = {i: FFNChannelScorer(local_layer_tensors(tensors, i), arch.rms_norm_eps) for i in layers}
    for k in range(cfg.calibration_batches):
        t = teacher.forward(train.batch(k, cfg.batch_size, cfg.seq_len, cfg.seed)[:, :-1])
        for i, s in scorers.items():
            s.update(t.m[i])
    return {i: s.scores() for i, s in scorers.items()}


def _init_tensors(arch: Architecture, b: BlockSpec, tensors: dict, scores: dict) -> tuple[dict, str]:
    from megapuzzle.init import init_attention, init_ffn, local_layer_tensors

    local = local_layer_tensors(tensors, b.layer)
    own = arch.layers[b.layer]
    out, methods = {}, []
    if b.kind in ("attention", "layer"):
        t, m = init_attention(arch, own.attention, b.variant.attention, local)
        out.update(t)
        methods.append(m)
    if b.kind in ("ffn", "layer"):
        t, m = init_ffn(own.ffn, b.variant.ffn, local, scores.get(b.layer))
        out.update(t)
        methods.append(m)
    return out, "+".join(methods)


def _resume_point(state_dir: Path, keys_sig: str, mine: list[BlockSpec], steps: int) -> tuple | None:
    """This rank's own saved state when it can resume it: same plan, and either the same blocks
    or a finished state holding them (a rank killed while writing its blocks)."""
    saved, mine_keys = _saved_state(state_dir), sorted(b.key for b in mine)
    ok = saved is not None and saved[0] == keys_sig and (
        saved[2] == mine_keys or (saved[1] == steps and set(mine_keys) <= set(saved[2])))
    return saved if ok else None


def train_rank(rd: RunDir, cfg: BLDConfig, arch: Architecture, parent_tensors: dict, mine: list[BlockSpec],
               lib: BlockLibrary, info, *, state_dir: Path, signature: str, plan_keys: list[str],
               progress: bool = True, role=None, init=None) -> dict:
    """Train this rank's blocks in lockstep and write them to the library. `role` (PP > 1): this
    rank's megapuzzle.stages.bld.pp_relay.PipelineRole; every rank of a pipeline with work calls this,
    `mine` may then be empty (a relay-only stage, or a stage beyond the deepest one with work).
    `init(b)` -> (layer-local tensors, method): how blocks start when not the parent's usual init
    (fused-run blocks: the fold, megapuzzle.fusion_blocks); `lib` is then where they are written."""
    from megapuzzle.stages.bld.blocks import StudentBlock, Teacher
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.model.config import ModelOptions
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import load_canonical_into_model
    from megapuzzle.train.block_optimizer import BlockOptimizers
    from megapuzzle.train.loop import TrainLoop
    from megapuzzle.train.schedule import LRSchedule
    from megapuzzle.train.state import load_train_state, save_train_state
    from megapuzzle.train.train_logger import TrainLogger

    tim = dict.fromkeys(("setup_s", "calibration_s", "teacher_s", "students_s", "eval_s", "write_s"), 0.0)
    t0 = time.perf_counter()
    main, leader = info.rank == 0, info.tp_rank == 0
    talk = leader and info.dp_rank == 0  # per-block lines: one rank per stage (rank 0 without PP)
    # The state belongs to this rank's whole planned key set: a rank killed while writing its
    # finished blocks resumes the rest from the final checkpoint instead of retraining them.
    keys_sig = tensor_sig(signature + "|" + ",".join(sorted(plan_keys)))
    mine_keys = sorted(b.key for b in mine)
    saved = _resume_point(state_dir, keys_sig, mine, cfg.steps) if mine else None
    resume = saved is not None
    if role is None and info.tp_size > 1 and not _tp_agree(saved[1] if resume else -1):
        resume = False  # a kill mid-save left the TP ranks at different steps: restart together
    train = PackedSequenceDataset.from_prefix(rd.train_data)
    heldout = PackedSequenceDataset.from_prefix(rd.heldout_data)
    # PP: every stage builds its shard as Megatron does (tied embeddings: first and last stage
    # synchronise them at construction), even a stage that then has nothing to do.
    dtype = cfg.params_dtype
    model = build_gpt_model(arch, params_dtype=dtype, options=ModelOptions(perform_initialization=False))
    if role is None or role.active:
        load_canonical_into_model(model, parent_tensors, arch)
    prune = {b.layer for b in mine if b.kind != "attention" and b.last is None
             and b.variant.ffn.kind_spec.needs_calibration(arch.layers[b.layer].ffn, b.variant.ffn)}
    relay = None
    if role is not None and role.active:
        from megapuzzle.stages.bld.pp_relay import PipelineRelay

        relay = PipelineRelay(role, arch.hidden_size, model.config.params_dtype, next(model.parameters()).device)
    carry = set(role.carry_out) if role is not None else set()  # streams a later stage's run blocks need
    teacher = Teacher(model, {b.layer for b in mine} | {b.end for b in mine} | carry,
                      {b.layer for b in mine if b.kind == "ffn"} | prune | carry, relay)
    fp8 = cfg.fp8_recipe if cfg.fp8 else None
    students = [StudentBlock(b.key, b.kind, b.layer, arch, b.variant, teacher, info.tp_size, fp8, dtype, b.last)
                for b in mine]
    spec = {b.key: b for b in mine}
    named = {f"{s.key}/{n}": p for s in students for n, p in s.trainable().items()}
    for p in named.values():
        p.requires_grad_(True)
    trainable = [s for s in students if s.owned]
    any_prune, any_trainable = bool(prune), bool(trainable)
    if role is not None:  # the whole pipeline (TP x PP of this replica) starts at one step
        from megatron.core import parallel_state as ps

        from megapuzzle.stages.bld.pp_relay import agree_on_step, any_flags

        group = ps.get_model_parallel_group()
        step = agree_on_step((saved[1] if resume else -1) if mine else None, group)
        resume = step >= 0
        any_prune, any_trainable = any_flags([any_prune, any_trainable], group)
        if not role.active:
            return {"resumed_from": None, "timings": tim}
    if not resume:
        shutil.rmtree(state_dir, ignore_errors=True)  # another plan / config: start these blocks afresh
    opt = BlockOptimizers({s.key: {f"{s.key}/{n}": p for n, p in s.trainable().items()} for s in trainable},
                          lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip) if named else None
    tim["setup_s"] = time.perf_counter() - t0

    start, init_nmse, methods = 0, {}, {}
    if resume and mine:
        # optimizer moments only when every saved block is still to train (else training is over)
        moments = saved[2] == mine_keys
        st = load_train_state(state_dir, named, opt if moments else None)
        if opt is not None and not moments:
            opt.reload_model_params()
        start, init_nmse, methods = st["step"], st["extra"]["init_nmse"], st["extra"]["init"]
        if talk:
            log(f"[bld] resumed {len(mine)} block(s) from step {start}")
    elif resume:  # relay-only stage: the step the pipeline agreed on
        start = step
    else:
        t = time.perf_counter()
        # every stage of a pipeline runs the calibration passes when one of them prunes
        scores = _calibrate(teacher, train, cfg, arch, parent_tensors, prune) if any_prune else {}
        tim["calibration_s"] = time.perf_counter() - t
        for s in students:
            tensors, methods[s.key] = (_init_tensors(arch, spec[s.key], parent_tensors, scores) if init is None
                                       else init(spec[s.key]))
            s.load_canonical(tensors)
        if opt is not None:
            opt.reload_model_params()  # the fp32 master weights start from the init just loaded
        t = time.perf_counter()
        init_nmse = evaluate(teacher, students, heldout, cfg)
        tim["eval_s"] += time.perf_counter() - t
        if cfg.keep_best and named:  # this rank's shards of the init weights, for keep_best
            save_safetensors_atomic(named, state_dir / INIT_PARAMS)
    extra = {"signature": keys_sig, "keys": mine_keys, "init_nmse": init_nmse, "init": methods}

    total = cfg.steps if any_trainable else 0
    sched = LRSchedule(cfg.lr, max(total, 1), min(cfg.warmup, max(total - 1, 0)), cfg.min_lr)
    tb = rd.tb / "bld" / (f"dp{info.dp_rank:03d}" if role is None else f"dp{info.dp_rank:03d}_pp{info.pp_rank:03d}")
    logger = TrainLogger(tb, total, prefix="bld/", enabled=leader and bool(mine))
    if leader and start == 0:
        for k, v in init_nmse.items():
            logger.scalar(f"eval_nmse/{k}", v, 0)
    window: dict[str, list[float]] = {s.key: [] for s in trainable}

    def step(i: int, lr: float) -> dict:
        tokens = train.batch(i, cfg.batch_size, cfg.seq_len, cfg.seed)[:, :-1]  # same batch on every rank
        t = time.perf_counter()
        tout = teacher.forward(tokens)  # PP: a relay-only stage just passes the boundary state on
        t1 = time.perf_counter()
        norms = []
        if trainable:
            opt.set_lr(lr)
            for s in trainable:  # one backward per block: no graph spans two blocks, activations freed early
                num, den = _nmse_terms(s, tout)
                loss = num / den
                loss.backward()
                window[s.key].append(loss.item())
            norms = opt.step()  # per block: fp32 main grads, clip on the block's TP-reduced norm, AdamW
            opt.zero_grad()
        tim["teacher_s"] += t1 - t
        tim["students_s"] += time.perf_counter() - t1
        return {"grad norm max": max(norms)} if norms else {}

    def block_means(n: int, done: int) -> dict | None:
        if not window:
            return None  # no block of its own trains here: nothing to log
        means = {k: sum(v) / len(v) for k, v in window.items()}
        for v in window.values():
            v.clear()
        return {"nmse mean": sum(means.values()) / len(means), "nmse max": max(means.values()),
                **loop.last, **{f"nmse/{k}": v for k, v in means.items()}}

    loop = TrainLoop("bld", total, sched, logger, cfg.log_every, cfg.checkpoint_every, cfg.tokens_per_step,
                     console=main, progress=progress and main)
    save = (lambda n: save_train_state(state_dir, n, named, opt, extra)) if mine else None
    stopped = loop.run(start, step, save=save, window=block_means)
    if stopped is not None:
        return {"stopped_at": stopped, "resumed_from": start if resume else None, "timings": tim}

    t = time.perf_counter()
    final = evaluate(teacher, students, heldout, cfg)
    tim["eval_s"] += time.perf_counter() - t
    kept = _keep_best(trainable, final, init_nmse, state_dir) if cfg.keep_best else {}
    t = time.perf_counter()
    _write_blocks(lib, students, spec, arch, first_dtype(parent_tensors), dtype, signature, total * cfg.tokens_per_step,
                  total, methods, init_nmse, final, kept, logger, leader, talk)
    tim["write_s"] = time.perf_counter() - t
    logger.close()
    shutil.rmtree(state_dir, ignore_errors=True)  # the library now holds these blocks
    return {"resumed_from": start if resume else None, "timings": tim,
            "nmse": {k: (init_nmse[k], final[k]) for k in final}}


def _write_blocks(lib: BlockLibrary, students, spec: dict, arch: Architecture, lib_dtype: torch.dtype,
                  dtype: torch.dtype, signature: str, tokens: int, steps: int, methods: dict, init_nmse: dict,
                  final: dict, kept: dict, logger, leader: bool, talk: bool) -> None:
    """Every student into the library (in the parent's dtype), with its init, NMSEs and provenance.
    Collective over the TP group (each student is gathered); TP rank 0 writes."""
    for s in students:
        tensors = s.gather_canonical()  # collective over the TP group: every TP rank calls it
        if not leader:
            continue
        tensors = {k: v.to(lib_dtype) for k, v in tensors.items()}
        b, trained = spec[s.key], bool(s.owned)
        lib.add_block(s.key, tensors, {
            "init": methods[s.key], "tokens": tokens if trained else 0,
            "steps": steps if trained else 0, "init_nmse": init_nmse[s.key],
            "final_nmse": (init_nmse[s.key] if kept.get(s.key) == "init" else final[s.key]) if trained
            else init_nmse[s.key], "trained_nmse": final[s.key] if trained else None,
            "kept": kept.get(s.key, "trained") if trained else None,
            "params": b.num_params(arch), "bld_signature": signature,
            "trained_dtype": str(dtype).replace("torch.", "") if trained else None})
        logger.scalar(f"eval_nmse/{s.key}", final[s.key], steps)
        if talk:
            log(f"[bld] {s.key}: nmse {init_nmse[s.key]:.4f} -> {final[s.key]:.4f} ({methods[s.key]})"
                + ("; kept the init weights (lower held-out NMSE)" if kept.get(s.key) == "init" else ""))


INIT_PARAMS = "init_params.safetensors"


def _keep_best(trainable, final: dict, init_nmse: dict, state_dir: Path) -> dict[str, str]:
    """Put back the init weights of every block whose held-out NMSE got worse in training.
    Every TP rank computes the same NMSEs (TP-reduced), so every rank decides alike."""
    from megapuzzle.fileio import read_safetensors

    worse = [s for s in trainable if final[s.key] > init_nmse[s.key]]
    if not worse:
        return {}
    path = state_dir / INIT_PARAMS
    if not path.is_file():  # a state from before keep_best existed
        log(f"[bld] {path} missing: keeping the trained weights of {len(worse)} block(s) that got worse")
        return {}
    init = read_safetensors(path, fix=f"delete {state_dir} to retrain these blocks from their init")
    with torch.no_grad():
        for s in worse:
            for n, p in s.owned.items():
                p.copy_(init[f"{s.key}/{n}"].to(device=p.device, dtype=p.dtype))
    return {s.key: "init" for s in worse}
