"""GKD under pipeline parallelism (gkd.pipeline_parallel > 1): the pieces `megapuzzle.stages.gkd.gkd` uses.

Child and parent have the same layer count, so Megatron's pipeline split puts layer i of both on
the same stage and every hidden-state comparison is stage-local. Per step (one rank's share of
the global batch, in micro-batches):

1. The parent runs forward-only, layer by layer through model/runner.py (`forward_pass` ->
   megapuzzle.train.parent_pass; no grad): micro-batch by micro-batch each stage receives its input
   from the previous stage, runs its layers and sends the stream on. Each stage keeps the outputs of
   ITS OWN layers per micro-batch; the last stage also keeps the parent's final hidden state (after
   the final norm; its output layer never runs), not its logits: [tokens, h] bf16, not [tokens, V / tp].
   Nothing but the usual boundary activation crosses stages.
   It runs the rank's whole batch at once, or `gkd.parent_pass_micro_batches` micro-batches at a
   time, each group then followed by the child's schedule over it (steps 1-2 per group): what it
   keeps is bounded by the group, at the price of one more pipeline fill and drain per group.
2. The child runs forward + backward under Megatron-core's 1F1B schedule
   (`get_forward_backward_func`). Each stage computes its layers' cosine terms against the
   parent's in its forward step. The last stage adds them to its loss function (KL + LM on the
   vocab shards, the parent's logits computed there from its hidden state by its output layer,
   `gkd.loss_chunk_tokens` tokens at a time: megapuzzle.train.vocab_kd); every other stage attaches
   them to its output activation with `AttachLoss` (Megatron's `MoEAuxLossAutoScaler` trick:
   identity forward, and the backward that the schedule starts from the gradient the next stage
   sends also back-propagates d(local loss)). Scaled by 1 / micro-batches as Megatron scales the main loss.
   Under `gkd.recompute` the child's layers re-run in the backward; the hooks skip that re-run
   (megapuzzle.train.distill.in_recompute).

The held-out metrics (`evaluate_heldout_pp`) run the parent the same way and the child through
`GPTModel.forward` in Megatron's forward-only schedule (`child_forward_pass`): the forward it trains
with, an fp8 child's quantization context included, as at PP = 1.

The reported terms are per-stage partial sums (zeros for the layers / logits a stage lacks),
summed over the pipeline group at log time, so they are the PP = 1 numbers. Gradients of the
tied embedding (first and last stage copies) are all-reduced over Megatron's embedding group and
the grad norm runs over all stages (`megapuzzle.stages.gkd.trainers.tp_grad_norm`), as `finalize_model_grads`
and Megatron's clip do.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megapuzzle.metrics import heldout_metrics
from megapuzzle.model.gpt import unwrap_model
from megapuzzle.train.distill import (capture_layer_outputs, cosine_distance, require_graph, sequence_share,
                                      sequence_shards)
from megapuzzle.train.parent_pass import StagePass, parent_pass
from megapuzzle.train.vocab_kd import head_off, kd_from_parent_hidden, logits_from_hidden, parent_lm_from_hidden


class AttachLoss(torch.autograd.Function):
    """y = x in the forward; the backward also sends gradient 1 into `aux` (a scalar loss), so
    back-propagating from y back-propagates aux too (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux)


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def _is_last_stage() -> bool:
    return _ps().is_pipeline_last_stage(ignore_virtual=True)


def forward_pass(model, tokens: torch.Tensor, micro: int) -> StagePass:
    """The frozen parent's pass over `tokens` [b, s] in micro-batches of `micro`, layer by layer through
    the pipeline (megapuzzle.train.parent_pass: model/runner.py's stage pieces, the stream sent stage to
    stage): (this stage's layer outputs per micro-batch, the last stage's final hidden state [s, mb, h]
    per micro-batch: the output layer does not run, megapuzzle.train.vocab_kd computes the logits)."""
    return parent_pass(model, tokens, micro)


@torch.no_grad()
def child_forward_pass(model, tokens: torch.Tensor, micro: int) -> StagePass:
    """`forward_pass`'s results for the child, through `GPTModel.forward` as it trains (Megatron's
    forward-only schedule, forward hooks, the output layer off): the child's forward is the one the
    training runs (an fp8 child's quantization context included), at PP = 1 and PP > 1 alike."""
    from megapuzzle.model.forward import _run_pipeline

    with capture_layer_outputs(model, detach=True) as hidden, head_off(model):
        final = _run_pipeline(model, tokens, micro)
    return hidden, final


