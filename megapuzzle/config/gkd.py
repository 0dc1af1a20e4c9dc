"""The `gkd:` section: global knowledge distillation of the realized child (megapuzzle.stages.gkd.gkd)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from megapuzzle.config.rules import DTYPES, FP8_RECIPES, Flag, Integer, Number, OneOf, Section, lr_schedule
from megapuzzle.errors import UserError

DEFAULT_STEPS = 200
"""Optimizer steps when neither gkd.steps nor gkd.tokens is set."""
TRAINERS = ("auto", "megatron", "local")
"""gkd.optimizer: megapuzzle.stages.gkd.trainers implements megatron and local; auto picks by device."""
RECOMPUTE = ("none", "selective", "full")
"""gkd.recompute: Megatron's activation recompute of the child (megapuzzle.stages.gkd maps it to ModelOptions)."""


def _steps_or_tokens(cfg) -> None:
    if cfg.steps is not None and cfg.tokens is not None:
        raise UserError("gkd.steps and gkd.tokens are alternatives; set one of them")


def _some_loss(cfg) -> None:
    if cfg.cosine_weight + cfg.kl_weight + cfg.lm_weight == 0:
        raise UserError("gkd: every loss weight is 0; set cosine_weight, kl_weight or lm_weight > 0")


def _sequence_parallel_needs_tp(cfg) -> None:
    if cfg.sequence_parallel and cfg.tensor_parallel < 2:
        raise UserError(f"gkd.sequence_parallel needs gkd.tensor_parallel > 1 (it splits the tokens over the TP "
                        f"ranks); got tensor_parallel {cfg.tensor_parallel}")
    if cfg.sequence_parallel and cfg.seq_len % cfg.tensor_parallel:
        raise UserError(f"gkd.sequence_parallel splits gkd.seq_len {cfg.seq_len} over {cfg.tensor_parallel} TP ranks; "
                        f"make it a multiple of tensor_parallel")


def _micro_batches_divide(cfg) -> None:
    if cfg.micro_batch_size and cfg.batch_size % cfg.micro_batch_size:
        raise UserError(f"gkd.batch_size {cfg.batch_size} is not a multiple of micro_batch_size "
                        f"{cfg.micro_batch_size}")


