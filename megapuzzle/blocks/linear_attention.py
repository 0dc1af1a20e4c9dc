"""Linear attention (`linear`): input RMSNorm + Linear(hidden, hidden) + residual, the DeciLM
`replace_with_linear` attention (`self_attn.linear_attn.weight`). Initialised as W_o . W_v
(the attention output when every token attends only to itself)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from .base import ATTENTION, LinearReplacement, SubblockModules, WeightEntry, first_present
from .gqa import GQAAttention

if TYPE_CHECKING:
    import torch


class LinearAttention(LinearReplacement):
    subblock = ATTENTION
    tensor_names = ("input_layernorm.weight", "self_attn.linear_attn.weight")

    def engine_problems(self, arch, v):
        return ["linear attention: vLLM"]  # vLLM's nemotron_nas ignores replace_with_linear

    def offered(self, space, parent, own):
        return [self.variant()] if space.attention_linear and own.kind != self.kind else []

    def megatron_spec(self, arch, v, config, use_te: bool) -> SubblockModules:
        from .megatron_modules import linear_replacement

        return linear_replacement(config, use_te, "linear_attn", "input_layernorm.", "self_attention.")

    def weight_entries(self, params, mp, cp, v):
        return [
            WeightEntry(first_present(params, mp + "input_layernorm.weight", mp + "self_attention.layer_norm_weight"),
                        (cp + "input_layernorm.weight",), "rep"),
            WeightEntry(mp + "self_attention.weight", (cp + "self_attn.linear_attn.weight",), "dim0"),
        ]

    def init_from(self, arch, parent_v, v, local, scores=None):
        if isinstance(parent_v.kind_spec, GQAAttention):
            return linear_attention(local, arch.num_attention_heads, parent_v.num_kv_heads,
                                    arch.kv_channels), "wo_wv"
        return super().init_from(arch, parent_v, v, local, scores)


# ----------------------------------------------------------------------------- init math (torch tensors,
# tensor methods only: this module imports no torch)

def expand_v(w_v: torch.Tensor, num_heads: int, num_kv: int, head_dim: int) -> torch.Tensor:
    """[kv*d, h] -> [heads*d, h]: query head j gets the V rows of KV head j // (heads / kv)."""
    h = w_v.shape[1]
    return w_v.reshape(num_kv, head_dim, h).repeat_interleave(num_heads // num_kv, dim=0).reshape(-1, h)


def linear_attention(local: Mapping[str, torch.Tensor], num_heads: int, num_kv: int, head_dim: int
                     ) -> dict[str, torch.Tensor]:
    """W = W_o . W_v_expanded ([h, h]), input_layernorm kept."""
    wv = expand_v(local["self_attn.v_proj.weight"].double(), num_heads, num_kv, head_dim)
    w = local["self_attn.o_proj.weight"].double() @ wv
    return {"input_layernorm.weight": local["input_layernorm.weight"].clone(),
            "self_attn.linear_attn.weight": w.to(local["self_attn.o_proj.weight"].dtype)}
