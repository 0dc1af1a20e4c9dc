"""The Megatron-core modules the kinds' `megatron_spec` methods are made of: the pre-norm (a separate
norm in the local spec, fused into the first linear by TransformerEngine), the residual add, the
linear replacement and the local / TE module classes. The kinds import this lazily, inside
`megatron_spec`, so `import megapuzzle.blocks` stays torch- and Megatron-free; nothing else does.

Same choices as Megatron-core 0.16's heterogeneous layer spec (`heterogeneous_layer_specs.py`), which
these replace: tests/test_layer_specs.py holds the models to bitwise what it built.
"""

from __future__ import annotations

from typing import Any

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.heterogeneous.linear_replacements import ColumnParallelLinearGathered
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from .base import SubblockModules
from .megatron_sp import SequenceParallelTorchNorm, sequence_parallel_gathered

__all__ = ["ModuleSpec", "IdentityOp", "norm_class", "pre_norm", "fused_norm_keys", "residual_add",
           "linear_classes", "linear_replacement", "identity"]


def norm_class(config, use_te: bool):
    """The family's norm as a separate module (also the decoder's final norm): TENorm with
    TransformerEngine; else Apex's FusedLayerNorm for LayerNorm when Apex is there (it has no
    RMSNorm), else torch's (WrappedTorchNorm does both; under sequence parallelism with its weight
    marked for the TP grad sum: megatron_sp.py)."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    if config.normalization == "LayerNorm":
        try:
            import apex  # noqa: F401  (its fused kernels back FusedLayerNorm)
            from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

            return FusedLayerNorm
        except ImportError:
            pass
    return SequenceParallelTorchNorm if config.sequence_parallel else WrappedTorchNorm


def pre_norm(config, use_te: bool):
    """A computing subblock's pre-norm slot: the separate norm in the local spec; IdentityOp with
    TransformerEngine, whose first linear (TELayerNormColumnParallelLinear) holds the norm."""
    return IdentityOp if use_te else norm_class(config, use_te=False)


def fused_norm_keys(use_te: bool, norm_slot: str, fused_into: str) -> dict[str, str]:
    """`sharded_state_dict_keys_map` for the local spec: its separate pre-norm (`norm_slot`,
    e.g. `input_layernorm.`) is saved under the name TE's fused linear (`fused_into`) gives it
    (`<fused_into>layer_norm_weight`), so dist checkpoints move between the two specs."""
    return {} if use_te else {norm_slot: fused_into + "layer_norm_"}


def residual_add():
    """The bias-dropout-add after a computing subblock."""
    return get_bias_dropout_add


def linear_classes(use_te: bool) -> tuple[Any, Any]:
    """(column-parallel first linear with the pre-norm fused under TE, row-parallel last linear)."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear, TERowParallelLinear

        return TELayerNormColumnParallelLinear, TERowParallelLinear
    return ColumnParallelLinear, RowParallelLinear


def linear_replacement(config, use_te: bool, buffer_name: str, norm_slot: str, slot: str) -> SubblockModules:
    """One hidden x hidden column-parallel linear, gathered over TP, after the pre-norm (DeciLM's
    `replace_with_linear`), in the layer's `slot` (`self_attention.` / `mlp.`) after `norm_slot`."""
    if use_te:
        from megatron.core.transformer.heterogeneous.linear_replacements import (
            TELayerNormColumnParallelLinearGathered as Linear,
        )
    else:
        Linear = ColumnParallelLinearGathered
    if config.sequence_parallel:  # Megatron 0.16's SP output path pads the wrong dim (megatron_sp.py)
        Linear = sequence_parallel_gathered(Linear)
    module = ModuleSpec(module=Linear, params={"tp_comm_buffer_name": buffer_name})
    return SubblockModules(pre_norm(config, use_te), module, residual_add(), fused_norm_keys(use_te, norm_slot, slot))


def identity() -> SubblockModules:
    """A subblock that computes nothing: no norm, no module, no residual add."""
    return SubblockModules(IdentityOp, ModuleSpec(module=IdentityOp), IdentityFuncOp)
