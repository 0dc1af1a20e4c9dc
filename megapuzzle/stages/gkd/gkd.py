"""`megapuzzle gkd`: global knowledge distillation (Puzzle stage 8): heal the realized child.

    megapuzzle gkd --config CFG --run-dir RUN
    torchrun --nproc-per-node 4 -m megapuzzle.cli gkd --config CFG --run-dir RUN   # TP x PP x DP

The child (RUN/child) learns from the frozen parent (RUN/parent: eval mode, no grad), both
Megatron-core GPTModels, on RUN/data/train with

    L = cosine_weight * sum_l mean_tokens (1 - cos(h_child^l, h_parent^l))
      + kl_weight     * mean_tokens T^2 KL(softmax(z_parent / T) || softmax(z_child / T))
      + lm_weight     * mean_tokens CE(z_child, next token)            (default 0: it hurt in the paper)

h^l = the residual stream at the OUTPUT of layer l (same layer count; the last one is the final
norm's input), from forward hooks. KL and CE run on the vocab-parallel logit shards (no TP
all-gather of [tokens, vocab]), like Megatron's vocab_parallel_cross_entropy; T^2 keeps the
gradient scale independent of the temperature. The parent keeps its final hidden state, not its
logits; the loss applies its output layer, gkd.loss_chunk_tokens tokens at a time (train/vocab_kd.py).

gkd.recompute (none / selective / full) is Megatron's activation recompute of the child; the
hooks record only the original forward, not the re-run in the backward (train/distill.py).
gkd.sequence_parallel splits both models' streams along the sequence over TP: each rank's cosine terms
are its own tokens' share (summed over TP when reported), the KL / LM terms gather the final hidden states.

How it trains (batches, schedule, PP, the two trainers, activation memory, precision, what it
writes): docs/design.md, "GKD".
"""

from __future__ import annotations

import logging
import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megapuzzle.checkpoints.canonical import checkpoint_fingerprint, first_dtype
from megapuzzle.config import RunDir, load_config, section, section_dict
from megapuzzle.config.gkd import DEFAULT_STEPS, GKDConfig  # noqa: F401 (the stage's config)
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json
from megapuzzle.stages.gkd.trainers import TRAINERS, legacy_trainer, make_trainer, resolve_trainer, resume_point
from megapuzzle.metrics import heldout_metrics
from megapuzzle.train.distill import distill_terms, sequence_share, sequence_shards

log = logging.getLogger(__name__).info

TERMS = ("loss", "cosine", "kl", "lm")


def _combine(terms: dict[str, torch.Tensor], w: dict[str, float], shards: int = 1) -> dict[str, torch.Tensor]:
    """Token means, the cosine term summed over layers, and the weighted total (under sequence
    parallelism the cosine term is this rank's tokens' share: `train.distill.sequence_share`)."""
    m = {"cosine": sequence_share(terms["cosine"].mean(dim=(1, 2)), shards).sum(), "kl": terms["kl"].mean(),
         "lm": terms["lm"].mean()}
    m["loss"] = sum(w[k] * m[k] for k in ("cosine", "kl", "lm") if w[k] > 0)
    return m


# ----------------------------------------------------------------------------- held-out metrics

