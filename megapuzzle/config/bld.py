"""The `bld:` section: blockwise local distillation (megapuzzle.stages.bld.bld)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any

from megapuzzle.arch import AttentionVariant, FFNVariant
from megapuzzle.config import section_dict
from megapuzzle.config.rules import Convert, DTYPES, FP8_RECIPES, Flag, Integer, Number, OneOf, Section, lr_schedule
from megapuzzle.errors import UserError


def _layer_list(v) -> tuple[int, ...]:
    return tuple(int(i) for i in v)


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


@dataclass(frozen=True)
class BLDConfig(Section):
    """The `bld:` config section."""

    SECTION = "bld"
    CHECKS = (lr_schedule,)

    mode: Annotated[str, OneOf(("decoupled", "coupled"))] = "decoupled"
    """`decoupled` ((m + n) blocks per layer) or `coupled` ((attention, FFN) pairs)."""
    coupled_pairs: Annotated[Any, Convert(_normalize_pairs, "\"all\" or a list of ATTN+FFN pairs")] = "all"
    """Coupled mode: "all" (every pair of the search space) or a list of pairs, each
    "gqa_kv1+mlp_128" or ["gqa_kv1", "mlp_128"]; every pair must be offered at every layer."""
    tokens_per_block: Annotated[int, Integer()] = 1_000_000
    """Training tokens each block sees (the paper: ~1B; saturates ~0.5B)."""
    batch_size: Annotated[int, Integer()] = 8
    """Sequences per step (the same global batch on every rank)."""
    seq_len: Annotated[int, Integer()] = 256
    """Tokens per sequence."""
    lr: Annotated[float, Number(gt=0)] = 1e-3
    """Peak AdamW learning rate."""
    min_lr: Annotated[float, Number(ge=0)] = 1e-5
    """Cosine floor."""
    warmup_fraction: Annotated[float, Number(ge=0, lt=1)] = 0.05
    """Linear warmup as a fraction of the steps (ignored when warmup_steps is set)."""
    warmup_steps: Annotated[int, Integer(ge=0)] | None = None
    """Linear warmup steps; overrides warmup_fraction."""
    weight_decay: Annotated[float, Number(ge=0)] = 0.0
    """AdamW weight decay on matrices (never on norms)."""
    grad_clip: Annotated[float, Number(ge=0)] = 1.0
    """Per-block gradient-norm clip (0 = off)."""
    seed: int = 1234
    """Seeds the training-data order."""
    checkpoint_every: Annotated[int, Integer()] = 50
    """Save each rank's resumable state every N steps."""
    log_every: Annotated[int, Integer()] = 10
    """Console line / tensorboard scalars every N steps."""
    eval_batches: Annotated[int, Integer()] = 4
    """Fixed held-out batches (RUN/data/heldout) for init and final NMSE."""
    calibration_batches: Annotated[int, Integer()] = 4
    """Training batches used to rank FFN channels for pruning."""
    layers: Annotated[tuple[int, ...], Convert(_layer_list, "a list of layer indices")] | None = None
    """Only these layers (default: all)."""
    tensor_parallel: Annotated[int, Integer()] = 1
    """TP size of teacher and students (world = TP x PP x DP processes)."""
    pipeline_parallel: Annotated[int, Integer()] = 1
    """PP size of the teacher (at most the parent's layer count): each stage trains the blocks of
    its own layers from its own teacher activations, receiving the previous stage's boundary
    hidden state (megapuzzle.stages.bld.pp_relay)."""
    fp8: Annotated[bool, Flag()] = False
    """FP8 GEMMs for the students (TransformerEngine, an sm >= 89 GPU); the teacher keeps its dtype.
    Checked before anything is loaded."""
    fp8_recipe: Annotated[str, OneOf(FP8_RECIPES)] = "delayed"
    """With fp8: "delayed" (delayed scaling) or "current" (per-tensor current scaling)."""
    dtype: Annotated[str, OneOf(DTYPES)] = "auto"
    """Parameter dtype of teacher and students: auto (bfloat16 on a GPU, float32 on CPU), float32 or
    bfloat16. With bfloat16 every block trains under Megatron's mixed-precision optimizer (fp32
    master weights and main grads; megapuzzle.train.block_optimizer); the NMSE is always summed
    in fp32, and the library keeps the parent checkpoint's dtype."""
    keep_best: Annotated[bool, Flag()] = True
    """Write a block's initial weights instead of its trained ones when training ended with a
    higher held-out NMSE than the init (a nearly exact pruned block can drift off its optimum at a
    learning rate the hard blocks need); the index records which was kept."""

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
