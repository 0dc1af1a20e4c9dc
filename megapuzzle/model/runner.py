"""One pipeline stage of a (TP / PP-sharded) Megatron GPTModel, run layer by layer.

The one place that knows how our GPTModel computes outside `GPTModel.forward`: position ids and
the embedding (first stage), the RoPE table (every stage, computed locally), this stage's
decoder layers `[first, stop)` by GLOBAL index, any of them optionally replaced by another module
(a candidate block), and the final norm + head (last stage) as full-vocabulary fp32 log-probs
gathered over TP. Between stages the residual stream [s, b, h] travels point to point: TP rank r
of stage k sends to TP rank r of stage k + 1 (`parallel_state`'s next / previous pipeline rank;
gloo on CPU, NCCL on GPU). Both sides know the shape (the caller's schedule is deterministic),
so nothing but the tensor itself is sent.

    run = StageRunner(model)
    h = run.stage_input(tokens)           # embed (first stage) or receive (later stages)
    rot = run.rotary(h)
    h = run.layers_from(h, rot, start=l, replace={l: block})
    lp = run.stage_output(h)              # log-probs [b, s, V] on the last stage, else sent on: None

Used by `megapuzzle score` (its cached, stacked candidate passes), BLD's teacher, `evaluate` and GKD's
frozen parent (megapuzzle.train.parent_pass).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .gpt import unwrap_model


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """0..s-1 for every sequence of tokens [b, s] (packed documents are not reset: causal LM)."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[b, s, V/tp] shards -> [b, s, V] (autograd-aware all-gather over the TP group)."""
    if _ps().get_tensor_model_parallel_world_size() == 1:
        return logits
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


class StageRunner:
    """This rank's pipeline stage of a GPTModel (eval mode), run layer by layer."""

    def __init__(self, model):
        self.m = unwrap_model(model)
        self.m.eval()
        self.dtype = self.m.config.params_dtype
        self.hidden = self.m.config.hidden_size
        self.seq_shards = self.m.config.tensor_model_parallel_size if self.m.config.sequence_parallel else 1
        """Sequence parallelism splits every stream between layers along the sequence over TP."""
        self.layers = {l.layer_number - 1: l for l in self.m.decoder.layers}
        """Global layer index -> this stage's TransformerLayer."""
        self.first = min(self.layers, default=0)
        self.stop = max(self.layers, default=-1) + 1
        self.is_first = bool(getattr(self.m, "pre_process", True))
        self.is_last = bool(getattr(self.m, "post_process", True))
        self.device = next(self.m.parameters()).device
        ps = _ps()
        pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        self.stage = ps.get_pipeline_model_parallel_rank() if pp > 1 else 0
        self.prev = ps.get_pipeline_model_parallel_prev_rank() if pp > 1 and not self.is_first else None
        self.next = ps.get_pipeline_model_parallel_next_rank() if pp > 1 and not self.is_last else None

    def owns(self, layer: int) -> bool:
        return self.first <= layer < self.stop

    # ------------------------------------------------------------------ the pieces

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """First stage: tokens [b, s] -> residual stream [s, b, h] (TP-reduced)."""
        tokens = tokens.to(self.device)
        return self.m.embedding(input_ids=tokens, position_ids=position_ids(tokens))

    def rotary(self, h: torch.Tensor):
        """The RoPE table for the stream `h` [s, b, h] (None without RoPE); every stage has it."""
        rope = getattr(self.m, "rotary_pos_emb", None)
        if rope is None:
            return None
        return rope(rope.get_rotary_seq_len(None, self.m.decoder, h, self.m.config, None))

    def layers_from(self, h: torch.Tensor, rot, start: int | None = None, stop: int | None = None,
                    replace: Mapping[int, torch.nn.Module] | None = None,
                    on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """This stage's layers max(start, first) .. min(stop, self.stop) - 1 on `h` [s, b, h];
        layer i is `replace[i]` where given (a Megatron TransformerLayer or anything with its call).
        `on_layer(i, input, output)` sees each layer's streams (what a caller keeps: BLD's teacher,
        GKD's parent)."""
        lo = self.first if start is None else max(start, self.first)
        hi = self.stop if stop is None else min(stop, self.stop)
        for i in range(lo, hi):
            layer = replace[i] if replace and i in replace else self.layers[i]
            x = h
            h, _ = layer(hidden_states=h, attention_mask=None, rotary_pos_emb=rot)
            if on_layer is not None:
                on_layer(i, x, h)
        return h

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """Last stage: the final hidden state [s, b, h] (after the final norm, before the head)."""
        return self.m.decoder.final_layernorm(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Last stage: final norm + output layer -> full-vocabulary fp32 log-probs [b, s, V]."""
        h = self.final_norm(h)
        w = self.m.shared_embedding_or_output_weight() if self.m.share_embeddings_and_output_weights else None
        logits, _ = self.m.output_layer(h, weight=w)
        return F.log_softmax(gather_vocab(logits.transpose(0, 1).contiguous()).float(), dim=-1)

    # ------------------------------------------------------------------ between stages

    def recv(self, seq_len: int, batch: int) -> torch.Tensor:
        """The previous stage's output [s, b, h] (this stage's input; this TP rank's [s / tp, b, h] under
        sequence parallelism, as the embedding scatters it and Megatron's schedules send it)."""
        h = torch.empty(seq_len // self.seq_shards, batch, self.hidden, dtype=self.dtype, device=self.device)
        dist.recv(h, src=self.prev)
        return h

    def send(self, h: torch.Tensor) -> None:
        dist.send(h.to(self.dtype).contiguous(), dst=self.next)

    def stage_input(self, tokens: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """The stream entering this stage for tokens [b, s]: the embedding on the first stage, else
        received ([s, batch or b, h]: a stacked pass carries several copies of the batch)."""
        if self.is_first:
            return self.embed(tokens)
        return self.recv(tokens.shape[1], tokens.shape[0] if batch is None else batch)

    def stage_output(self, h: torch.Tensor) -> torch.Tensor | None:
        """The last stage's log-probs [b, s, V]; other stages send `h` on and return None."""
        if self.is_last:
            return self.head(h)
        self.send(h)
        return None

    @torch.no_grad()
    def log_probs(self, tokens: torch.Tensor, replace: Mapping[int, torch.nn.Module] | None = None
                  ) -> torch.Tensor | None:
        """The whole model on tokens [b, s] through this pipeline (every stage calls it): log-probs
        on the last stage, None elsewhere."""
        h = self.stage_input(tokens)
        return self.stage_output(self.layers_from(h, self.rotary(h), replace=replace))