@torch.no_grad()
def evaluate_heldout(child, parent, heldout, cfg: GKDConfig, info) -> dict[str, float]:
    """Held-out KL(parent || child), child and parent LM loss, summed per-layer cosine term and
    the weighted loss; the fixed eval batches are split over DP ranks and the sums all-reduced."""
    from megatron.core import parallel_state as ps

    was = child.training
    child.eval()
    dev = next(parent.parameters()).device
    acc = torch.zeros(5, dtype=torch.float64, device=dev)  # cosine, kl, lm, parent lm, tokens
    sp = sequence_shards(parent) > 1  # each TP rank's cosine sum covers its own tokens only
    for i, batch in enumerate(heldout.eval_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches)):
        if i % info.dp_size != info.dp_rank:
            continue
        for mb in batch.to(dev).split(cfg.micro_batch_size or cfg.batch_size):
            tokens, labels = mb[:, :-1], mb[:, 1:]
            t = distill_terms(child, parent, tokens, labels, cfg.temperature, parent_lm=True,
                             chunk=cfg.loss_chunk_tokens)
            acc += torch.stack([t["cosine"].sum(), t["kl"].sum(), t["lm"].sum(), t["parent_lm"].sum(),
                                torch.tensor(float(labels.numel()), device=dev)]).double()
    if sp:
        dist.all_reduce(acc[:1], group=ps.get_tensor_model_parallel_group())
    if info.dp_size > 1:
        dist.all_reduce(acc, group=ps.get_data_parallel_group())
    child.train(was)
    return heldout_metrics(acc, cosine_weight=cfg.cosine_weight, kl_weight=cfg.kl_weight, lm_weight=cfg.lm_weight)


# ----------------------------------------------------------------------------- the stage

