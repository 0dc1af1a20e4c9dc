"""`megapuzzle gkd`: global knowledge distillation (Puzzle stage 8): heal the realized child.

    megapuzzle gkd --config CFG --run-dir RUN
    torchrun --nproc-per-node 4 -m megapuzzle.cli gkd --config CFG --run-dir RUN   # TP x PP x DP

The child (RUN/child) learns from the frozen parent (RUN/parent: eval mode, no grad), both
Megatron-core GPTModels, on RUN/data/train with

    L = cosine_weight * sum_l mean_tokens (1 - cos(h_child^l, h_parent^l))
      + kl_weight     * mean_tokens T^2 KL(softmax(z_parent / T) || softmax(z_child / T))
      + lm_weight     * mean_tokens CE(z_child, next token)            (default 0: it hurt in the paper)

h^l = the residual stream at the OUTPUT of layer l (same layer count; the last one is the final
norm's input). The frozen parent runs layer by layer through model/runner.py, no grad
(train/parent_pass.py: the same stage-by-stage pass at every PP), and keeps each layer's output and
its final hidden state, not its logits; the loss applies its output layer, gkd.loss_chunk_tokens
tokens at a time (train/vocab_kd.py). The child runs `GPTModel.forward` under autograd (Megatron's
1F1B schedule under PP), its layer outputs read by forward hooks. KL and CE run on the
vocab-parallel logit shards (no TP all-gather of [tokens, vocab]), like Megatron's
vocab_parallel_cross_entropy; T^2 keeps the gradient scale independent of the temperature.

gkd.recompute (none / selective / full) is Megatron's activation recompute of the child; the
hooks record only the original forward, not the re-run in the backward (train/distill.py).
gkd.sequence_parallel splits both models' streams along the sequence over TP: each rank's cosine terms
are its own tokens' share (summed over TP when reported), the KL / LM terms gather the final hidden states.

`run_gkd` in steps: `_prepare` (checks, data, layout, signature), `_finished` (result.json of the
same signature: nothing to do), `_load_models`, `_resume_or_evaluate` (the trainer's state or the
initial held-out metrics), `_train` (the shared loop over `_step_fn`, logging `_report_fn`),
`_finish` (final metrics, the checkpoint, result.json last).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@dataclasses.dataclass
class _Run:
    """What the steps of one `run_gkd` share: the checked inputs, this rank's place, the signature."""

    run: RunDir
    cfg: GKDConfig
    info: Any
    parent_dir: Path
    train: Any
    heldout: Any
    local_batch: int
    micro: int
    trainer_name: str
    sig: str
    shared: bool
    """One dist-checkpoint dir for all ranks (the Megatron trainer), else one dir per rank."""
    state_dir: Path
    t_start: float

    @property
    def main(self) -> bool:
        return self.info.rank == 0


@dataclasses.dataclass
class _Models:
    """Parent (frozen) and child (training) on this rank, with the child's trainer."""

    parent_arch: Any
    child_arch: Any
    child_meta: dict
    ckpt_dtype: torch.dtype
    parent: Any
    child: Any
    trainer: Any
    model: Any
    """Megatron's DDP wrapper with the megatron trainer, else the child itself."""
    evaluate: Callable[..., dict[str, float]]


def _check_fp8() -> None:
    """Fail at start, not after loading two models."""
    from megapuzzle.model.config import ModelConfigError, check_fp8, resolve_use_te

    try:
        check_fp8(True, resolve_use_te(None))
    except ModelConfigError as e:
        raise UserError(f"gkd.fp8: {e}") from None


