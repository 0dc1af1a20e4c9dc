"""The BLD plan: its config (the `bld:` section), the blocks a search space asks for, and how
they split over ranks. Pure bookkeeping, no training (megapuzzle.bld runs the stage,
megapuzzle.bld_train one rank's loop); both import this, so neither imports the other."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch, SearchSpace
from megapuzzle.config import section_dict
from megapuzzle.errors import UserError
from megapuzzle.library import attention_key, ffn_key, layer_key


FP8_RECIPES = ("delayed", "current")  # the keys of megapuzzle.cost_runtime._FP8_RECIPES


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
    """TP size of teacher and students (world = TP x PP x DP processes)."""
    pipeline_parallel: int = 1
    """PP size of the teacher (at most the parent's layer count): each stage trains the blocks of
    its own layers from its own teacher activations, receiving the previous stage's boundary
    hidden state (megapuzzle.bld_pipeline)."""
    fp8: bool = False
    """FP8 GEMMs for the students (TransformerEngine, an sm >= 89 GPU); the teacher keeps its dtype.
    Checked before anything is loaded."""
    fp8_recipe: str = "delayed"
    """With fp8: "delayed" (delayed scaling) or "current" (per-tensor current scaling)."""
    dtype: str = "auto"
    """Parameter dtype of teacher and students: auto (bfloat16 on a GPU, float32 on CPU), float32 or
    bfloat16. With bfloat16 every block trains under Megatron's mixed-precision optimizer (fp32
    master weights and main grads; megapuzzle.train.block_optimizer); the NMSE is always summed
    in fp32, and the library keeps the parent checkpoint's dtype."""
    keep_best: bool = True
    """Write a block's initial weights instead of its trained ones when training ended with a
    higher held-out NMSE than the init (a nearly exact pruned block can drift off its optimum at a
    learning rate the hard blocks need); the index records which was kept."""

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
                  "calibration_batches", "tensor_parallel", "pipeline_parallel"):
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
        if not isinstance(self.fp8, bool):
            raise UserError(f"bld.fp8 must be true or false, got {self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise UserError(f"bld.fp8_recipe must be one of {list(FP8_RECIPES)}, got {self.fp8_recipe!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"bld.dtype {self.dtype!r} unknown; use auto, float32 or bfloat16")
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

    @property
    def params_dtype(self):  # -> torch.dtype (torch imported lazily: the plan is torch-free)
        """The dtype `dtype` resolves to on this machine."""
        from megapuzzle.runtime.dtypes import resolve_dtype

        return resolve_dtype(self.dtype)

    def training_signature(self) -> str:
        """Hash of everything that changes a block's trained weights (not logging / layout).
        `dtype` enters as the dtype it resolves to (auto trains bf16 on a GPU, fp32 on CPU)."""
        d = {k: v for k, v in section_dict(self).items()
             if k not in ("checkpoint_every", "log_every", "layers", "mode", "coupled_pairs", "tensor_parallel",
                          "pipeline_parallel", "fp8", "fp8_recipe", "dtype")}
        if self.fp8:  # only then: libraries trained before these fields existed keep their signature
            d.update(fp8=True, fp8_recipe=self.fp8_recipe)
        import torch

        if self.params_dtype != torch.float32:  # likewise: fp32 libraries keep their signature
            d.update(dtype=str(self.params_dtype).replace("torch.", ""))
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


def tensor_sig(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]