def _signature(cfg: GKDConfig, info, parent_dir: Path, child_dir: Path, trainer: str) -> str:
    """Everything that changes the trained weights (not logging / checkpoint cadence / eval)."""
    d = {k: v for k, v in section_dict(cfg).items() if k not in ("checkpoint_every", "log_every", "eval_batches",
                                                                 "threads", "optimizer", "overlap_grad_reduce",
                                                                 "recompute", "parent_pass_micro_batches",
                                                                 "loss_chunk_tokens", "sequence_parallel")}
    if trainer != legacy_trainer():  # the resolved trainer; as before gkd.optimizer existed where it is
        d["trainer"] = trainer       # the one this machine always used (local on CPU, megatron on CUDA)
    if info.pp_size == 1:  # as before PP existed: earlier PP = 1 results stay valid
        d.pop("pipeline_parallel", None)
    if not cfg.fp8:  # likewise for the recipe, which only matters with fp8
        d.pop("fp8_recipe", None)
    world = [info.tp_size, info.dp_size] if info.pp_size == 1 else [info.tp_size, info.pp_size, info.dp_size]
    d.update(world=world, parent=checkpoint_fingerprint(parent_dir),
             child=checkpoint_fingerprint(child_dir), child_arch=(child_dir / "arch.json").read_text())
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_gkd(run_dir: str | Path, cfg: GKDConfig, *, progress: bool = True) -> dict:
    """Distil RUN/parent into RUN/child; returns result.json's content ({} on ranks > 0).
    Under `faults.kill_after("gkd", n)` (tests) it returns {"stopped_at": n} without saving,
    like a kill between checkpoints."""
    from megapuzzle.checkpoints.canonical import is_checkpoint, load_checkpoint, tokenizer_path, require_parent
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.model.config import ModelOptions
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import load_canonical_into_model, write_checkpoint_from_model
    from megapuzzle.runtime.distributed import init_distributed
    from megapuzzle.runtime.dtypes import resolve_dtype
    from megapuzzle.train.loop import TrainLoop
    from megapuzzle.train.schedule import LRSchedule
    from megapuzzle.train.train_logger import TrainLogger

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.fp8:  # fail at start, not after loading two models
        from megapuzzle.model.config import ModelConfigError, check_fp8, resolve_use_te

        try:
            check_fp8(True, resolve_use_te(None))
        except ModelConfigError as e:
            raise UserError(f"gkd.fp8: {e}") from None
    run = RunDir(run_dir)
    parent_dir = require_parent(run)
    if not is_checkpoint(run.child):
        raise UserError(f"{run.child} holds no child checkpoint; run `megapuzzle realize --run-dir {run.root}` first")
    train = PackedSequenceDataset.from_prefix(run.require_data("train"))
    heldout = PackedSequenceDataset.from_prefix(run.require_data("heldout"))
    info = init_distributed(tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel, seed=cfg.seed)
    main = info.rank == 0
    if cfg.batch_size % info.dp_size:
        raise UserError(f"gkd.batch_size {cfg.batch_size} is not divisible by the data-parallel size {info.dp_size}")
    local_batch = cfg.batch_size // info.dp_size
    micro = min(cfg.micro_batch_size or local_batch, local_batch)
    if local_batch % micro:
        raise UserError(f"the per-rank batch {local_batch} is not a multiple of gkd.micro_batch_size {micro}")
    if cfg.parent_pass_micro_batches and (local_batch // micro) % cfg.parent_pass_micro_batches:
        raise UserError(f"gkd.parent_pass_micro_batches {cfg.parent_pass_micro_batches} does not divide the "
                        f"{local_batch // micro} micro-batches per rank")
    trainer_name = resolve_trainer(cfg.optimizer)
    sig = _signature(cfg, info, parent_dir, run.child, trainer_name)
    result_file = run.gkd / "result.json"
    if result_file.is_file():
        res = json.loads(result_file.read_text())
        if res.get("signature") == sig:
            if main:
                log(f"[gkd] {run.gkd} already holds this distillation (result.json); nothing to do")
            return res if main else {}
        # Inputs changed (a re-realized child, another config): the stage runs again, as
        # `megapuzzle run` expects; the old checkpoint and result are replaced when it finishes.
        if main:
            log(f"[gkd] {run.gkd} holds a distillation of another config / child; distilling again")
    shared = trainer_name == "megatron"  # one dist-checkpoint dir for all ranks, else one dir per rank
    state_dir = run.gkd / "train_state" / ("dist" if shared else f"rank{info.rank:03d}")
    resume_point(state_dir, info, sig, shared)

    dtype = resolve_dtype(cfg.dtype)
    parent_arch, tensors, _ = load_checkpoint(parent_dir)
    child_arch, child_tensors, child_meta = load_checkpoint(run.child)
    for f in ("num_layers", "hidden_size", "vocab_size"):
        if getattr(parent_arch, f) != getattr(child_arch, f):
            raise UserError(f"child {f}={getattr(child_arch, f)} differs from the parent's {getattr(parent_arch, f)}; "
                            f"GKD compares layer i with layer i, so realize the child from this parent")
    if child_arch.num_layers < info.pp_size:
        raise UserError(f"gkd.pipeline_parallel {info.pp_size} exceeds the {child_arch.num_layers} layers")
    ckpt_dtype = first_dtype(child_tensors)
    # every weight is loaded right after; both models split their streams alike (the cosine compares shards)
    opts = ModelOptions(perform_initialization=False, sequence_parallel=cfg.sequence_parallel)
    # The teacher stays in bf16/fp32 even with fp8: its targets should be as exact as possible.
    parent = build_gpt_model(parent_arch, params_dtype=dtype, options=opts)
    load_canonical_into_model(parent, tensors, parent_arch)
    parent.eval().requires_grad_(False)
    # only the child trains: activation recompute (in training mode; Megatron skips it in eval) is its alone
    opts_child = dataclasses.replace(opts, recompute_granularity=None if cfg.recompute == "none" else cfg.recompute)
    if cfg.fp8:
        from megapuzzle.costs.timing import _FP8_RECIPES

        opts_child = dataclasses.replace(opts_child, extra={"fp8_recipe": _FP8_RECIPES[cfg.fp8_recipe]})
    child = build_gpt_model(child_arch, params_dtype=dtype, fp8=cfg.fp8, options=opts_child)
    load_canonical_into_model(child, child_tensors, child_arch)
    del tensors, child_tensors
    child.train()
    trainer = make_trainer(trainer_name, child, cfg, info, state_dir)
    model = trainer.model  # Megatron's DDP wrapper with the megatron trainer, else the child itself
    if info.pp_size > 1:
        from megapuzzle.stages.gkd import pipeline as gkd_pipeline

        evaluate = gkd_pipeline.evaluate_heldout_pp
    else:
        evaluate = evaluate_heldout

    resumed = trainer.load()
    start = resumed["step"] if resumed else 0
    if resumed:
        extra = resumed["extra"]
        if main:
            log(f"[gkd] resumed from step {start}")
    else:
        extra = {"signature": sig, "initial": evaluate(model, parent, heldout, cfg, info), "history": []}
    initial, history = extra["initial"], extra["history"]
    total = cfg.total_steps
    if main and not resumed:  # one line: sizes, budget, layout, where the child starts
        log(f"[gkd] child {child_arch.num_params() / 1e6:.2f}M params <- parent {parent_arch.num_params() / 1e6:.2f}M; "
            f"{total} steps x {cfg.tokens_per_step} tokens; TP {info.tp_size} x PP {info.pp_size} x DP {info.dp_size}; "
            f"held-out KL {initial['kl']:.4f}, cosine {initial['cosine']:.4f}, LM loss {initial['lm_loss']:.4f} "
            f"(parent {initial['parent_lm_loss']:.4f})")
    sched = LRSchedule(cfg.lr, total, cfg.warmup, cfg.min_lr)
    logger = TrainLogger(run.tb / "gkd" if main else None, total, prefix="gkd/", enabled=main)
    if main and start == 0:
        for k in ("kl", "cosine", "lm_loss", "loss"):
            logger.scalar(f"heldout/{k}", initial[k], 0)
    dev = next(child.parameters()).device
    w = {"cosine": cfg.cosine_weight, "kl": cfg.kl_weight, "lm": cfg.lm_weight}
    # interval sums on the device (no host sync per step): loss terms, grad norm, per-layer cosine
    nt = len(TERMS)
    window = torch.zeros(nt + 1 + child_arch.num_layers, dtype=torch.float64, device=dev)
    n_micro = local_batch // micro
    shards = sequence_shards(child)

    def step(i: int, lr: float) -> None:
        batch = train.batch(i, cfg.batch_size, cfg.seq_len, cfg.seed, rank=info.dp_rank, world_size=info.dp_size)
        trainer.zero_grad()
        if info.pp_size > 1:  # Megatron's 1F1B schedule; each stage adds its share to the window
            gkd_pipeline.train_microbatches(model, parent, batch.to(dev), micro, cfg, w, window, nt)
        else:
            for j, mb in enumerate(batch.to(dev).split(micro)):
                terms = distill_terms(model, parent, mb[:, :-1], mb[:, 1:], cfg.temperature,
                                      chunk=cfg.loss_chunk_tokens)
                m = _combine(terms, w, shards)
                with trainer.no_sync(last=j == n_micro - 1):  # grad reduce only with the last micro-batch
                    (m["loss"] / n_micro).backward()
                window[:nt] += torch.stack([m[k].detach() for k in TERMS]).double() / n_micro
                window[nt + 1:] += sequence_share(terms["cosine"].detach().mean(dim=(1, 2)), shards).double() / n_micro
        window[nt] += trainer.step(lr)

    def report(n: int, done: int) -> dict[str, float]:
        avg = window / done
        if shards > 1:  # each TP rank's cosine terms are its own tokens' share: the sum is the whole
            from megatron.core import parallel_state as ps

            part = torch.cat([avg[1:2], avg[nt + 1:]])
            dist.all_reduce(part, group=ps.get_tensor_model_parallel_group())
            avg[0] += w["cosine"] * (part[0] - avg[1])  # the loss is linear in its terms
            avg[1], avg[nt + 1:] = part[0], part[1:]
        if info.pp_size > 1:  # each stage holds the terms of its own layers (and the last the KL / LM)
            from megatron.core import parallel_state as ps

            dist.all_reduce(avg, group=ps.get_pipeline_model_parallel_group())
            avg[nt] = window[nt] / done
        if info.dp_size > 1:  # the loss terms of the global batch (the grad norm is global already)
            from megatron.core import parallel_state as ps

            dist.all_reduce(avg, group=ps.get_data_parallel_group())
            avg /= info.dp_size
            avg[nt] = window[nt] / done
        avg = avg.tolist()
        window.zero_()
        row = {"step": n, **dict(zip(TERMS, avg)), "lr": sched(n - 1), "grad_norm": avg[nt]}
        history.append(row)
        return {"loss": row["loss"], "cosine loss": row["cosine"], "kl loss": row["kl"], "lm loss": row["lm"],
                "grad norm": row["grad_norm"], **{f"cosine/layer_{i:03d}": v for i, v in enumerate(avg[nt + 1:])}}

    loop = TrainLoop("gkd", total, sched, logger, cfg.log_every, cfg.checkpoint_every, cfg.tokens_per_step,
                     progress=progress and main)
    stopped = loop.run(start, step, save=lambda n: trainer.save(n, extra), window=report)
    if stopped is not None:
        return {"stopped_at": stopped}

    final = evaluate(model, parent, heldout, cfg, info)
    out = run.gkd / "checkpoint"
    # collective, streamed: rank 0 writes layer by layer as the stages send them, never the whole child
    meta = {"source": "gkd", "steps": total, "tokens": total * cfg.tokens_per_step, "heldout": final,
            "child_meta": child_meta}
    write_checkpoint_from_model(child, child_arch, out, dtype=ckpt_dtype, tokenizer_dir=tokenizer_path(run.child),
                                force=True, meta=meta)
    result: dict = {}
    if main:
        for k in ("kl", "cosine", "lm_loss", "loss"):
            logger.scalar(f"heldout/{k}", final[k], total)
        logger.close()
        result = {
            "config": section_dict(cfg), "signature": sig, "steps": total, "tokens": total * cfg.tokens_per_step,
            "world": {"tp": info.tp_size, "dp": info.dp_size, **({"pp": info.pp_size} if info.pp_size > 1 else {})},
            "trainer": trainer_name,
            "parent": str(parent_dir), "child": str(run.child),
            "checkpoint": str(out), "child_params": child_arch.num_params(), "parent_params": parent_arch.num_params(),
            "initial": initial, "final": final, "history": history, "resumed_from_step": start,
            "wall_seconds_this_run": time.perf_counter() - t_start,
        }
        atomic_write_json(result_file, result)  # written last: its presence means "done"
        log(f"[gkd] held-out KL {initial['kl']:.4f} -> {final['kl']:.4f}, cosine {initial['cosine']:.4f} -> "
            f"{final['cosine']:.4f}, LM loss {initial['lm_loss']:.4f} -> {final['lm_loss']:.4f} (parent "
            f"{final['parent_lm_loss']:.4f}); {time.perf_counter() - t_start:.0f}s -> {out}")
    if info.world_size > 1:
        dist.barrier()  # result.json exists before any rank drops its state
    if not shared or main:
        shutil.rmtree(state_dir, ignore_errors=True)  # the final checkpoint holds the weights
    return result


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML with a gkd: section (defaults otherwise)")
    p.add_argument("--run-dir", required=True, help="run directory with parent/, child/ and data/; writes gkd/")
    p.add_argument("--steps", type=int, help="override gkd.steps (and drop gkd.tokens)")
    p.add_argument("--tp", type=int, help="override gkd.tensor_parallel")
    p.add_argument("--pp", type=int, help="override gkd.pipeline_parallel")
    p.add_argument("--threads", type=int, help="override gkd.threads")
    p.add_argument("--optimizer", choices=TRAINERS,
                   help="override gkd.optimizer (auto: megatron on CUDA, local on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def run_cli(args: argparse.Namespace) -> int:
    cfg = section(load_config(args.config) if args.config else {}, "gkd", GKDConfig)
    over = {k: v for k, v in (("steps", args.steps), ("tensor_parallel", args.tp), ("pipeline_parallel", args.pp),
                              ("threads", args.threads), ("optimizer", args.optimizer)) if v is not None}
    if "steps" in over:
        over["tokens"] = None
    if over:
        cfg = dataclasses.replace(cfg, **over)
    run_gkd(args.run_dir, cfg, progress=not args.no_progress)
    return 0