def _prepare(run_dir: str | Path, cfg: GKDConfig, t_start: float) -> _Run:
    """Checks and inputs: the run directory, the data, the distributed layout, the batch split, the trainer
    and the signature of this distillation."""
    from megapuzzle.checkpoints.canonical import is_checkpoint, require_parent
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.runtime.distributed import init_distributed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.fp8:
        _check_fp8()
    run = RunDir(run_dir)
    parent_dir = require_parent(run)
    if not is_checkpoint(run.child):
        raise UserError(f"{run.child} holds no child checkpoint; run `megapuzzle realize --run-dir {run.root}` first")
    train = PackedSequenceDataset.from_prefix(run.require_data("train"))
    heldout = PackedSequenceDataset.from_prefix(run.require_data("heldout"))
    info = init_distributed(tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel, seed=cfg.seed)
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
    shared = trainer_name == "megatron"
    state_dir = run.gkd / "train_state" / ("dist" if shared else f"rank{info.rank:03d}")
    return _Run(run, cfg, info, parent_dir, train, heldout, local_batch, micro, trainer_name, sig, shared, state_dir,
                t_start)


def _finished(r: _Run) -> dict | None:
    """result.json's content when RUN/gkd already holds this distillation ({} on ranks > 0), else None."""
    result_file = r.run.gkd / "result.json"
    if not result_file.is_file():
        return None
    res = json.loads(result_file.read_text())
    if res.get("signature") == r.sig:
        if r.main:
            log(f"[gkd] {r.run.gkd} already holds this distillation (result.json); nothing to do")
        return res if r.main else {}
    # Inputs changed (a re-realized child, another config): the stage runs again, as
    # `megapuzzle run` expects; the old checkpoint and result are replaced when it finishes.
    if r.main:
        log(f"[gkd] {r.run.gkd} holds a distillation of another config / child; distilling again")
    return None


def _load_models(r: _Run) -> _Models:
    """Parent and child on this rank's TP / PP share, read lazily; the parent frozen, the child training
    under its trainer."""
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.model.config import ModelOptions
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import load_canonical_into_model
    from megapuzzle.runtime.dtypes import resolve_dtype

    cfg, info = r.cfg, r.info
    dtype = resolve_dtype(cfg.dtype)
    parent_arch, tensors, _ = load_checkpoint(r.parent_dir)
    child_arch, child_tensors, child_meta = load_checkpoint(r.run.child)
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
    trainer = make_trainer(r.trainer_name, child, cfg, info, r.state_dir)
    if info.pp_size > 1:
        from megapuzzle.stages.gkd import pipeline as gkd_pipeline

        evaluate = gkd_pipeline.evaluate_heldout_pp
    else:
        evaluate = evaluate_heldout
    return _Models(parent_arch, child_arch, child_meta, ckpt_dtype, parent, child, trainer, trainer.model, evaluate)


def _resume_or_evaluate(r: _Run, m: _Models) -> tuple[int, dict]:
    """(the first step, the state saved with every checkpoint: signature, initial held-out metrics, the loss
    history): the trainer's resumed state, or a fresh one after the held-out evaluation of the child as
    initialised."""
    cfg, info = r.cfg, r.info
    resumed = m.trainer.load()
    start = resumed["step"] if resumed else 0
    if resumed:
        extra = resumed["extra"]
        if r.main:
            log(f"[gkd] resumed from step {start}")
    else:
        extra = {"signature": r.sig, "initial": m.evaluate(m.model, m.parent, r.heldout, cfg, info), "history": []}
    initial = extra["initial"]
    if r.main and not resumed:  # one line: sizes, budget, layout, where the child starts
        log(f"[gkd] child {m.child_arch.num_params() / 1e6:.2f}M params <- parent "
            f"{m.parent_arch.num_params() / 1e6:.2f}M; {cfg.total_steps} steps x {cfg.tokens_per_step} tokens; "
            f"TP {info.tp_size} x PP {info.pp_size} x DP {info.dp_size}; "
            f"held-out KL {initial['kl']:.4f}, cosine {initial['cosine']:.4f}, LM loss {initial['lm_loss']:.4f} "
            f"(parent {initial['parent_lm_loss']:.4f})")
    return start, extra


