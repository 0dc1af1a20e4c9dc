"""Linear FFN (`linear`): post-attention RMSNorm + Linear(hidden, hidden) + residual, the DeciLM
`replace_with_linear` FFN (`mlp.linear_mlp.weight`). Initialised as W_down . W_up (gate dropped)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from .base import FFN, LinearReplacement, SubblockModules, WeightEntry, first_present
from .mlp import MLP

if TYPE_CHECKING:
    import torch


class LinearFFN(LinearReplacement):
    subblock = FFN
    tensor_names = ("post_attention_layernorm.weight", "mlp.linear_mlp.weight")

    def engine_problems(self, arch, v):
        return ["linear FFN: vLLM"]  # vLLM's nemotron_nas ignores replace_with_linear

    def offered(self, space, parent, own):
        return [self.variant()] if space.ffn_linear and own.kind != self.kind else []

    def megatron_spec(self, arch, v, config, use_te: bool) -> SubblockModules:
        from .megatron_modules import linear_replacement

        return linear_replacement(config, use_te, "linear_mlp", "pre_mlp_layernorm.", "mlp.")

    def weight_entries(self, params, mp, cp, v):
        return [
            WeightEntry(first_present(params, mp + "pre_mlp_layernorm.weight", mp + "mlp.layer_norm_weight"),
                        (cp + "post_attention_layernorm.weight",), "rep"),
            WeightEntry(mp + "mlp.weight", (cp + "mlp.linear_mlp.weight",), "dim0"),
        ]

    def init_from(self, arch, parent_v, v, local, scores=None):
        if isinstance(parent_v.kind_spec, MLP):
            return linear_ffn(local), "wdown_wup"
        return super().init_from(arch, parent_v, v, local, scores)


# ----------------------------------------------------------------------------- init math (torch tensors,
# tensor methods only: this module imports no torch)

def linear_ffn(local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W = W_down . W_up (gate ignored), post_attention_layernorm kept."""
    w = local["mlp.down_proj.weight"].double() @ local["mlp.up_proj.weight"].double()
    return {"post_attention_layernorm.weight": local["post_attention_layernorm.weight"].clone(),
            "mlp.linear_mlp.weight": w.to(local["mlp.down_proj.weight"].dtype)}
