"""Grouped-query attention with its own KV-head count (`gqa_kv{n}`): the parent's attention, or
a reduced-KV version of it (K and V mean-pooled within each new group)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from .base import (ATTENTION, ArchitectureError, SizedKind, InitError, SubblockModules, WeightEntry, decilm_attention,
                   first_present)

if TYPE_CHECKING:
    import torch


class GQAAttention(SizedKind):
    subblock = ATTENTION
    kind = "gqa"
    size_field = "num_kv_heads"
    parent_like = True
    block_config_flag = None  # the default: no flag set
    tensor_names = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                    "self_attn.v_proj.weight", "self_attn.o_proj.weight")
    prefix = "gqa_kv"

    def validate_in(self, arch, v, layer: int) -> None:
        if arch.num_attention_heads % v.num_kv_heads:
            raise ArchitectureError(
                f"layer {layer}: num_kv_heads {v.num_kv_heads} does not divide num_attention_heads "
                f"{arch.num_attention_heads}; use a divisor of it")

    # -- sizes
    def matmul_params(self, arch, v) -> int:
        h, d, nq = arch.hidden_size, arch.kv_channels, arch.num_attention_heads
        return 2 * h * nq * d + 2 * h * v.num_kv_heads * d  # q, o + k, v

    def params(self, arch, v) -> int:
        h, d, nq = arch.hidden_size, arch.kv_channels, arch.num_attention_heads
        return h * nq * d + 2 * h * v.num_kv_heads * d + nq * d * h + h  # q, k, v, o, norm

    def kv_elems_per_token(self, arch, v) -> int:
        return 2 * v.num_kv_heads * arch.kv_channels

    def canonical_shapes(self, arch, v) -> dict[str, tuple[int, ...]]:
        h, d, nq, kv = arch.hidden_size, arch.kv_channels, arch.num_attention_heads, v.num_kv_heads
        norm, q, k, vv, o = self.tensor_names
        return {norm: (h,), q: (nq * d, h), k: (kv * d, h), vv: (kv * d, h), o: (h, nq * d)}

    def tp_problem(self, arch, v, tp: int) -> str | None:
        if v.num_kv_heads % tp:
            return (f"tensor parallel size {tp} does not divide num_kv_heads {v.num_kv_heads}; "
                    f"pick a TP size that divides every layer's KV heads")
        return None

    # -- json
    def block_config(self, arch, v) -> dict:
        return decilm_attention(n_heads_in_group=arch.num_attention_heads // v.num_kv_heads)

    def from_block_config(self, d, where, arch_dims):
        return self.variant(self.kv_heads_from_block_config(d, where, arch_dims))

    def kv_heads_from_block_config(self, d, where, arch_dims) -> int:
        """KV heads from Megatron's `num_query_groups` or DeciLM's `n_heads_in_group`."""
        kv = d.get("num_query_groups")
        if kv is None:
            heads = arch_dims["num_attention_heads"]
            g = d.get("n_heads_in_group")
            if not isinstance(g, int) or g < 1:
                raise ArchitectureError(f"{where}.n_heads_in_group must be a positive int for a GQA layer, got {g!r}")
            if heads % g:
                raise ArchitectureError(f"{where.rsplit('.', 1)[0]}: n_heads_in_group {g} does not divide "
                                        f"num_attention_heads {heads}; use a divisor of it")
            kv = heads // g
        return int(kv)

    # -- search space: fewer KV heads than the parent's (divisors of the query heads)
    def offered(self, space, parent, own) -> list:
        if own.kind != self.kind:
            return []
        return [self.variant(k) for k in sorted(set(space.kv_heads), reverse=True)
                if k < own.num_kv_heads and parent.num_attention_heads % k == 0]

    # -- roofline: causal QK^T + AV and the KV cache traffic
    def extra_work(self, arch, v, phase, batch, seq, kv_bytes):
        d, nq = arch.kv_channels, arch.num_attention_heads
        kv_row = 2 * v.num_kv_heads * d * kv_bytes  # K and V of one token
        if phase == "prefill":
            return 4.0 * batch * nq * d * seq * (seq + 1) / 2, batch * seq * kv_row  # cache written
        # the new query against s cached keys + its own; s cached tokens read, the new one written
        return 4.0 * batch * nq * d * (seq + 1), batch * (seq + 1) * kv_row

    # -- Megatron: causal SelfAttention (fused qkv, core attention, output projection); its KV groups
    # come from the layer's config (num_query_groups, per layer from the heterogeneous json)
    def megatron_spec(self, arch, v, config, use_te: bool) -> SubblockModules:
        from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
        from megatron.core.transformer.enums import AttnMaskType

        from .megatron_modules import IdentityOp, ModuleSpec, fused_norm_keys, linear_classes, pre_norm, residual_add

        qkv, proj = linear_classes(use_te)
        qk_norm = qk_layernorm_class(config, use_te) if config.qk_layernorm else IdentityOp
        attn = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                          submodules=SelfAttentionSubmodules(
                              linear_qkv=qkv, core_attention=core_attention_class(use_te), linear_proj=proj,
                              q_layernorm=qk_norm, k_layernorm=qk_norm))
        return SubblockModules(pre_norm(config, use_te), attn, residual_add(),
                               fused_norm_keys(use_te, "input_layernorm.", "self_attention.linear_qkv."))

    # -- Megatron weights: linear_qkv fuses q/k/v per KV group; local spec: separate norm, TE: fused into qkv
    def weight_entries(self, params, mp, cp, v):
        return [
            WeightEntry(first_present(params, mp + "input_layernorm.weight",
                                      mp + "self_attention.linear_qkv.layer_norm_weight"),
                        (cp + "input_layernorm.weight",), "rep"),
            WeightEntry(mp + "self_attention.linear_qkv.weight",
                        tuple(cp + f"self_attn.{x}_proj.weight" for x in "qkv"), "qkv", v.num_kv_heads),
            WeightEntry(mp + "self_attention.linear_proj.weight", (cp + "self_attn.o_proj.weight",), "dim1"),
        ]

    # -- init: mean-pool K and V within each new group
    def init_from(self, arch, parent_v, v, local, scores=None):
        if parent_v.kind == self.kind:
            return pool_kv_heads(local, parent_v.num_kv_heads, v.num_kv_heads, arch.kv_channels), "kv_mean_pool"
        return super().init_from(arch, parent_v, v, local, scores)


def core_attention_class(use_te: bool):
    """Megatron's softmax attention: TransformerEngine's fused kernels, or the local unfused one."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def qk_layernorm_class(config, use_te: bool):
    """The Q / K norm of a family with qk_layernorm (Llama has none): TENorm from TE 1.9 on (before,
    it hurt convergence there), else the local norm."""
    from .megatron_modules import norm_class

    if use_te:
        from megatron.core.utils import is_te_min_version

        if is_te_min_version("1.9.0"):
            return norm_class(config, use_te=True)
    return norm_class(config, use_te=False)


# ----------------------------------------------------------------------------- init math (torch tensors,
# tensor methods only: this module imports no torch)

def pool_kv_heads(local: Mapping[str, torch.Tensor], old_kv: int, new_kv: int, head_dim: int
                  ) -> dict[str, torch.Tensor]:
    """Mean-pool K and V over each group of old_kv // new_kv consecutive KV heads."""
    if new_kv > old_kv or old_kv % new_kv:
        raise InitError(f"cannot pool {old_kv} KV heads into {new_kv}; the new count must divide the old")
    r = old_kv // new_kv
    out = {k: local[k].clone() for k in ("input_layernorm.weight", "self_attn.q_proj.weight",
                                         "self_attn.o_proj.weight")}
    for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        w = local[name]
        h = w.shape[1]
        out[name] = w.double().reshape(new_kv, r, head_dim, h).mean(dim=1).reshape(new_kv * head_dim, h).to(w.dtype)
    return {k: out[k] for k in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                "self_attn.v_proj.weight", "self_attn.o_proj.weight")}