def train_microbatches(model, parent, batch: torch.Tensor, micro: int, cfg, w: dict[str, float],
                       window: torch.Tensor, nt: int) -> None:
    """Forward + backward of one rank's batch [b, s + 1] through the pipeline (grads accumulate
    in the child's parameters). Adds this stage's share of (loss, cosine, kl, lm) and of the
    per-layer cosine means, each / micro-batches, to window[:nt] and window[nt + 1:]."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens, labels = batch[:, :-1], batch[:, 1:]
    n_micro = tokens.shape[0] // micro
    group = min(cfg.parent_pass_micro_batches or n_micro, n_micro)
    parent_out: dict = {}  # this group's parent layer outputs and final hidden states, per micro-batch
    last = _is_last_stage()
    config = unwrap_model(model).config
    shards = sequence_shards(model)  # under sequence parallelism: this rank's tokens' share of each mean
    aux_scale = 1.0 / n_micro
    if config.grad_scale_func is not None:  # fp16 loss scaling scales the main loss in backward_step
        aux_scale = config.grad_scale_func(torch.ones((), device=tokens.device)) / n_micro
    zero = torch.zeros((), dtype=torch.float64, device=window.device)

    def record(vals: list[torch.Tensor], per_layer: dict[int, torch.Tensor]) -> None:
        window[:nt] += torch.stack([v.detach().double() for v in vals]) / n_micro
        for i, v in per_layer.items():
            window[nt + 1 + i] += v.detach().double() / n_micro

    def forward_step(data_iterator, m):
        k = next(data_iterator)
        t = tokens[k * micro:(k + 1) * micro]
        hp, t_final, g0 = parent_out["hidden"], parent_out["final"], parent_out["first"]
        with capture_layer_outputs(m) as hc:
            out = m(t, torch.arange(t.shape[1], device=t.device).unsqueeze(0).expand_as(t), None)
        require_graph([hc[i][0] for i in hc])
        layer = {i: sequence_share(cosine_distance(hc[i][0], hp[i][k - g0]).mean(), shards) for i in sorted(hc)}
        cos = torch.stack(list(layer.values())).sum()
        if not last:
            record([w["cosine"] * cos if w["cosine"] > 0 else zero, cos, zero, zero], layer)
            if w["cosine"] > 0:
                out = AttachLoss.apply(out, w["cosine"] * cos * aux_scale)
            return out, lambda output: (output, {})

        def loss_func(s_logits):
            kl, ce = kd_from_parent_hidden(s_logits, parent, t_final[k - g0], labels[k * micro:(k + 1) * micro],
                                           cfg.temperature, cfg.loss_chunk_tokens)
            terms = {"cosine": cos, "kl": kl.mean(), "lm": ce.mean()}
            loss = sum(w[n] * terms[n] for n in ("cosine", "kl", "lm") if w[n] > 0)
            record([loss, cos, terms["kl"], terms["lm"]], layer)  # before Megatron scales loss in place
            # Megatron divides by the schedule's micro-batches (the group's): the step's mean needs n_micro
            return (loss if group == n_micro else loss * (group / n_micro)), {}

        return out, loss_func

    # Megatron's DDP (overlap_grad_reduce) reduces the grads with the schedule's last micro-batch: only
    # the last group's; the earlier groups run entirely under its no_sync.
    no_sync = config.no_sync_func
    try:
        for g0 in range(0, n_micro, group):
            hidden, final = forward_pass(parent, tokens[g0 * micro:(g0 + group) * micro], micro)
            parent_out.update(hidden=hidden, final=final, first=g0)
            final = g0 + group == n_micro
            config.no_sync_func = no_sync if final else None
            with contextlib.nullcontext() if final or no_sync is None else no_sync():
                get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter(range(g0, g0 + group)), model=[model],
                    num_microbatches=group, seq_length=tokens.shape[1], micro_batch_size=micro, forward_only=False)
            parent_out.clear()  # drop this group's parent outputs before the next group's pass
            del hidden, final
    finally:
        config.no_sync_func = no_sync


@torch.no_grad()
def evaluate_heldout_pp(child, parent, heldout, cfg, info) -> dict[str, float]:
    """megapuzzle.stages.gkd.gkd.evaluate_heldout under PP: both models forward-only through the pipeline,
    each stage sums its layers' cosine terms, the last stage KL / LM / parent LM; the sums are
    all-reduced over the pipeline group, then the data-parallel group."""
    was = child.training
    child.eval()
    dev = next(unwrap_model(parent).parameters()).device
    acc = torch.zeros(5, dtype=torch.float64, device=dev)  # cosine, kl, lm, parent lm, tokens
    last = _is_last_stage()
    for i, batch in enumerate(heldout.eval_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches)):
        if i % info.dp_size != info.dp_rank:
            continue
        batch = batch.to(dev)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        rows = tokens.shape[0]  # the last batch may be smaller: the largest micro-batch that divides it
        micro = max(d for d in range(1, min(cfg.micro_batch_size or rows, rows) + 1) if rows % d == 0)
        hp, t_final = forward_pass(parent, tokens, micro)
        hc, s_final = child_forward_pass(child, tokens, micro)
        for k in range(tokens.shape[0] // micro):
            acc[0] += sum(cosine_distance(hc[j][k], hp[j][k]).sum() for j in sorted(hc)).double()
            if last:
                y = labels[k * micro:(k + 1) * micro]
                s_logits = logits_from_hidden(child, s_final[k])
                kl, ce = kd_from_parent_hidden(s_logits, parent, t_final[k], y, cfg.temperature, cfg.loss_chunk_tokens)
                parent_lm = parent_lm_from_hidden(parent, t_final[k], y, cfg.loss_chunk_tokens)
                acc[1:5] += torch.stack([kl.sum(), ce.sum(), parent_lm.sum(),
                                         torch.tensor(float(y.numel()), device=dev)]).double()
    if sequence_shards(child) > 1:  # each TP rank's cosine sum covers its own tokens
        dist.all_reduce(acc[:1], group=_ps().get_tensor_model_parallel_group())
    dist.all_reduce(acc, group=_ps().get_pipeline_model_parallel_group())
    if info.dp_size > 1:
        dist.all_reduce(acc, group=_ps().get_data_parallel_group())
    child.train(was)
    return heldout_metrics(acc, cosine_weight=cfg.cosine_weight, kl_weight=cfg.kl_weight, lm_weight=cfg.lm_weight)


def allreduce_tied_embedding_grads(model) -> None:
    """Tied input / output embeddings under PP live on the first and the last stage: sum their
    grads over Megatron's embedding group (as finalize_model_grads does) so both copies stay equal."""
    m = unwrap_model(model)
    if not getattr(m, "share_embeddings_and_output_weights", False) or not (m.pre_process or m.post_process):
        return
    group = _ps().get_embedding_group(check_initialized=False)
    if group is None or dist.get_world_size(group) == 1 or dist.get_rank() not in dist.get_process_group_ranks(group):
        return
    weight = m.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=group)
