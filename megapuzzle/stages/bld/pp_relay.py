"""BLD under pipeline parallelism: who works on which stage, the boundary relay, lockstep resume.

With PP > 1 the teacher is the parent as Megatron builds it under PP: stage k holds only its own
decoder layers (global `layer_number`), stage 0 the embedding. Every stage trains the blocks of
ITS OWN layers (split over that stage's data-parallel ranks) from its own teacher activations.
Per teacher pass, stage 0 embeds and runs its layers, then sends the boundary hidden state
[s, b, h] to the next stage (point-to-point, `parallel_state`'s next / previous pipeline rank);
stage k > 0 receives it, runs its layers and forwards it while a later stage still needs it.
Only that boundary tensor travels, never the per-layer streams of other stages' blocks. The
RoPE table is computed locally on every stage (Megatron's GPTModel has `rotary_pos_emb` there).

A pipeline (the TP x PP ranks of one data-parallel replica) therefore runs in lockstep: every
stage up to the deepest one with blocks to train runs the same teacher passes (calibration,
init NMSE, training steps, final NMSE), including stages with nothing to train (relay only).
Deeper stages only build their model shard (Megatron ties first and last stage embeddings at
construction) and join the resume agreement. A resume starts every stage from the same step:
the ranks holding blocks agree on their saved step, else the whole pipeline restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class PipelineRole:
    """What this rank's stage does in its pipeline (one data-parallel replica)."""

    stage: int
    """This rank's pipeline stage."""
    deepest: int
    """The deepest stage of this pipeline with blocks to train (every stage up to it takes part)."""
    carry_in: tuple[int, ...] = ()
    """Layers of earlier stages whose input (x) and post-attention (m) streams this stage receives
    after the boundary state: fused-run blocks trained here that start on an earlier stage."""
    carry_out: tuple[int, ...] = ()
    """Likewise, the layers whose x and m this stage sends on (its own or received)."""

    @property
    def active(self) -> bool:
        """Runs teacher passes (stages beyond the deepest one with work only build and agree)."""
        return self.stage <= self.deepest

    @property
    def recv_prev(self) -> bool:
        return 0 < self.stage <= self.deepest

    @property
    def send_next(self) -> bool:
        return self.stage < self.deepest


def run_carries(assign: list[list[list[str]]], todo: set[str], dp_rank: int, first_layer: dict[str, int],
                stages: list[range]) -> list[tuple[int, ...]]:
    """Per stage, the layers whose x / m streams it sends to the next stage: the first layers of
    fused-run blocks (`first_layer`: key -> layer) trained on a later stage of replica `dp_rank`
    (a run block trains on the stage of its last layer) that start at or before this stage."""
    out = []
    for s in range(len(stages)):
        later = {first_layer[k] for t in range(s + 1, len(stages)) for k in todo & set(assign[t][dp_rank])
                 if k in first_layer}
        out.append(tuple(sorted(i for i in later if i < stages[s].stop)))
    return out


def deepest_stage(assign: list[list[list[str]]], todo: set[str], dp_rank: int) -> int:
    """The deepest stage with blocks to train in data-parallel replica `dp_rank` (-1: none)."""
    return max((s for s, per_dp in enumerate(assign) if todo & set(per_dp[dp_rank])), default=-1)


class PipelineRelay:
    """Point-to-point transfer of the boundary hidden state between consecutive stages (gloo on
    CPU, NCCL on GPU; TP rank r of stage k talks to TP rank r of stage k +- 1)."""

    def __init__(self, role: PipelineRole, hidden_size: int, dtype: torch.dtype, device: torch.device):
        from megatron.core import parallel_state as ps

        self.role, self.hidden, self.dtype, self.device = role, hidden_size, dtype, device
        self.prev = ps.get_pipeline_model_parallel_prev_rank() if role.recv_prev else None
        self.next = ps.get_pipeline_model_parallel_next_rank() if role.send_next else None

    @property
    def send_next(self) -> bool:
        return self.next is not None

    def recv(self, seq_len: int, batch: int) -> torch.Tensor:
        """The previous stage's output [s, b, h] for this pass."""
        h = torch.empty(seq_len, batch, self.hidden, dtype=self.dtype, device=self.device)
        dist.recv(h, src=self.prev)
        return h

    def recv_carry(self, seq_len: int, batch: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The carried (x, m) of `role.carry_in`, received right after the boundary state."""
        return {i: (self.recv(seq_len, batch), self.recv(seq_len, batch)) for i in self.role.carry_in}

    def send(self, h: torch.Tensor) -> None:
        if h.dtype != self.dtype:
            raise RuntimeError(f"pipeline boundary tensor is {h.dtype}, the next stage expects {self.dtype}")
        dist.send(h.contiguous(), dst=self.next)


def agree_on_step(step: int | None, group) -> int | None:
    """The step every contributing rank of `group` passes (None: this rank has no say), or -1
    when they differ (a kill mid-save left them apart: all restart) or nobody contributed.

    Collective over `group`: every member calls it, contributing or not."""
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    none = -(2**62)
    v = torch.tensor([none, none] if step is None else [-step, step], dtype=torch.int64, device=dev)
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
    lo, hi = -int(v[0]), int(v[1])
    if hi == none:  # nobody had a say
        return -1
    return hi if lo == hi else -1


def any_flags(flags: list[bool], group) -> list[bool]:
    """Element-wise OR of `flags` over `group` (collective)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    v = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=dev)
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
    return [bool(x) for x in v.tolist()]
