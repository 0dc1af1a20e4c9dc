"""Llama-3.x: RMSNorm, SwiGLU, RoPE (rotate-half, as HF), no biases, no dropout. Every parent today."""

from __future__ import annotations

from typing import Any

from .base import Family


class Llama(Family):
    name = "llama"
    # Model types whose checkpoints are exactly the Llama computation (RMSNorm, SwiGLU, RoPE, no biases).
    # Others (granite's multipliers, qwen2's biases, ...) would load "fine" and compute the wrong thing.
    hf_model_types = ("llama", "nemotron-nas", "deci")
    decilm = True

    def hf_config_problem(self, cfg: dict) -> str | None:
        model_type = cfg.get("model_type", "llama")
        if model_type not in self.hf_model_types:
            return f"has model_type {model_type!r}; megapuzzle reads Llama (or DeciLM / nemotron-nas) checkpoints only"
        if cfg.get("hidden_act", "silu") != "silu":
            return f"has hidden_act {cfg['hidden_act']!r}; only silu (SwiGLU) is supported"
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            return "uses attention/MLP biases, which megapuzzle does not support"
        return None

    def transformer_config_kwargs(self, arch) -> dict[str, Any]:
        import torch.nn.functional as F

        return dict(
            # Llama: RMSNorm, SwiGLU, no biases, RoPE (rotate-half, as HF), no dropout.
            normalization="RMSNorm",
            layernorm_epsilon=arch.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            rotary_interleaved=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
