"""SwiGLU MLP with its own intermediate size (`mlp_{n}`): the parent's FFN, or a pruned one
(the channels with the largest contribution kept, calibration needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from .base import (FFN, FFN_MULT_ROUNDING, ArchitectureError, SizedKind, InitError, SubblockModules, WeightEntry,
                   decilm_ffn, ffn_mult_to_intermediate_size, first_present, intermediate_size_to_ffn_mult, round_up)

if TYPE_CHECKING:
    import torch


class MLP(SizedKind):
    subblock = FFN
    kind = "mlp"
    size_field = "intermediate_size"
    parent_like = True
    block_config_flag = None  # the default: no flag set
    tensor_names = ("post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                    "mlp.down_proj.weight")
    prefix = "mlp_"

    # -- sizes
    def matmul_params(self, arch, v) -> int:
        return 3 * arch.hidden_size * v.intermediate_size  # gate, up, down

    def params(self, arch, v) -> int:
        h = arch.hidden_size
        return 3 * h * v.intermediate_size + h  # gate, up, down, norm

    def canonical_shapes(self, arch, v):
        h, n = arch.hidden_size, v.intermediate_size
        norm, gate, up, down = self.tensor_names
        return {norm: (h,), gate: (n, h), up: (n, h), down: (h, n)}

    def tp_problem(self, arch, v, tp):
        if v.intermediate_size % tp:
            return (f"tensor parallel size {tp} does not divide intermediate_size {v.intermediate_size}; "
                    f"pick a TP size that divides it")
        return None

    def engine_problems(self, arch, v):
        if intermediate_size_to_ffn_mult(v.intermediate_size, arch.hidden_size) is None:
            return [f"intermediate_size {v.intermediate_size} has no ffn_mult "
                    f"(not a multiple of {FFN_MULT_ROUNDING}): TensorRT-LLM and vLLM"]
        return []

    # -- json: ffn_mult when the ecosystem rule reaches the size, else an explicit intermediate_size
    def block_config(self, arch, v):
        mult = intermediate_size_to_ffn_mult(v.intermediate_size, arch.hidden_size)
        if mult is None:  # read by our loaders and Megatron-core, not TRT-LLM/vLLM
            return decilm_ffn(ffn_mult=None, intermediate_size=v.intermediate_size)
        return decilm_ffn(ffn_mult=mult)

    def from_block_config(self, d, where, arch_dims):
        size = d.get("intermediate_size", d.get("ffn_hidden_size"))
        if size is None:
            m = d.get("ffn_mult")
            if not isinstance(m, (int, float)) or m <= 0:
                raise ArchitectureError(f"{where}.ffn_mult must be a positive number for an MLP layer, got {m!r}")
            size = ffn_mult_to_intermediate_size(float(m), arch_dims["hidden_size"])
        return self.variant(int(size))

    # -- search space: fractions / explicit sizes below the parent's, rounded to the granularity
    def offered(self, space, parent, own):
        if own.kind != self.kind:
            return []
        g = space.ffn_granularity
        sizes = {max(g, round_up(int(f * own.intermediate_size), g)) for f in space.ffn_fractions}
        sizes |= set(space.ffn_sizes)
        return [self.variant(s) for s in sorted(sizes, reverse=True) if 0 < s < own.intermediate_size]

    # -- Megatron: MLP (fc1 -> SwiGLU -> fc2); its width comes from the layer's config (ffn_hidden_size,
    # per layer from the heterogeneous json), the activation from the family's (gated_linear_unit)
    def megatron_spec(self, arch, v, config, use_te: bool) -> SubblockModules:
        from megatron.core.transformer.mlp import MLP as MegatronMLP
        from megatron.core.transformer.mlp import MLPSubmodules

        from .megatron_modules import ModuleSpec, fused_norm_keys, linear_classes, pre_norm, residual_add

        fc1, fc2 = linear_classes(use_te)
        mlp = ModuleSpec(module=MegatronMLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))
        return SubblockModules(pre_norm(config, use_te), mlp, residual_add(),
                               fused_norm_keys(use_te, "pre_mlp_layernorm.", "mlp.linear_fc1."))

    # -- Megatron weights: linear_fc1 is [gate; up] per TP shard; local spec: separate norm, TE: fused into fc1
    def weight_entries(self, params, mp, cp, v):
        return [
            WeightEntry(first_present(params, mp + "pre_mlp_layernorm.weight", mp + "mlp.linear_fc1.layer_norm_weight"),
                        (cp + "post_attention_layernorm.weight",), "rep"),
            WeightEntry(mp + "mlp.linear_fc1.weight", (cp + "mlp.gate_proj.weight", cp + "mlp.up_proj.weight"), "fc1"),
            WeightEntry(mp + "mlp.linear_fc2.weight", (cp + "mlp.down_proj.weight",), "dim1"),
        ]

    # -- init: keep the channels with the largest contribution C_i
    def needs_calibration(self, parent_v, v) -> bool:
        return v != parent_v

    def init_from(self, arch, parent_v, v, local, scores=None):
        if not isinstance(parent_v.kind_spec, MLP):
            return super().init_from(arch, parent_v, v, local, scores)
        if v.intermediate_size > parent_v.intermediate_size:
            raise InitError(f"cannot grow the FFN from {parent_v.intermediate_size} to {v.intermediate_size}")
        if scores is None:
            raise InitError(f"{v.name} needs channel contributions (calibration) to prune the parent FFN")
        return prune_ffn(local, top_channels(scores, v.intermediate_size)), "channel_contribution"


# ----------------------------------------------------------------------------- init math (torch tensors,
# tensor methods only: this module imports no torch)

def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending (original order kept). Ties go to the
    lower index (a stable sort), so the choice is deterministic."""
    if not 0 < k <= scores.numel():
        raise InitError(f"cannot keep {k} of {scores.numel()} FFN channels")
    order = scores.sort(descending=True, stable=True).indices[:k]
    return order.sort().values


def prune_ffn(local: Mapping[str, torch.Tensor], channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The FFN subblock keeping only `channels` (rows of gate/up, columns of down); norm kept."""
    return {
        "post_attention_layernorm.weight": local["post_attention_layernorm.weight"].clone(),
        "mlp.gate_proj.weight": local["mlp.gate_proj.weight"][channels].clone(),
        "mlp.up_proj.weight": local["mlp.up_proj.weight"][channels].clone(),
        "mlp.down_proj.weight": local["mlp.down_proj.weight"][:, channels].clone(),
    }
