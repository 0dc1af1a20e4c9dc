"""Full-vocab logits and per-layer residual streams from a (TP/PP-sharded) GPTModel, through
`GPTModel.forward` (position ids and the vocabulary gather are megapuzzle.model.runner's; run a
model layer by layer, or part of it, with runner.StageRunner).

Under PP > 1 the forward runs through Megatron's own pipeline schedule (forward-only) and the
results are broadcast from the stage that has them, so every rank can compare / use them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from .gpt import unwrap_model
from .runner import gather_vocab, position_ids


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def _device(model) -> torch.device:
    for p in unwrap_model(model).parameters():
        return p.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _microbatches(tokens: torch.Tensor, micro_batch_size: int | None) -> tuple[list[torch.Tensor], int]:
    mbs = micro_batch_size or tokens.shape[0]
    if tokens.shape[0] % mbs:
        raise ValueError(f"batch size {tokens.shape[0]} is not a multiple of micro_batch_size {mbs}")
    return list(tokens.split(mbs, dim=0)), mbs


def _pp_broadcast(x: torch.Tensor | None, shape, dtype, device, src_stage: int) -> torch.Tensor:
    """Broadcast a tensor from pipeline stage `src_stage` to every stage of this PP group."""
    ps = _ps()
    group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    if ps.get_pipeline_model_parallel_rank() != src_stage:
        x = torch.empty(shape, dtype=dtype, device=device)
    else:
        x = x.contiguous()
    dist.broadcast(x, src=ranks[src_stage], group=group)
    return x


def _run_pipeline(model, tokens: torch.Tensor, micro_batch_size: int | None) -> list[torch.Tensor]:
    """Forward-only pipeline schedule; returns the last stage's per-microbatch outputs ([] elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs_list, mbs = _microbatches(tokens, micro_batch_size)
    it: Iterator[torch.Tensor] = iter(mbs_list)

    def forward_step(data_iterator, m):
        t = next(data_iterator)
        out = m(t, position_ids(t), None)
        return out, lambda output, non_loss_data=False: output

    fb = get_forward_backward_func()
    return fb(forward_step_func=forward_step, data_iterator=it, model=[model],
              num_microbatches=len(mbs_list), seq_length=tokens.shape[1], micro_batch_size=mbs,
              forward_only=True, collect_non_loss_data=True)


def forward_logits(model, tokens: torch.Tensor, *, micro_batch_size: int | None = None,
                   broadcast: bool = True) -> torch.Tensor | None:
    """Logits [b, s, V] (full vocabulary) for tokens [b, s], causal attention.

    PP = 1: a plain forward that follows the ambient grad mode (wrap in torch.no_grad() for
    evaluation; gradients flow through the TP gather). PP > 1: Megatron's forward-only
    pipeline schedule (no grad); with broadcast=True every stage gets the logits, otherwise
    only the last stage does and the others get None.
    """
    ps = _ps()
    m = unwrap_model(model)
    tokens = tokens.to(_device(model))
    if ps.get_pipeline_model_parallel_world_size() == 1:
        outs = [m(t, position_ids(t), None) for t in _microbatches(tokens, micro_batch_size)[0]]
        return gather_vocab(torch.cat(outs, dim=0) if len(outs) > 1 else outs[0])
    with torch.no_grad():
        outs = _run_pipeline(model, tokens, micro_batch_size)
        last = ps.get_pipeline_model_parallel_world_size() - 1
        logits = gather_vocab(torch.cat(outs, dim=0)) if ps.is_pipeline_last_stage(ignore_virtual=True) else None
        if not broadcast:
            return logits
        shape = (tokens.shape[0], tokens.shape[1], m.vocab_size)
        return _pp_broadcast(logits, shape, m.config.params_dtype, tokens.device, last)


@contextlib.contextmanager
def capture_layer_inputs(model, layers: Iterable[int] | None = None, detach: bool = True):
    """Record the residual stream entering each (global) layer index of this stage.

    Yields a dict {global layer index: list of [b, s, h] tensors, one per forward call /
    microbatch}. Index `num_layers` (the input of the final norm) is recorded on the last
    stage as the output of the last layer. Hooks are removed on exit.
    """
    m = unwrap_model(model)
    want = None if layers is None else set(layers)
    store: dict[int, list[torch.Tensor]] = {}
    handles = []

    def keep(i: int, hs: torch.Tensor):
        if want is None or i in want:
            hs = hs.detach() if detach else hs
            store.setdefault(i, []).append(hs.transpose(0, 1))  # Megatron is [s, b, h]

    for layer in m.decoder.layers:
        i = layer.layer_number - 1

        def pre(mod, args, kwargs, i=i):
            keep(i, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    if m.post_process and len(m.decoder.layers):
        last = m.decoder.layers[-1]
        n = last.layer_number

        def post(mod, args, output, n=n):
            keep(n, output[0] if isinstance(output, tuple) else output)

        handles.append(last.register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def forward_hidden_states(model, tokens: torch.Tensor, layers: Iterable[int] | None = None, *,
                          micro_batch_size: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(logits [b, s, V], {layer index: residual stream entering it, [b, s, h]}) on every rank.

    Layer index `num_layers` is the final residual (input of the final norm). No grad. Under
    PP each stage's streams are broadcast to all stages.
    """
    ps = _ps()
    m = unwrap_model(model)
    num_layers = m.config.num_layers
    wanted = sorted(set(range(num_layers + 1)) if layers is None else set(layers))
    with torch.no_grad(), capture_layer_inputs(model, wanted) as store:
        logits = forward_logits(model, tokens, micro_batch_size=micro_batch_size)
    local = {i: torch.cat(v, dim=0) for i, v in store.items()}
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return logits, local
    from .config import stage_layer_ranges

    ranges = stage_layer_ranges(num_layers, pp)
    hidden = m.config.hidden_size
    shape = (tokens.shape[0], tokens.shape[1], hidden)
    out = {}
    for i in wanted:
        owner = pp - 1 if i == num_layers else next(s for s, r in enumerate(ranges) if i in r)
        out[i] = _pp_broadcast(local.get(i), shape, m.config.params_dtype, logits.device, owner)
    return logits, out
