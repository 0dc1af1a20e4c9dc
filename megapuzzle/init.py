"""Child initialisation (Puzzle stage 2): a variant's starting weights from the parent's, no training.

Pure torch over the canonical tensors of ONE layer, under layer-local names (the canonical
names without `model.layers.{i}.`: `input_layernorm.weight`, `self_attn.q_proj.weight`, ...,
`post_attention_layernorm.weight`, `mlp.gate_proj.weight`, ...). Rules (arXiv 2411.19146):

* FFN to a smaller intermediate size: keep the channels with the largest contribution
  C_i = mean over tokens of |X_i| * ||W_down[:, i]||_2, X = silu(x W_gate^T) * (x W_up^T),
  x = post_attention_layernorm(residual after the parent's attention) on calibration tokens.
  The kept channels stay in their original order.
* Attention to fewer KV heads: mean-pool the K and V rows of each new group of consecutive
  old KV heads (query head j uses group j // (heads / kv), Megatron's and HF's GQA layout, so
  pooling consecutive groups keeps every query head on the pooled version of its own head).
  Q, O and the norm are kept.
* Linear attention: W = W_o . W_v_expanded, each query head's V rows taken from its KV head;
  it is the attention output when every token attends only to itself.
* Linear FFN: W = W_down . W_up (the gate is dropped).
* No-op: no weights. The parent's own variant: the parent's tensors unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant
from megapuzzle.checkpoints.canonical import layer_prefix, local_layer_tensors, with_layer_prefix  # noqa: F401
from megapuzzle.blocks import registry
from megapuzzle.blocks.base import InitError
# each kind's initialisation math lives in its own file (megapuzzle/blocks); re-exported here
from megapuzzle.blocks.gqa import pool_kv_heads
from megapuzzle.blocks.linear_attention import expand_v, linear_attention
from megapuzzle.blocks.linear_ffn import linear_ffn
from megapuzzle.blocks.mlp import prune_ffn, top_channels

__all__ = ["InitError", "pool_kv_heads", "expand_v", "linear_attention", "linear_ffn", "prune_ffn", "top_channels",
           "init_attention", "init_ffn"]

# every layer-local tensor name any attention / FFN kind holds (megapuzzle.blocks)
ATTN_NAMES = registry.local_names("attention")
FFN_NAMES = registry.local_names("ffn")


# ----------------------------------------------------------------------------- names

def attention_part(local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attention subblock's tensors (incl. its norm) of a layer-local dict."""
    return {k: v for k, v in local.items() if k in ATTN_NAMES}


def ffn_part(local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The FFN subblock's tensors (incl. its norm) of a layer-local dict."""
    return {k: v for k, v in local.items() if k in FFN_NAMES}


# ----------------------------------------------------------------------------- FFN pruning

def ffn_intermediate(local: Mapping[str, torch.Tensor], post_attn_residual: torch.Tensor, eps: float) -> torch.Tensor:
    """X = silu(x W_gate^T) * (x W_up^T), x = post_attention_layernorm(residual); [..., intermediate].

    `post_attn_residual` is the residual stream after the parent's attention (the FFN's input
    before its norm), any leading shape. Computed in fp32."""
    h = post_attn_residual.float()

    def w(name):  # on the activations' device (the teacher's GPU when there is one)
        return local[name].to(device=h.device, dtype=torch.float32)

    x = F.rms_norm(h, (h.shape[-1],), w("post_attention_layernorm.weight"), eps)
    return F.silu(x @ w("mlp.gate_proj.weight").T) * (x @ w("mlp.up_proj.weight").T)


class FFNChannelScorer:
    """Accumulates C_i = mean over tokens of |X_i| * ||W_down[:, i]||_2 over calibration batches."""

    def __init__(self, local: Mapping[str, torch.Tensor], eps: float):
        self.local, self.eps = local, eps
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0

    def update(self, post_attn_residual: torch.Tensor) -> None:
        x = ffn_intermediate(self.local, post_attn_residual, self.eps)
        x = x.reshape(-1, x.shape[-1])
        s = x.abs().sum(dim=0, dtype=torch.float64).cpu()
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.tokens += x.shape[0]

    def scores(self) -> torch.Tensor:
        if self.abs_sum is None:
            raise InitError("no calibration tokens seen; FFN pruning needs calibration_batches >= 1")
        col_norm = self.local["mlp.down_proj.weight"].double().norm(dim=0)
        return (self.abs_sum / self.tokens) * col_norm


def ffn_channel_contributions(local: Mapping[str, torch.Tensor], post_attn_residual: torch.Tensor,
                              eps: float) -> torch.Tensor:
    """C_i for one set of calibration activations ([..., hidden] residual after attention)."""
    s = FFNChannelScorer(local, eps)
    s.update(post_attn_residual)
    return s.scores()


# ----------------------------------------------------------------------------- attention

# ----------------------------------------------------------------------------- dispatch

def init_attention(arch: Architecture, parent: AttentionVariant, variant: AttentionVariant,
                   local: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(layer-local attention tensors, init method name) for `variant` from the parent subblock."""
    if variant == parent:
        return {k: v.clone() for k, v in attention_part(local).items()}, "parent"
    return variant.kind_spec.init_from(arch, parent, variant, local)  # the kind's rule (megapuzzle.blocks)


def init_ffn(parent: FFNVariant, variant: FFNVariant, local: Mapping[str, torch.Tensor],
             scores: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(layer-local FFN tensors, init method name) for `variant`; `scores` (C_i) for pruning."""
    if variant == parent:
        return {k: v.clone() for k, v in ffn_part(local).items()}, "parent"
    return variant.kind_spec.init_from(None, parent, variant, local, scores)  # the kind's rule (megapuzzle.blocks)
