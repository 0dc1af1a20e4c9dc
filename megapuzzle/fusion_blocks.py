"""Fused-run blocks (FFN Fusion inside the search, issue #16): init, BLD over a run, replace-the-run KL.

A run block replaces parent layers i..j by ONE layer: the parent's attention at i and an FFN of
width W, the run's other layers no-op / no-op. It is initialised by the exact fold of the
parent's FFNs i..j (megapuzzle.fusion.fold_ffns; W = their summed width), trained like a BLD
block but across the run: input = the parent's residual stream entering layer i, target = the
parent's stream leaving layer j (normalized MSE), and scored by replace-the-run KL: the parent
with layers i..j replaced by the block, against the parent.

What is here is single-process (TP = PP = 1) and file-free: `train_run_block` and
`score_run_block` take a parent checkpoint and datasets and return tensors / numbers. Library
storage, costs for the fused widths and the MIP stage wiring are the next steps (docs/design.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch
from megapuzzle.errors import UserError
from megapuzzle.fusion import fold_ffns


def run_block_layer(parent: Architecture, i: int, j: int) -> LayerArch:
    """The replacement layer of run [i, j]: the parent's attention at i, an MLP of the summed FFN width."""
    if not 0 <= i < j < parent.num_layers:
        raise UserError(f"run [{i}, {j}] is not a range of at least two of the parent's {parent.num_layers} layers")
    widths = [parent.layers[k].ffn.intermediate_size for k in range(i, j + 1) if parent.layers[k].ffn.kind == "mlp"]
    if not widths:
        raise UserError(f"run [{i}, {j}] has no MLP to fuse")
    return LayerArch(parent.layers[i].attention, FFNVariant("mlp", sum(widths)))


def run_arch(parent: Architecture, i: int, j: int, layer: LayerArch) -> Architecture:
    """The parent with layers i..j replaced by `layer` (at i) and no-op / no-op layers."""
    layers = list(parent.layers)
    layers[i] = layer
    for k in range(i + 1, j + 1):
        layers[k] = LayerArch(AttentionVariant("no_op"), FFNVariant("no_op"))
    return parent.with_layers(layers)


def init_run_block(parent: Architecture, tensors: Mapping[str, torch.Tensor], i: int, j: int
                   ) -> tuple[LayerArch, dict[str, torch.Tensor]]:
    """(layer, layer-local canonical tensors) of run [i, j]: attention i copied, FFNs i..j folded."""
    layer = run_block_layer(parent, i, j)
    p = f"model.layers.{i}."
    local = {n[len(p):]: tensors[n] for n in tensors.keys() if n.startswith(p) and
             (n.startswith(p + "self_attn.") or n == p + "input_layernorm.weight")}
    parts = []
    for k in range(i, j + 1):
        if parent.layers[k].ffn.kind == "mlp":
            q = f"model.layers.{k}."
            parts.append((tensors[q + "post_attention_layernorm.weight"], tensors[q + "mlp.gate_proj.weight"],
                          tensors[q + "mlp.up_proj.weight"], tensors[q + "mlp.down_proj.weight"]))
    norm, gate, up, down = fold_ffns(parts)
    local.update({"post_attention_layernorm.weight": norm, "mlp.gate_proj.weight": gate,
                  "mlp.up_proj.weight": up, "mlp.down_proj.weight": down})
    return layer, local


def run_state_dict(parent: Architecture, tensors: Mapping[str, torch.Tensor], i: int, j: int, layer: LayerArch,
                   local: Mapping[str, torch.Tensor]) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """Whole-model canonical tensors of the parent with run [i, j] replaced (small models: scoring, tests)."""
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes

    arch = run_arch(parent, i, j, layer)
    p = f"model.layers.{i}."
    out = {}
    for n in expected_canonical_shapes(arch):
        out[n] = local[n[len(p):]] if n.startswith(p) else tensors[n]
    return arch, out


@dataclass
class RunBlockResult:
    layer: LayerArch
    tensors: dict[str, torch.Tensor]
    """Layer-local canonical tensors (names without the `model.layers.{i}.` prefix)."""
    nmse_init: float
    nmse_final: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _nmse(student, teacher, batches, i: int, j: int) -> float:
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            t = teacher.forward(b[:, :-1])
            out, y = student(t).float(), t.y[j].float()
            num += (out - y).pow(2).sum().item()
            den += y.pow(2).sum().item()
    return num / den


def train_run_block(parent_dir, train_prefix, heldout_prefix, i: int, j: int, *, steps: int = 20,
                    batch_size: int = 4, seq_len: int = 64, lr: float = 1e-3, eval_batches: int = 2, seed: int = 1234,
                    log=print) -> RunBlockResult:
    """BLD over a run: the fused block on the parent's input to layer i learns the parent's output of
    layer j (normalized MSE, AdamW, cosine LR). The parent stays frozen; the block owns its copy of
    attention i and the fused FFN."""
    from megapuzzle.bld_blocks import StudentBlock, Teacher
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.cost_runtime import ensure_runtime
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.evaluate import _build

    t0 = time.perf_counter()
    ensure_runtime(None)
    parent, tensors, _ = load_checkpoint(parent_dir, dtype=torch.float32)
    layer, local = init_run_block(parent, tensors, i, j)
    teacher = Teacher(_build(parent, tensors), layers={i, j}, mid_layers=set())
    student = StudentBlock(f"run{i}-{j}", "layer", i, parent, layer, teacher, tp=1)
    student.load_canonical(local)
    train = PackedSequenceDataset.from_prefix(train_prefix)
    held = list(PackedSequenceDataset.from_prefix(heldout_prefix).eval_batches(batch_size, seq_len,
                                                                              max_batches=eval_batches))
    student.eval()
    init = _nmse(student, teacher, held, i, j)
    params = list(student.trainable().values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = []
    student.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        t = teacher.forward(train.batch(step, batch_size, seq_len, seed)[:, :-1])
        y = t.y[j]
        loss = (student(t) - y).pow(2).sum() / y.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
    student.eval()
    final = _nmse(student, teacher, held, i, j)
    log(f"[fusion-bld] run {i}-{j} ({layer.name}): held-out NMSE {init:.4f} -> {final:.4f} in {steps} steps")
    return RunBlockResult(layer, student.gather_canonical(), init, final, history, time.perf_counter() - t0)


def score_run_block(parent_dir, heldout_prefix, i: int, j: int, layer: LayerArch, local: Mapping[str, torch.Tensor],
                    *, batch_size: int = 4, seq_len: int = 64, num_batches: int = 2) -> dict[str, float]:
    """Replace-the-run quality: the parent with layers i..j replaced by the block, against the parent
    (KL(parent || model), LM loss, accuracy, top-1 agreement) on held-out batches."""
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.cost_runtime import ensure_runtime
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.evaluate import _build, quality_metrics

    ensure_runtime(None)
    parent, tensors, _ = load_checkpoint(parent_dir, dtype=torch.float32)
    arch, sd = run_state_dict(parent, tensors, i, j, layer, local)
    batches = list(PackedSequenceDataset.from_prefix(heldout_prefix).eval_batches(batch_size, seq_len,
                                                                                 max_batches=num_batches))
    pm = _build(parent, tensors)
    return quality_metrics(pm, {"run": _build(arch, sd)}, batches)["run"]
