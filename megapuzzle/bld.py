"""`megapuzzle bld`: blockwise local distillation (Puzzle stage 3) into the block library.

    megapuzzle bld --config CFG --run-dir RUN
    torchrun --nproc-per-node 4 -m megapuzzle.cli bld --config CFG --run-dir RUN   # DP x TP

Reads RUN/parent (canonical checkpoint), RUN/data/train (training windows) and
RUN/data/heldout (the fixed eval batches); writes RUN/library (megapuzzle.library), the
work split and per-rank resumable state under RUN/state/bld/<block-set hash>/ (removed as ranks
finish) and tensorboard scalars (NMSE per block) under RUN/tb/bld/dp###/.

Every student block gets the PARENT's input to its layer and learns to match the parent's
layer there with the normalized MSE

    L = MSE(o_parent, o_child) / MSE(o_parent, 0),   o = layer output - layer input,

i.e. on the layer's *update* to the residual stream (with the residual included the loss
would be trivially small: the residual dominates both outputs). Decoupled mode trains every
attention variant with the parent FFN frozen after it and every FFN variant with the parent
attention frozen before it; coupled mode trains (attention, FFN) pairs, both trainable
(megapuzzle.bld_blocks). One teacher forward per batch feeds every block of every layer the
rank holds, and no gradient crosses a block boundary.

Work is split over data-parallel ranks by block (greedy by parameter count); each rank runs
its own teacher on the SAME global batches, so a block's training does not depend on which
rank or which other blocks it trains with. TP shards teacher and students as Megatron-core
does. All students of a rank train in lockstep (tokens_per_block / (batch_size * seq_len)
steps) and are written to the library together when the rank finishes. Blocks already in
the library with a valid checksum are skipped (so a search space can be extended without
retraining); the parent's own variants are written directly. Killed at any moment, a re-run
resumes each rank from its last checkpoint (every `checkpoint_every` steps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch, SearchSpace
from megapuzzle.config import RunDir, load_config, section, section_dict
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json
from megapuzzle.library import BlockLibrary, attention_key, ffn_key, layer_key


@dataclass(frozen=True)
class BLDConfig:
    """The `bld:` config section."""

    mode: str = "decoupled"
    """`decoupled` ((m + n) blocks per layer) or `coupled` ((attention, FFN) pairs)."""
    coupled_pairs: Any = "all"
    """Coupled mode: "all" (every pair of the search space) or a list of pairs, each
    "gqa_kv1+mlp_128" or ["gqa_kv1", "mlp_128"]; every pair must be offered at every layer."""
    tokens_per_block: int = 1_000_000
    """Training tokens each block sees (the paper: ~1B; saturates ~0.5B)."""
    batch_size: int = 8
    """Sequences per step (the same global batch on every rank)."""
    seq_len: int = 256
    """Tokens per sequence."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    min_lr: float = 1e-5
    """Cosine floor."""
    warmup_fraction: float = 0.05
    """Linear warmup as a fraction of the steps (ignored when warmup_steps is set)."""
    warmup_steps: int | None = None
    """Linear warmup steps; overrides warmup_fraction."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (never on norms)."""
    grad_clip: float = 1.0
    """Per-block gradient-norm clip (0 = off)."""
    seed: int = 1234
    """Seeds the training-data order."""
    checkpoint_every: int = 50
    """Save each rank's resumable state every N steps."""
    log_every: int = 10
    """Console line / tensorboard scalars every N steps."""
    eval_batches: int = 4
    """Fixed held-out batches (RUN/data/heldout) for init and final NMSE."""
    calibration_batches: int = 4
    """Training batches used to rank FFN channels for pruning."""
    layers: tuple[int, ...] | None = None
    """Only these layers (default: all)."""
    tensor_parallel: int = 1
    """TP size of teacher and students (world = TP x DP processes)."""

    def __post_init__(self):
        if self.mode not in ("decoupled", "coupled"):
            raise UserError(f"bld.mode must be 'decoupled' or 'coupled', got {self.mode!r}")
        object.__setattr__(self, "coupled_pairs", _normalize_pairs(self.coupled_pairs))
        for f in ("lr", "min_lr", "warmup_fraction", "weight_decay", "grad_clip"):
            try:  # PyYAML reads `3e-4` (no dot) as a string
                object.__setattr__(self, f, float(getattr(self, f)))
            except (TypeError, ValueError):
                raise UserError(f"bld.{f} must be a number, got {getattr(self, f)!r}") from None
        for f in ("tokens_per_block", "batch_size", "seq_len", "checkpoint_every", "log_every", "eval_batches",
                  "calibration_batches", "tensor_parallel"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"bld.{f} must be an integer >= 1, got {v!r}")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise UserError(f"bld.lr must be > 0 and 0 <= bld.min_lr <= lr (got lr={self.lr}, min_lr={self.min_lr})")
        if not 0 <= self.warmup_fraction < 1:
            raise UserError(f"bld.warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"bld.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("bld.weight_decay and bld.grad_clip must be >= 0")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens_per_block / self.tokens_per_step)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_fraction * self.steps)

    def training_signature(self) -> str:
        """Hash of everything that changes a block's trained weights (not logging / layout)."""
        d = {k: v for k, v in section_dict(self).items()
             if k not in ("checkpoint_every", "log_every", "layers", "mode", "coupled_pairs", "tensor_parallel")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _normalize_pairs(pairs) -> Any:
    if pairs == "all" or pairs == ("all",):
        return "all"
    out = []
    for p in pairs if isinstance(pairs, (list, tuple)) else [pairs]:
        if isinstance(p, str) and "+" in p:
            a, f = p.split("+", 1)
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            a, f = p
        else:
            raise UserError(f"bld.coupled_pairs entry {p!r} is malformed; use 'ATTN+FFN' or [ATTN, FFN], "
                            f"e.g. 'gqa_kv1+mlp_128', or 'all'")
        try:
            AttentionVariant.from_name(str(a)), FFNVariant.from_name(str(f))
        except ValueError as e:
            raise UserError(f"bld.coupled_pairs entry {p!r}: {e}") from None
        out.append((str(a), str(f)))
    return tuple(out)


# ----------------------------------------------------------------------------- the block plan

@dataclass(frozen=True)
class BlockSpec:
    """One library block BLD is responsible for."""

    key: str
    layer: int
    kind: str  # attention | ffn | layer
    variant: LayerArch
    """attention blocks: (variant, parent FFN); ffn blocks: (parent attention, variant); layer: the pair."""
    parent_own: bool
    """The parent's own subblock(s): written from the parent's tensors, never trained."""

    def num_params(self, arch: Architecture) -> int:
        a = arch.attention_params(self.variant.attention) if self.kind != "ffn" else 0
        f = arch.ffn_params(self.variant.ffn) if self.kind != "attention" else 0
        return a + f


def plan_blocks(arch: Architecture, space: SearchSpace, cfg: BLDConfig) -> list[BlockSpec]:
    """Every block of the search space for the selected layers; the parent's own ones included.
    Decoupled and coupled libraries both carry the parent's own decoupled blocks (realize then
    always finds the parent's subblocks)."""
    layers = cfg.layers if cfg.layers is not None else tuple(range(arch.num_layers))
    for i in layers:
        if not 0 <= i < arch.num_layers:
            raise UserError(f"bld.layers has {i}, but the parent has layers 0..{arch.num_layers - 1}")
    out: list[BlockSpec] = []
    for i in layers:
        own = arch.layers[i]
        attns, ffns = space.attention_variants(arch, i), space.ffn_variants(arch, i)
        out.append(BlockSpec(attention_key(i, own.attention), i, "attention", own, True))
        out.append(BlockSpec(ffn_key(i, own.ffn), i, "ffn", own, True))
        if cfg.mode == "decoupled":
            out += [BlockSpec(attention_key(i, a), i, "attention", LayerArch(a, own.ffn), False)
                    for a in attns if a != own.attention]
            out += [BlockSpec(ffn_key(i, f), i, "ffn", LayerArch(own.attention, f), False)
                    for f in ffns if f != own.ffn]
            continue
        if cfg.coupled_pairs == "all":
            pairs = [LayerArch(a, f) for a in attns for f in ffns]
        else:
            names_a, names_f = {a.name: a for a in attns}, {f.name: f for f in ffns}
            pairs = []
            for a, f in cfg.coupled_pairs:
                if a not in names_a or f not in names_f:
                    raise UserError(f"bld.coupled_pairs has {a}+{f}, but layer {i}'s search space offers "
                                    f"attention {sorted(names_a)} and FFN {sorted(names_f)}")
                pairs.append(LayerArch(names_a[a], names_f[f]))
        out += [BlockSpec(layer_key(i, p), i, "layer", p, p == own) for p in pairs]
    return out


def check_tensor_parallel(arch: Architecture, blocks: list[BlockSpec], tp: int) -> None:
    for b in blocks:
        try:
            arch.with_layers([b.variant]).validate_tensor_parallel(tp)
        except ValueError as e:
            raise UserError(f"block {b.key} cannot run at tensor_parallel={tp}: {e}") from None


def split_work(blocks: list[BlockSpec], arch: Architecture, n: int) -> list[list[str]]:
    """Greedy longest-processing-time split by parameter count (+1 so no-op blocks spread too)."""
    loads, out = [0] * n, [[] for _ in range(n)]
    for b in sorted(blocks, key=lambda b: (-b.num_params(arch), b.key)):
        r = min(range(n), key=lambda j: (loads[j], j))
        loads[r] += b.num_params(arch) + 1
        out[r].append(b.key)
    return [sorted(x) for x in out]


def _plan_for_ranks(state_root: Path, todo: list[BlockSpec], arch: Architecture, dp: int, sig: str) -> list[list[str]]:
    """Reuse the persisted split when it still covers the work (so a restarted rank gets the
    same blocks and can resume its state); otherwise make and persist a new one."""
    f = state_root / "plan.json"
    keys = {b.key for b in todo}
    if f.is_file():
        try:
            p = json.loads(f.read_text())
            if p.get("signature") == sig and p.get("dp_size") == dp and keys <= {k for r in p["assign"] for k in r}:
                return p["assign"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    assign = split_work(todo, arch, dp)
    atomic_write_json(f, {"signature": sig, "dp_size": dp, "assign": assign})
    return assign


# ----------------------------------------------------------------------------- entry points

def run_bld(run_dir: str | Path, cfg_dict: dict | None = None, *, log=print, progress: bool = True,
            stop_after: int | None = None, threads: int | None = None) -> dict:
    """Build (or complete) RUN/library. `cfg_dict`: the whole run config (sections
    `search_space` and `bld`). `stop_after`: tests' kill switch, returns after that many steps
    of this run without saving, like a kill between checkpoints. Returns this rank's summary."""
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.runtime.distributed import init_distributed

    cfg_dict = cfg_dict or {}
    space = SearchSpace.from_dict(cfg_dict.get("search_space"))
    cfg = section(cfg_dict, "bld", BLDConfig)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    info = init_distributed(tp=cfg.tensor_parallel, pp=1, seed=cfg.seed)
    if info.pp_size != 1:
        raise UserError("BLD runs with pipeline parallel size 1 (blocks are split over data-parallel ranks)")
    rd = RunDir(run_dir)
    arch, parent_tensors, _ = load_checkpoint(rd.require_parent())
    rd.require_data("train")
    rd.require_data("heldout")  # the fixed eval batches for init / final NMSE
    blocks = plan_blocks(arch, space, cfg)
    check_tensor_parallel(arch, blocks, info.tp_size)
    lib = BlockLibrary(rd.library)
    # One state scope per block set: SLURM array jobs over layer shards share RUN but never
    # each other's plan or rank states.
    state_root = rd.state / "bld" / _tensor_sig(",".join(b.key for b in blocks))
    sig = _tensor_sig(cfg.training_signature() + arch.to_json())

    # Rank 0 checks the library (checksums) and decides; everyone gets the same answer (or the
    # same error: the other ranks must not wait for a rank 0 that has given up).
    decision: list[Any] = [None]
    if info.rank == 0:
        try:
            decision = [_decide(lib, arch, parent_tensors, blocks, state_root, info.dp_size, sig, log)]
        except (UserError, ValueError, OSError) as e:
            decision = [{"error": f"{type(e).__name__}: {e}"}]
            if info.world_size == 1:
                raise
    if info.world_size > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    if "error" in decision[0]:
        raise UserError(f"rank 0 could not plan BLD: {decision[0]['error']}")
    d = decision[0]
    todo = set(d["todo"])
    mine = [b for b in blocks if b.key in todo and b.key in set(d["assign"][info.dp_rank])]
    summary = {"rank": info.rank, "dp_rank": info.dp_rank, "trained": [b.key for b in mine],
               "parent_written": d["parent_written"], "corrupt": d["corrupt"], "todo": d["todo"],
               "steps": cfg.steps, "resumed_from": None, "timings": {}}
    if mine:
        res = train_rank(rd, cfg, arch, parent_tensors, mine, lib, info,
                         state_dir=state_root / f"rank{info.rank:03d}", signature=sig,
                         plan_keys=d["assign"][info.dp_rank], log=log,
                         progress=progress, stop_after=stop_after)
        summary.update(res)
    summary["timings"]["total_s"] = time.perf_counter() - t0
    return summary


def _decide(lib: BlockLibrary, arch: Architecture, parent_tensors: dict, blocks: list[BlockSpec], state_root: Path,
            dp: int, sig: str, log) -> dict:
    """Write the parent's own blocks, find the blocks to train (missing, failing their
    checksum, or trained under other BLD settings / another parent) and split them over the
    data-parallel ranks."""
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
        assign = _plan_for_ranks(state_root, todo, arch, dp, sig)
    else:
        assign = [[] for _ in range(dp)]
        shutil.rmtree(state_root, ignore_errors=True)  # nothing left to resume
    for k in corrupt:
        log(f"[bld] {k}: block file missing or corrupted (checksum mismatch); retraining it")
    log(f"[bld] {len(blocks)} blocks in the search space; {len(todo)} to train over {dp} data-parallel "
        f"rank(s); {len(blocks) - len(todo)} present or written from the parent")
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


# ----------------------------------------------------------------------------- one rank's training

def _tensor_sig(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


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
    """(sum of squared errors, sum of squared targets) on the layer's update o = out - in."""
    i = student.layer_index
    x = t.x[i]
    target = (t.y[i] - x).float()
    err = (student(t) - x).float() - target
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


def train_rank(rd: RunDir, cfg: BLDConfig, arch: Architecture, parent_tensors: dict, mine: list[BlockSpec],
               lib: BlockLibrary, info, *, state_dir: Path, signature: str, plan_keys: list[str], log=print,
               progress: bool = True, stop_after: int | None = None) -> dict:
    """Train this rank's blocks in lockstep and write them to the library."""
    from tqdm import tqdm

    from megapuzzle.bld_blocks import StudentBlock, Teacher, tp_grad_norms
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.model.config import ModelOptions
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import load_canonical_into_model
    from megapuzzle.train.schedule import LRSchedule, set_lr
    from megapuzzle.train.state import load_train_state, save_train_state
    from megapuzzle.train.train_logger import TrainLogger

    tim = dict.fromkeys(("setup_s", "calibration_s", "teacher_s", "students_s", "eval_s", "write_s"), 0.0)
    t0 = time.perf_counter()
    main, leader = info.rank == 0, info.tp_rank == 0
    # The state belongs to this rank's whole planned key set: a rank killed while writing its
    # finished blocks resumes the rest from the final checkpoint instead of retraining them.
    keys_sig = _tensor_sig(signature + "|" + ",".join(sorted(plan_keys)))
    saved, mine_keys = _saved_state(state_dir), sorted(b.key for b in mine)
    resume = saved is not None and saved[0] == keys_sig and (
        saved[2] == mine_keys or (saved[1] == cfg.steps and set(mine_keys) <= set(saved[2])))
    if info.tp_size > 1 and not _tp_agree(saved[1] if resume else -1):
        resume = False  # a kill mid-save left the TP ranks at different steps: restart together
    if not resume:
        shutil.rmtree(state_dir, ignore_errors=True)  # another plan / config: start these blocks afresh
    train = PackedSequenceDataset.from_prefix(rd.train_data)
    heldout = PackedSequenceDataset.from_prefix(rd.heldout_data)
    model = build_gpt_model(arch, options=ModelOptions(perform_initialization=False))
    load_canonical_into_model(model, parent_tensors, arch)
    prune = {b.layer for b in mine if b.kind != "attention" and b.variant.ffn.kind == "mlp"
             and b.variant.ffn != arch.layers[b.layer].ffn}
    teacher = Teacher(model, {b.layer for b in mine}, {b.layer for b in mine if b.kind == "ffn"} | prune)
    students = [StudentBlock(b.key, b.kind, b.layer, arch, b.variant, teacher, info.tp_size) for b in mine]
    spec = {b.key: b for b in mine}
    named = {f"{s.key}/{n}": p for s in students for n, p in s.trainable().items()}
    for p in named.values():
        p.requires_grad_(True)
    decay = [p for n, p in named.items() if p.ndim >= 2]
    no_decay = [p for n, p in named.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            eps=1e-8) if named else None
    tim["setup_s"] = time.perf_counter() - t0

    start, init_nmse, methods = 0, {}, {}
    if resume:
        # optimizer moments only when every saved block is still to train (else training is over)
        st = load_train_state(state_dir, named, opt if saved[2] == mine_keys else None)
        start, init_nmse, methods = st["step"], st["extra"]["init_nmse"], st["extra"]["init"]
        if main:
            log(f"[bld] resumed {len(mine)} block(s) from step {start}")
    else:
        t = time.perf_counter()
        scores = _calibrate(teacher, train, cfg, arch, parent_tensors, prune) if prune else {}
        tim["calibration_s"] = time.perf_counter() - t
        for s in students:
            tensors, methods[s.key] = _init_tensors(arch, spec[s.key], parent_tensors, scores)
            s.load_canonical(tensors)
        t = time.perf_counter()
        init_nmse = evaluate(teacher, students, heldout, cfg)
        tim["eval_s"] += time.perf_counter() - t
    extra = {"signature": keys_sig, "keys": mine_keys, "init_nmse": init_nmse, "init": methods}

    trainable = [s for s in students if s.owned]
    total = cfg.steps if trainable else 0
    sched = LRSchedule(cfg.lr, max(total, 1), min(cfg.warmup, max(total - 1, 0)), cfg.min_lr)
    logger = TrainLogger(rd.tb / "bld" / f"dp{info.dp_rank:03d}", total, prefix="bld/", enabled=leader)
    bar = tqdm(total=total, initial=start, desc="bld", unit="step", disable=not (progress and main))
    if leader and start == 0:
        for k, v in init_nmse.items():
            logger.scalar(f"eval_nmse/{k}", v, 0)
    last_log, window = start, {s.key: [] for s in trainable}
    for step in range(start, total):
        if stop_after is not None and step >= stop_after:
            bar.close()
            logger.close()
            return {"stopped_at": step, "resumed_from": start if resume else None, "timings": tim}
        tokens = train.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)[:, :-1]  # same batch on every rank
        t = time.perf_counter()
        tout = teacher.forward(tokens)
        t1 = time.perf_counter()
        set_lr(opt, sched(step))
        for s in trainable:  # one backward per block: no graph spans two blocks, activations freed early
            num, den = _nmse_terms(s, tout)
            loss = num / den
            loss.backward()
            window[s.key].append(loss.item())
        norms = tp_grad_norms(trainable)
        if cfg.grad_clip > 0:
            for s, n in zip(trainable, norms):
                coef = cfg.grad_clip / (n + 1e-6)
                if coef < 1.0:
                    for p in s.owned.values():
                        if p.grad is not None:
                            p.grad.mul_(coef)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tim["teacher_s"] += t1 - t
        tim["students_s"] += time.perf_counter() - t1
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            means = {k: sum(v) / len(v) for k, v in window.items()}
            done = step + 1 - last_log
            logger.log(step + 1, done * cfg.tokens_per_step,
                       {"nmse mean": sum(means.values()) / len(means), "nmse max": max(means.values()),
                        "lr": sched(step), "grad norm max": max(norms)}, console=main, iters=done)
            for k, v in means.items():
                logger.scalar(f"nmse/{k}", v, step + 1)
            last_log, window = step + 1, {k: [] for k in window}
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            save_train_state(state_dir, step + 1, named, opt, extra)
    bar.close()

    t = time.perf_counter()
    final = evaluate(teacher, students, heldout, cfg)
    tim["eval_s"] += time.perf_counter() - t
    t = time.perf_counter()
    dtype = next(iter(parent_tensors.values())).dtype  # the library keeps the parent's dtype
    for s in students:
        tensors = s.gather_canonical()  # collective over the TP group: every TP rank calls it
        if not leader:
            continue
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
        b, trained = spec[s.key], bool(s.owned)
        lib.add_block(s.key, tensors, {
            "init": methods[s.key], "tokens": total * cfg.tokens_per_step if trained else 0,
            "steps": total if trained else 0, "init_nmse": init_nmse[s.key],
            "final_nmse": final[s.key] if trained else init_nmse[s.key], "params": b.num_params(arch),
            "bld_signature": signature})
        logger.scalar(f"eval_nmse/{s.key}", final[s.key], total)
        if main:
            log(f"[bld] {s.key}: nmse {init_nmse[s.key]:.4f} -> {final[s.key]:.4f} ({methods[s.key]})")
    tim["write_s"] = time.perf_counter() - t
    logger.close()
    shutil.rmtree(state_dir, ignore_errors=True)  # the library now holds these blocks
    return {"resumed_from": start if resume else None, "timings": tim,
            "nmse": {k: (init_nmse[k], final[k]) for k in final}}


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (sections search_space: and bld:)")
    p.add_argument("--run-dir", required=True, help="run directory with parent/ and data/; library/ is written here")
    p.add_argument("--tp", type=int, default=None, help="override bld.tensor_parallel")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.tp is not None:
        cfg = {**cfg, "bld": {**(cfg.get("bld") or {}), "tensor_parallel": args.tp}}
    res = run_bld(args.run_dir, cfg, progress=not args.no_progress, threads=args.threads)
    if res["rank"] == 0:
        print(f"[bld] rank 0 done: trained {len(res['trained'])} block(s) in {res['timings']['total_s']:.1f}s; "
              f"library {RunDir(args.run_dir).library}")
    return 0
