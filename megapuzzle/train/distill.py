"""Distillation loss pieces shared by GKD (and any later distillation stage).

Per-token cosine distance between child and parent hidden states at every layer output, and
KL(parent || child) + CE on vocab-parallel logit shards (megapuzzle.train.vocab_kd: from the
parent's final hidden state, whole or `chunk` tokens at a time).

Under activation recompute (gkd.recompute) the child's layers run twice: once in the forward
(Megatron's full recompute: under no_grad inside `CheckpointFunction`, whose output torch then
connects to the graph) and again inside the backward. The hidden-state hooks record only the
first (`in_recompute`), and `CosineDistance` saves nothing but its two bf16 / fp32 inputs (which
the model keeps anyway), so the cosine terms add no activations of their own.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from megapuzzle.train.vocab_kd import (  # noqa: F401 (re-exported: VocabParallelKD's home was here)
    VocabParallelKD, all_reduce_if, kd_from_parent_hidden, parent_lm_from_hidden, head_off, sequence_shards,
    tp_group_rank_size)
from megapuzzle.train.parent_pass import parent_pass


def in_recompute() -> bool:
    """True while activation recompute re-runs a forward inside the backward. Megatron's
    `CheckpointFunction` flags both of its passes (`is_checkpointing()`), the original one under
    no_grad, the re-run under enable_grad; any recompute (TransformerEngine's checkpoint under fp8,
    torch.utils.checkpoint) runs inside the autograd engine, where the current graph task id is set."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    return (is_checkpointing() and torch.is_grad_enabled()) or torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def capture_layer_outputs(model, detach: bool = False):
    """Yields {global layer index: [that layer's output per forward call]} for this model's (pipeline
    stage's) decoder layers: the residual stream after each, Megatron's [s, b, h]. Autograd-connected
    unless `detach`, so the child's hidden-state loss back-propagates. A recompute of the layer in the
    backward (`in_recompute`, gkd.recompute) is not a forward call and is not recorded."""
    from megapuzzle.model.gpt import unwrap_model

    store: dict[int, list[torch.Tensor]] = {}

    def hook(i):
        def keep(mod, args, output):
            if not in_recompute():
                h = output[0] if isinstance(output, tuple) else output
                store.setdefault(i, []).append(h.detach() if detach else h)
        return keep

    handles = [layer.register_forward_hook(hook(layer.layer_number - 1))
               for layer in unwrap_model(model).decoder.layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def require_graph(hidden: list[torch.Tensor]) -> None:
    """In a training forward every captured child hidden state must carry the graph (under full
    recompute torch attaches it to the checkpoint's output); otherwise the cosine terms would
    silently train nothing."""
    if torch.is_grad_enabled() and not all(h.requires_grad for h in hidden):
        raise RuntimeError("a captured child hidden state has no autograd graph: the cosine loss would not train it")


class CosineDistance(torch.autograd.Function):
    """Per-token 1 - cos(c, p) over the last dim, in fp32, as `1 - F.cosine_similarity(c.float(),
    p.float(), eps=1e-8)` computes it (bitwise), differentiable in c. Saves only c and p (held by the
    model / the parent's captured stream anyway) and recomputes the fp32 intermediates in the
    backward: autograd of the plain expression would keep fp32 copies of both, several bytes per
    element of every layer's output, as much as full recompute keeps for the whole layer."""

    @staticmethod
    def forward(ctx, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(c, p)
        return 1.0 - F.cosine_similarity(c.float(), p.float(), dim=-1, eps=1e-8)

    @staticmethod
    def backward(ctx, grad):
        c, p = ctx.saved_tensors
        with torch.enable_grad():
            x = c.detach().requires_grad_(True)
            y = 1.0 - F.cosine_similarity(x.float(), p.float(), dim=-1, eps=1e-8)
            (g,) = torch.autograd.grad(y, x, grad)
        return g, None


def cosine_distance(c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[s, b] per-token 1 - cos of child c and parent p hidden states [s, b, h] (p without grad)."""
    return CosineDistance.apply(c, p)


def sequence_share(token_mean: torch.Tensor, shards: int) -> torch.Tensor:
    """This rank's share of a mean over the tokens, from the mean over the tokens it holds: under sequence
    parallelism (shards = TP) each TP rank holds its own s / tp of every layer's output, so its local mean
    / tp is its tokens' part of the whole mean, and the sum over TP the whole. Each rank's loss is its
    tokens' part: the backward through Megatron's sequence-parallel collectives (all-gather <->
    reduce-scatter) then sums the parts' grads, as it does for a replicated loss on vocabulary shards."""
    return token_mean if shards == 1 else token_mean / shards


def distill_terms(child, parent, tokens: torch.Tensor, labels: torch.Tensor, temperature: float,
                  parent_lm: bool = False, chunk: int = 0) -> dict[str, torch.Tensor]:
    """Per-token loss terms of one micro-batch: {"cosine": [L, s, b] (1 - cos per layer; this rank's
    [L, s / tp, b] under sequence parallelism), "kl": [b, s], "lm": [b, s]} (+ the parent's own
    "parent_lm"); the parent runs without grad, layer by layer (megapuzzle.train.parent_pass), the child
    through `GPTModel.forward` in the grad mode (autograd, activation recompute). The parent's pass stops
    at its final hidden state; its logits are computed by the loss, `chunk` tokens at a time (0: all at
    once; gkd.loss_chunk_tokens)."""
    hidden, final = parent_pass(parent, tokens, tokens.shape[0])  # no grad; layer by layer (model/runner.py)
    hp, t_hidden = [hidden[i][0] for i in sorted(hidden)], final[0]  # t_hidden: [s, b, h] after the final norm
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    with capture_layer_outputs(child) as kept:
        s_logits = child(tokens, pos, None)  # [b, s, V/tp]: GPTModel built with parallel_output=True
    hc = [kept[i][0] for i in sorted(kept)]
    require_graph(hc)
    cos = torch.stack([cosine_distance(c, p) for c, p in zip(hc, hp)])
    kl, ce = kd_from_parent_hidden(s_logits, parent, t_hidden, labels, temperature, chunk)
    out = {"cosine": cos, "kl": kl, "lm": ce}
    if parent_lm:
        out["parent_lm"] = parent_lm_from_hidden(parent, t_hidden, labels, chunk)
    return out