@dataclass(frozen=True)
class GKDConfig(Section):
    """The `gkd:` config section."""

    SECTION = "gkd"
    CHECKS = (lr_schedule, _steps_or_tokens, _some_loss, _micro_batches_divide, _sequence_parallel_needs_tp)

    steps: Annotated[int, Integer()] | None = None
    """Optimizer steps (default 200 when neither steps nor tokens is set)."""
    tokens: Annotated[int, Integer()] | None = None
    """Training tokens instead of steps: steps = ceil(tokens / (batch_size * seq_len)) (paper: 45B)."""
    batch_size: Annotated[int, Integer()] = 8
    """Global batch in sequences (split over data-parallel ranks)."""
    micro_batch_size: Annotated[int, Integer()] | None = None
    """Sequences per forward/backward on a rank (gradient accumulation); None = the rank's whole share."""
    seq_len: Annotated[int, Integer()] = 256
    """Tokens per sequence."""
    lr: Annotated[float, Number(gt=0)] = 3e-4
    """Peak AdamW learning rate."""
    min_lr: Annotated[float, Number(ge=0)] = 3e-5
    """Cosine floor."""
    warmup_steps: Annotated[int, Integer(ge=0)] | None = None
    """Linear warmup steps; overrides warmup_fraction."""
    warmup_fraction: Annotated[float, Number(ge=0, lt=1)] = 0.05
    """Linear warmup as a fraction of the steps."""
    weight_decay: Annotated[float, Number(ge=0)] = 0.0
    """AdamW weight decay on matrices (never on norms); healing runs are short."""
    grad_clip: Annotated[float, Number(ge=0)] = 1.0
    """Global gradient-norm clip (0 = off)."""
    cosine_weight: Annotated[float, Number(ge=0)] = 1.0
    """Weight of the summed per-layer (1 - cosine) hidden-state term."""
    kl_weight: Annotated[float, Number(ge=0)] = 1.0
    """Weight of KL(parent || child) on the logits."""
    lm_weight: Annotated[float, Number(ge=0)] = 0.0
    """Weight of the child's own next-token loss (off by default: it hurt in the paper)."""
    temperature: Annotated[float, Number(gt=0)] = 1.0
    """Softmax temperature of the KL term (the term is scaled by T^2)."""
    checkpoint_every: Annotated[int, Integer()] = 50
    """Save the resumable train state every N steps."""
    log_every: Annotated[int, Integer()] = 10
    """Console line + tensorboard scalars every N steps (averaged over the interval)."""
    eval_batches: Annotated[int, Integer()] = 8
    """Held-out batches (RUN/data/heldout) for the before / after metrics."""
    seed: int = 1234
    """Seeds the training-data order."""
    tensor_parallel: Annotated[int, Integer()] = 1
    """TP size (world = TP x PP x DP processes)."""
    pipeline_parallel: Annotated[int, Integer()] = 1
    """PP size: Megatron's pipeline split of both models' layers (layer i of child and parent on
    one stage); needs at least one layer per stage."""
    sequence_parallel: Annotated[bool, Flag()] = False
    """Megatron's sequence parallelism for child and parent (needs tensor_parallel > 1): between the
    TP-split GEMMs the residual stream is split along the sequence over the TP ranks instead of
    replicated, so what GKD keeps per layer and micro-batch (the child's layer inputs under full
    recompute, the parent's layer outputs, the p2p stream) shrinks by TP; the all-reduces become
    reduce-scatters + all-gathers of the same bytes. Each rank computes the cosine terms of its own
    tokens; the KL / LM loss gathers the final hidden states along the sequence. Only sums change
    order, so like recompute it is not part of the training signature (a run may resume across it)."""
    parent_pass_micro_batches: Annotated[int, Integer()] | None = None
    """Under PP: micro-batches the parent runs ahead of the child's 1F1B schedule, keeping its layer
    outputs (and, on the last stage, its final hidden state, not its logits) for each until the child
    has used them; must divide the rank's micro-batches. None = the rank's whole batch, one schedule per
    step (the smallest pipeline bubble); smaller bounds that memory (a 70B parent's outputs of 10 layers
    per micro-batch of 8192 tokens are 1.3 GB) for one more pipeline fill and drain per group. The same
    sums (up to rounding), so not part of the training signature. PP = 1 runs it per micro-batch anyway."""
    loss_chunk_tokens: Annotated[int, Integer(ge=0)] = 0
    """Tokens per chunk of the KL / LM loss over the full vocabulary (and of the parent's logits, computed
    from its kept final hidden state by its output layer): its fp32 temporaries are then a few
    [chunk, V / tp] tensors instead of [micro-batch tokens, V / tp] (at 8192 tokens x 128256 x 4 B, 4.2 GB
    each), for one more parent head matmul and softmax per chunk in the backward (it recomputes instead of
    saving). 0 = the whole micro-batch at once (bitwise as before). Per-token terms, so the same numbers up
    to the order of fp32 sums within a row; like parent_pass_micro_batches not in the training signature."""
    threads: Annotated[int, Integer()] | None = None
    """torch CPU threads (None: torch's choice)."""
    dtype: Annotated[str, OneOf(DTYPES)] = "auto"
    """Parameter dtype: auto (bf16 on a GPU, fp32 on CPU), float32 or bfloat16 (also on CPU; the
    megatron trainer then keeps fp32 main params, the local one updates the bf16 params)."""
    fp8: Annotated[bool, Flag()] = False
    """FP8 GEMMs for the child via TransformerEngine (GPU only; fails at start elsewhere)."""
    fp8_recipe: Annotated[str, OneOf(FP8_RECIPES)] = "delayed"
    """With fp8: "delayed" (delayed scaling) or "current" (per-tensor current scaling)."""
    optimizer: Annotated[str, OneOf(TRAINERS)] = "auto"
    """Trainer: "megatron" = Megatron-core DistributedDataParallel + distributed optimizer (fp32 main
    params and grads, Megatron's clip; state in Megatron dist-checkpoints, whose metadata is
    pickled); "local" = torch AdamW on every rank with a DP all-reduce (state in safetensors, no
    pickles); either on CUDA or CPU. "auto" = megatron on CUDA, local on CPU."""
    recompute: Annotated[str, OneOf(RECOMPUTE)] = "none"
    """Activation recompute of the trainable child (Megatron's recompute_granularity; the frozen
    parent runs without grad and needs none): "full" keeps only each layer's input per micro-batch
    and re-runs the layer in the backward (recompute_method uniform, one layer per checkpoint: about
    one more forward of the child per step); "selective" re-runs only the attention core (the
    s^2 part); "none" keeps every layer's activations. The hidden-state capture records only the
    original forward (megapuzzle.train.distill.in_recompute), so the losses are the same; like
    overlap_grad_reduce it is not part of the training signature."""
    overlap_grad_reduce: Annotated[bool, Flag()] = True
    """Megatron trainer: start each grad bucket's DP reduce-scatter as soon as its grads are ready,
    overlapping the rest of the backward (Megatron-LM's --overlap-grad-reduce); the sums are the
    same, so it is not part of the training signature."""

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.tokens is not None:
            return math.ceil(self.tokens / self.tokens_per_step)
        return self.steps or DEFAULT_STEPS

    @property
    def warmup(self) -> int:
        w = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_fraction * self.total_steps)
        return min(w, self.total_steps - 1)