def _step_fn(r: _Run, m: _Models, window: torch.Tensor) -> Callable[[int, float], None]:
    """One optimizer step over the rank's share of the global batch (PP: Megatron's 1F1B schedule, else
    micro-batches with gradient accumulation); adds its loss terms, grad norm and per-layer cosine means
    to `window`: (TERMS..., grad norm, per layer)."""
    cfg, info, trainer = r.cfg, r.info, m.trainer
    dev = next(m.child.parameters()).device
    w = {"cosine": cfg.cosine_weight, "kl": cfg.kl_weight, "lm": cfg.lm_weight}
    nt = len(TERMS)
    n_micro = r.local_batch // r.micro
    shards = sequence_shards(m.child)

    def step(i: int, lr: float) -> None:
        batch = r.train.batch(i, cfg.batch_size, cfg.seq_len, cfg.seed, rank=info.dp_rank, world_size=info.dp_size)
        trainer.zero_grad()
        if info.pp_size > 1:  # Megatron's 1F1B schedule; each stage adds its share to the window
            from megapuzzle.stages.gkd import pipeline as gkd_pipeline

            gkd_pipeline.train_microbatches(m.model, m.parent, batch.to(dev), r.micro, cfg, w, window, nt)
        else:
            for j, mb in enumerate(batch.to(dev).split(r.micro)):
                terms = distill_terms(m.model, m.parent, mb[:, :-1], mb[:, 1:], cfg.temperature,
                                      chunk=cfg.loss_chunk_tokens)
                c = _combine(terms, w, shards)
                with trainer.no_sync(last=j == n_micro - 1):  # grad reduce only with the last micro-batch
                    (c["loss"] / n_micro).backward()
                window[:nt] += torch.stack([c[k].detach() for k in TERMS]).double() / n_micro
                window[nt + 1:] += sequence_share(terms["cosine"].detach().mean(dim=(1, 2)), shards).double() / n_micro
        window[nt] += trainer.step(lr)

    return step


def _report_fn(r: _Run, m: _Models, window: torch.Tensor, history: list, sched
               ) -> Callable[[int, int], dict[str, float]]:
    """The logging window's averages over the tensor (sequence-parallel cosine shares), pipeline and
    data-parallel groups: appended to `history` (result.json's loss curve) and returned for the console
    line / tensorboard; `window` is zeroed."""
    info, nt = r.info, len(TERMS)
    shards, w_cosine = sequence_shards(m.child), r.cfg.cosine_weight

    def report(n: int, done: int) -> dict[str, float]:
        avg = window / done
        if shards > 1:  # each TP rank's cosine terms are its own tokens' share: the sum is the whole
            from megatron.core import parallel_state as ps

            part = torch.cat([avg[1:2], avg[nt + 1:]])
            dist.all_reduce(part, group=ps.get_tensor_model_parallel_group())
            avg[0] += w_cosine * (part[0] - avg[1])  # the loss is linear in its terms
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

    return report


def _train(r: _Run, m: _Models, start: int, extra: dict, progress: bool):
    """Steps start .. total through the shared training loop (checkpoints carry `extra`): (the step a
    `faults.kill_after` stopped at, or None; the logger)."""
    from megapuzzle.train.loop import TrainLoop
    from megapuzzle.train.schedule import LRSchedule
    from megapuzzle.train.train_logger import TrainLogger

    cfg, total = r.cfg, r.cfg.total_steps
    sched = LRSchedule(cfg.lr, total, cfg.warmup, cfg.min_lr)
    logger = TrainLogger(r.run.tb / "gkd" if r.main else None, total, prefix="gkd/", enabled=r.main)
    if r.main and start == 0:
        for k in ("kl", "cosine", "lm_loss", "loss"):
            logger.scalar(f"heldout/{k}", extra["initial"][k], 0)
    dev = next(m.child.parameters()).device
    # interval sums on the device (no host sync per step): loss terms, grad norm, per-layer cosine
    window = torch.zeros(len(TERMS) + 1 + m.child_arch.num_layers, dtype=torch.float64, device=dev)
    loop = TrainLoop("gkd", total, sched, logger, cfg.log_every, cfg.checkpoint_every, cfg.tokens_per_step,
                     progress=progress and r.main)
    stopped = loop.run(start, _step_fn(r, m, window), save=lambda n: m.trainer.save(n, extra),
                       window=_report_fn(r, m, window, extra["history"], sched))
    return stopped, logger


