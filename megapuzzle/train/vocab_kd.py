"""KL(parent || child) + CE on vocab-parallel logit shards, whole or in token chunks, and the parent's
logits from its final hidden state.

`VocabParallelKD` has a hand-written backward, so the full [tokens, vocab] logits are never all-gathered
over TP (like Megatron's vocab_parallel_cross_entropy).

GKD's last pipeline stage used to keep the parent's bf16 logits [tokens, V / tp] for every micro-batch the
parent ran ahead of the child (gkd.parent_pass_micro_batches), and the loss kept 3 fp32 tensors of that
shape for its backward (plus a few transient ones). Instead:

- the parent's pass stops at its final hidden state (after the final norm, Megatron's [s, b, h];
  megapuzzle.train.parent_pass, and `head_off` for a `GPTModel.forward`); `logits_from_hidden` applies
  the output layer (vocab-parallel over TP, as inside GPTModel) when the child's loss needs them. The same
  op on the same input: bitwise the logits the parent's forward returned.
- `ChunkedVocabParallelKD` computes the per-token (KL, CE) of `VocabParallelKD`
  over `chunk` tokens at a time, the parent's logits of each chunk included, and saves only its inputs
  (the child's logits, which the schedule holds anyway, and the parent's hidden state); its backward
  recomputes each chunk (one more parent head matmul and softmax per chunk) and writes that chunk's rows
  of the gradient. Every term is per token (softmax and sums run along the vocabulary), so the chunking
  changes no value's inputs, only the shapes of the kernels computing them: the numbers are the whole
  micro-batch's up to the rounding of the parent head's matmul over fewer rows, and of the row reductions
  (tests/test_gkd_head.py bounds both).

Under sequence parallelism (gkd.sequence_parallel) a final hidden state is this TP rank's [s / tp, b, h]:
the loss gathers the parent's along the sequence (`gather_sequence`) and applies the output layer to the
whole sequence, as the child's output layer does inside GPTModel; every term then covers every token.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megapuzzle.model.gpt import unwrap_model


def tp_group_rank_size():
    from megatron.core import parallel_state as ps

    n = ps.get_tensor_model_parallel_world_size()
    return (ps.get_tensor_model_parallel_group() if n > 1 else None), ps.get_tensor_model_parallel_rank(), n


def all_reduce_if(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def _log_softmax_vp(x: torch.Tensor, group) -> torch.Tensor:
    """log_softmax over a vocabulary split across the TP group (x: this rank's [.., V/tp] shard)."""
    m = all_reduce_if(x.max(dim=-1, keepdim=True).values, group, dist.ReduceOp.MAX)
    z = all_reduce_if((x - m).exp().sum(dim=-1, keepdim=True), group)
    return x - m - z.log()


def _target_shard(target: torch.Tensor, vocab_local: int, tp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into this rank's shard, mask of targets this rank holds)."""
    local = target - tp_rank * vocab_local
    held = (local >= 0) & (local < vocab_local)
    return local.clamp(0, vocab_local - 1), held


def _kd_forward(s, t, target, T: float, group, r):
    """One set of rows of VocabParallelKD's forward: (kl, ce, what its backward needs)."""
    s, t = s.float(), t.float()
    logp = _log_softmax_vp(t / T, group)
    logq = _log_softmax_vp(s / T, group)
    p = logp.exp()
    kl = all_reduce_if((p * (logp - logq)).sum(dim=-1), group) * (T * T)
    logq1 = logq if T == 1.0 else _log_softmax_vp(s, group)
    idx, held = _target_shard(target, s.shape[-1], r)
    ce = -all_reduce_if(logq1.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * held, group)
    return kl, ce, (p, logq, logq1, idx, held)


def _kd_grad(saved, g_kl, g_ce, T: float):
    """d(g_kl . kl + g_ce . ce) / ds in fp32 from `_kd_forward`'s saved rows (None if both are None)."""
    p, logq, logq1, idx, held = saved
    grad = None
    if g_kl is not None:
        grad = (logq.exp() - p) * (g_kl * T).unsqueeze(-1)
    if g_ce is not None:
        q1 = logq1.exp()
        q1.scatter_add_(-1, idx.unsqueeze(-1), -held.to(q1.dtype).unsqueeze(-1))
        grad = q1 * g_ce.unsqueeze(-1) if grad is None else grad + q1 * g_ce.unsqueeze(-1)
    return grad


class VocabParallelKD(torch.autograd.Function):
    """Per-token (T^2 KL(p_T || q_T), CE) from vocab-parallel shards of student logits s and
    teacher logits t. Gradients: d/ds T^2 KL = T (q_T - p_T); d/ds CE = q_1 - onehot(target).
    Saves 3 fp32 tensors of the logits' shape (`ChunkedVocabParallelKD` bounds them)."""

    @staticmethod
    def forward(ctx, s, t, target, temperature: float):
        ctx.set_materialize_grads(False)  # an unused output (lm_weight 0) gets None: skip its grad
        group, r, _ = tp_group_rank_size()
        ctx.dtype = s.dtype
        ctx.T = float(temperature)
        kl, ce, saved = _kd_forward(s, t, target, ctx.T, group, r)
        ctx.save_for_backward(*saved)
        return kl, ce

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        grad = _kd_grad(ctx.saved_tensors, g_kl, g_ce, ctx.T)
        return (None if grad is None else grad.to(ctx.dtype)), None, None, None



@contextlib.contextmanager
def head_off(model):
    """Within: the model (on the last pipeline stage, or at PP = 1) returns its final hidden state
    [s, b, h] (after the final norm) instead of logits: GPTModel skips its output layer when it is
    not a post-process stage; the decoder's final norm keeps its own flag."""
    m = unwrap_model(model)
    was = m.post_process
    m.post_process = False
    try:
        yield
    finally:
        m.post_process = was


def sequence_shards(model) -> int:
    """TP size when `model` runs sequence-parallel (each TP rank holds its own 1 / tp of the tokens of
    every stream between layers, the final hidden state included), else 1."""
    config = unwrap_model(model).config
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


@torch.no_grad()
def gather_sequence(model, hidden: torch.Tensor) -> torch.Tensor:
    """The whole sequence [s, b, h] of a final hidden state that is this rank's [s / tp, b, h] under
    sequence parallelism (all-gathered over TP, as the output layer gathers its input); else `hidden`."""
    if sequence_shards(model) == 1:
        return hidden
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer on the whole sequence [s, b, h]: [s, b, V / tp], as GPTModel._postprocess applies
    it (under sequence parallelism with its own gather off, as GPTModel does when it has gathered)."""
    m = unwrap_model(model)
    weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
    layer = m.output_layer
    was = layer.sequence_parallel
    layer.sequence_parallel = False
    try:
        return layer(hidden, weight=weight)[0]
    finally:
        layer.sequence_parallel = was


@torch.no_grad()
def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[b, s, V / tp] logits from the whole sequence's final hidden state [s, b, h]."""
    return _head(model, hidden).transpose(0, 1).contiguous()


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """[b, s, V / tp] logits from the final hidden state [s, b, h] (this rank's [s / tp, b, h] under
    sequence parallelism): bitwise what the forward returns."""
    return _logits(model, gather_sequence(model, hidden))


def _chunks(hidden: torch.Tensor, chunk: int):
    """(batch row, first token, last token + 1) over [s, b, h], `chunk` tokens of one row at a time."""
    n, b = hidden.shape[0], hidden.shape[1]
    for j in range(b):
        for a in range(0, n, chunk):
            yield j, a, min(a + chunk, n)


class ChunkedVocabParallelKD(torch.autograd.Function):
    """VocabParallelKD(s, logits_from_hidden(parent, hidden), target, T) computed `chunk` tokens at a time:
    s [b, s, V / tp] the child's logits, hidden [s, b, h] the parent's final hidden state."""

    @staticmethod
    def forward(ctx, s, hidden, target, temperature: float, parent, chunk: int):
        ctx.set_materialize_grads(False)
        group, r, _ = tp_group_rank_size()
        ctx.T, ctx.parent, ctx.chunk, ctx.group, ctx.rank = float(temperature), parent, chunk, group, r
        kl = torch.empty(target.shape, dtype=torch.float32, device=s.device)
        ce = torch.empty_like(kl)
        with torch.no_grad():
            for j, a, e in _chunks(hidden, chunk):
                t = _head(parent, hidden[a:e, j:j + 1])[:, 0]
                kl[j, a:e], ce[j, a:e], _ = _kd_forward(s[j, a:e], t, target[j, a:e], ctx.T, group, r)
        ctx.save_for_backward(s, hidden, target)
        return kl, ce

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        s, hidden, target = ctx.saved_tensors
        if g_kl is None and g_ce is None:
            return (None,) * 6
        grad = torch.empty_like(s)
        with torch.no_grad():
            for j, a, e in _chunks(hidden, ctx.chunk):
                t = _head(ctx.parent, hidden[a:e, j:j + 1])[:, 0]
                saved = _kd_forward(s[j, a:e], t, target[j, a:e], ctx.T, ctx.group, ctx.rank)[2]
                gk = None if g_kl is None else g_kl[j, a:e]
                gc = None if g_ce is None else g_ce[j, a:e]
                grad[j, a:e] = _kd_grad(saved, gk, gc, ctx.T)
        return grad, None, None, None, None, None


def kd_from_parent_hidden(s_logits: torch.Tensor, parent, hidden: torch.Tensor, target: torch.Tensor,
                          temperature: float, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (T^2 KL(parent || child), CE) [b, s] from the child's logits and the parent's final
    hidden state: `chunk` tokens at a time, or (0) the whole micro-batch at once, bitwise as before.
    Under sequence parallelism `hidden` is this rank's share of the tokens; the child's logits (its output
    layer gathers) and the terms cover every token on every TP rank, as without it."""
    hidden = gather_sequence(parent, hidden)
    if chunk <= 0 or chunk >= hidden.shape[0] * hidden.shape[1]:
        return VocabParallelKD.apply(s_logits, _logits(parent, hidden), target, temperature)
    return ChunkedVocabParallelKD.apply(s_logits, hidden, target, temperature, parent, chunk)


def parent_lm_from_hidden(parent, hidden: torch.Tensor, target: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """The parent's own per-token CE [b, s] (held-out metrics; no grad), `chunk` tokens at a time."""
    with torch.no_grad():
        hidden = gather_sequence(parent, hidden)
        if chunk <= 0:
            t = _logits(parent, hidden)
            return VocabParallelKD.apply(t, t, target, 1.0)[1]
        group, r, _ = tp_group_rank_size()
        ce = torch.empty(target.shape, dtype=torch.float32, device=hidden.device)
        for j, a, e in _chunks(hidden, chunk):
            t = _head(parent, hidden[a:e, j:j + 1])[:, 0]
            ce[j, a:e] = _kd_forward(t, t, target[j, a:e], 1.0, group, r)[1]
        return ce
