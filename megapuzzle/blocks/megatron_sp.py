"""Megatron-core modules under sequence parallelism (SP) that 0.16 lacks or gets wrong on our paths.

- `SequenceParallelTorchNorm`: torch's RMSNorm / LayerNorm (the local spec's norm on machines without TE /
  Apex) refuses SP in `WrappedTorchNorm` only because it does not mark its weight. A norm is per token, so
  it runs unchanged on a rank's share of the tokens; its weight, replicated but seeing only those tokens,
  is marked `sequence_parallel` (as TENorm / FusedLayerNorm mark theirs) so its grad is summed over TP
  (Megatron's finalize_model_grads; GKD's local trainer).
- `sequence_parallel_gathered(cls)`: DeciLM's linear replacement (`ColumnParallelLinearGathered` and its
  TE twin) must hand the residual add its rank's tokens with every column: Megatron zero-pads its
  [s, b, h / tp] output to [s, b, h] and reduce-scatters along the sequence, but builds the pad list for
  the FIRST dim (F.pad's list starts at the last one), so under SP the output has the wrong shape. The
  same computation with the pad on the hidden dim.
"""

from __future__ import annotations

import copy
import functools

import torch.nn.functional as F
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class SequenceParallelTorchNorm:
    """WrappedTorchNorm for a config with sequence_parallel, its parameters marked `sequence_parallel`."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        plain = copy.copy(config)
        plain.sequence_parallel = False  # the only reason WrappedTorchNorm refuses it
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm


def gather_replacement_output(out, config):
    """A linear replacement's [s', b, h / tp] column shard -> what the residual add takes: [s, b, h] all-
    gathered over TP without SP; under SP this rank's [s / tp, b, h] (padded to h, reduce-scattered along
    the sequence: the other ranks' columns of these tokens arrive, zeros add nothing)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import (
        gather_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    n = ps.get_tensor_model_parallel_world_size()
    if n == 1:
        return out
    if not config.sequence_parallel:
        return gather_from_tensor_model_parallel_region(out)
    r, w = ps.get_tensor_model_parallel_rank(), out.shape[-1]
    return reduce_scatter_to_sequence_parallel_region(F.pad(out, [r * w, (n - 1 - r) * w]))


@functools.cache
def sequence_parallel_gathered(cls):
    """`cls` (ColumnParallelLinearGathered or TELayerNormColumnParallelLinearGathered) whose output goes
    through `gather_replacement_output`: its parent linear's forward on the input alone (both callers pass
    the layer's other arguments as keywords, which the linear ignores, as `cls.forward` does; under SP
    it gathers the input along the sequence itself), then the fixed gather."""
    linear = cls.__mro__[1]  # ColumnParallelLinear / TELayerNormColumnParallelLinear

    class SequenceParallelGathered(cls):
        def forward(self, x, **kwargs):
            out, bias = linear.forward(self, x)
            assert bias is None, "a linear replacement has no bias (skip_bias_add=False)"
            return gather_replacement_output(out, self.config), bias

    SequenceParallelGathered.__name__ = SequenceParallelGathered.__qualname__ = f"SequenceParallel{cls.__name__}"
    return SequenceParallelGathered