def _finish(r: _Run, m: _Models, start: int, extra: dict, logger) -> dict:
    """The final held-out evaluation, RUN/gkd/checkpoint (collective) and, last, result.json (rank 0);
    then the resumable state goes. Returns result.json's content ({} on ranks > 0)."""
    from megapuzzle.checkpoints.canonical import tokenizer_path
    from megapuzzle.model.weights import write_checkpoint_from_model

    cfg, info, total = r.cfg, r.info, r.cfg.total_steps
    final = m.evaluate(m.model, m.parent, r.heldout, cfg, info)
    out = r.run.gkd / "checkpoint"
    # collective, streamed: rank 0 writes layer by layer as the stages send them, never the whole child
    meta = {"source": "gkd", "steps": total, "tokens": total * cfg.tokens_per_step, "heldout": final,
            "child_meta": m.child_meta}
    write_checkpoint_from_model(m.child, m.child_arch, out, dtype=m.ckpt_dtype,
                                tokenizer_dir=tokenizer_path(r.run.child), force=True, meta=meta)
    result: dict = {}
    if r.main:
        for k in ("kl", "cosine", "lm_loss", "loss"):
            logger.scalar(f"heldout/{k}", final[k], total)
        logger.close()
        result = _result(r, m, start, extra, final, out)
        atomic_write_json(r.run.gkd / "result.json", result)  # written last: its presence means "done"
        initial = extra["initial"]
        log(f"[gkd] held-out KL {initial['kl']:.4f} -> {final['kl']:.4f}, cosine {initial['cosine']:.4f} -> "
            f"{final['cosine']:.4f}, LM loss {initial['lm_loss']:.4f} -> {final['lm_loss']:.4f} (parent "
            f"{final['parent_lm_loss']:.4f}); {time.perf_counter() - r.t_start:.0f}s -> {out}")
    if info.world_size > 1:
        dist.barrier()  # result.json exists before any rank drops its state
    if not r.shared or r.main:
        shutil.rmtree(r.state_dir, ignore_errors=True)  # the final checkpoint holds the weights
    return result


def _result(r: _Run, m: _Models, start: int, extra: dict, final: dict, out: Path) -> dict:
    """result.json: the config, signature, layout, trainer, sizes, held-out metrics before and after and the
    loss curve."""
    cfg, info, total = r.cfg, r.info, r.cfg.total_steps
    return {
        "config": section_dict(cfg), "signature": r.sig, "steps": total, "tokens": total * cfg.tokens_per_step,
        "world": {"tp": info.tp_size, "dp": info.dp_size, **({"pp": info.pp_size} if info.pp_size > 1 else {})},
        "trainer": r.trainer_name,
        "parent": str(r.parent_dir), "child": str(r.run.child),
        "checkpoint": str(out), "child_params": m.child_arch.num_params(), "parent_params": m.parent_arch.num_params(),
        "initial": extra["initial"], "final": final, "history": extra["history"], "resumed_from_step": start,
        "wall_seconds_this_run": time.perf_counter() - r.t_start,
    }


def run_gkd(run_dir: str | Path, cfg: GKDConfig, *, progress: bool = True) -> dict:
    """Distil RUN/parent into RUN/child; returns result.json's content ({} on ranks > 0).
    Under `faults.kill_after("gkd", n)` (tests) it returns {"stopped_at": n} without saving,
    like a kill between checkpoints."""
    r = _prepare(run_dir, cfg, time.perf_counter())
    done = _finished(r)
    if done is not None:
        return done
    resume_point(r.state_dir, r.info, r.sig, r.shared)
    m = _load_models(r)
    start, extra = _resume_or_evaluate(r, m)
    stopped, logger = _train(r, m, start, extra, progress)
    if stopped is not None:
        return {"stopped_at": stopped}
    return _finish(r, m, start, extra, logger)


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
