"""Architecture -> Megatron-core HeterogeneousTransformerConfig (Llama semantics), plus the
pipeline split, TransformerEngine / FP8 detection and the Llama-3 RoPE frequencies."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import Architecture, ArchitectureError


class ModelConfigError(ValueError):
    """A model cannot be built with these options; the message names the problem in one line."""


@dataclass(frozen=True)
class ModelOptions:
    """How to build the Megatron model for an Architecture (the architecture itself is separate)."""

    params_dtype: torch.dtype = torch.float32
    """Parameter (and pipeline communication) dtype."""
    use_te: bool | None = None
    """TransformerEngine layer spec; None = when TE is importable and CUDA is present."""
    fp8: bool = False
    """FP8 GEMMs via TransformerEngine (needs TE and an sm >= 89 GPU: Ada / Hopper or newer)."""
    fp8_format: str = "hybrid"
    """Megatron `fp8` value: "hybrid" (E4M3 forward, E5M2 gradients) or "e4m3"."""
    perform_initialization: bool = True
    """Randomly initialise parameters; False skips it when weights are loaded right after."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1 and TE or Apex norms)."""
    recompute_granularity: str | None = None
    """Activation recompute: None, "full" or "selective"."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further TransformerConfig fields, passed through unchanged (they win over ours)."""


def te_available() -> bool:
    """TransformerEngine importable (never imported here: its bare meta package breaks imports)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_use_te(use_te: bool | None) -> bool:
    if use_te is None:
        return te_available() and torch.cuda.is_available()
    if use_te and not te_available():
        raise ModelConfigError("use_te=True but transformer_engine is not installed; "
                               "install the [gpu] extra on a CUDA machine or pass use_te=False")
    if use_te and not torch.cuda.is_available():
        raise ModelConfigError("use_te=True needs a CUDA GPU and this machine has none; pass use_te=False")
    return bool(use_te)


def check_fp8(fp8: bool, use_te: bool) -> None:
    """Fail at once, in one line, if FP8 cannot run here."""
    if not fp8:
        return
    if not te_available():
        raise ModelConfigError("fp8=True needs TransformerEngine, which is not installed; "
                               "run on a GPU node with the [gpu] extra or drop fp8")
    if not torch.cuda.is_available():
        raise ModelConfigError("fp8=True needs an sm >= 89 (Ada/Hopper) GPU and this machine has no CUDA; drop fp8")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ModelConfigError(f"fp8=True needs an sm >= 89 (Ada/Hopper) GPU, this one is sm_{major}{minor}; drop fp8")
    if not use_te:
        raise ModelConfigError("fp8=True needs the TransformerEngine layer spec; pass use_te=True (or None)")


def pipeline_split(num_layers: int, pp: int) -> tuple[int | None, int | None]:
    """(num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage) for Megatron.

    (None, None) when layers split evenly. Otherwise the middle stages get floor(L / pp) each
    and the remainder goes to the first and last stages (first gets the larger half), which
    is the only uneven shape Megatron accepts without a custom layout.
    """
    if pp < 1:
        raise ModelConfigError(f"pipeline parallel size must be >= 1, got {pp}")
    if num_layers < pp:
        raise ModelConfigError(f"{num_layers} layers cannot fill {pp} pipeline stages; use pp <= {num_layers}")
    if num_layers % pp == 0:
        return None, None
    m, r = divmod(num_layers, pp)
    return m + (r + 1) // 2, m + r // 2


def stage_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """Global layer indices held by each pipeline stage, matching `pipeline_split`."""
    first, last = pipeline_split(num_layers, pp)
    if first is None:
        m = num_layers // pp
        return [range(s * m, (s + 1) * m) for s in range(pp)]
    if pp == 1:
        return [range(num_layers)]
    m = (num_layers - first - last) // (pp - 2) if pp > 2 else 0
    out, start = [range(0, first)], first
    for _ in range(pp - 2):
        out.append(range(start, start + m))
        start += m
    out.append(range(start, num_layers))
    return out


def rope_kind(arch: Architecture) -> str:
    """"default", "llama3" or "linear"; anything else is rejected with a one-line error."""
    rs = arch.rope_scaling
    if not rs:
        return "default"
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("default", "llama3", "linear"):
        return kind
    raise ModelConfigError(f"rope_scaling type {kind!r} is not supported by the Megatron model; "
                           f"supported: default, llama3, linear")


def llama3_inv_freq(arch: Architecture) -> torch.Tensor:
    """RoPE inverse frequencies exactly as HF computes them for rope_type "llama3" (or plain RoPE).

    Megatron-core's RotaryEmbedding(rope_scaling=True) hard-codes low_freq_factor=1,
    high_freq_factor=4 and original_max_position_embeddings=8192 (the Llama-3.1 values); this
    reads all four parameters from the config, so any Llama-3.x scaling is reproduced.
    """
    d = arch.kv_channels
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if rope_kind(arch) != "llama3":
        return inv
    rs = arch.rope_scaling
    try:
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelConfigError(f"llama3 rope_scaling needs a numeric 'factor' ({e})") from None
    low_wl, high_wl = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
    return torch.where(medium, smoothed, scaled)


_OVERRIDE_CLASS = None


def _layer_override_config_class():
    """HeterogeneousTransformerConfig whose get_config_for_layer also applies the layer's
    `megapuzzle_layer_overrides` (TransformerConfig fields, e.g. window_size)."""
    global _OVERRIDE_CLASS
    if _OVERRIDE_CLASS is None:
        from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

        class LayerOverrideTransformerConfig(HeterogeneousTransformerConfig):
            def get_config_for_layer(self, layer_number: int):
                cfg = super().get_config_for_layer(layer_number)
                for k, v in getattr(self, "megapuzzle_layer_overrides", [{}] * layer_number)[layer_number - 1].items():
                    setattr(cfg, k, v)
                return cfg

        _OVERRIDE_CLASS = LayerOverrideTransformerConfig
    return _OVERRIDE_CLASS


def make_transformer_config(arch: Architecture, tp: int, pp: int, opts: ModelOptions | None = None):
    """The HeterogeneousTransformerConfig for `arch` at TP=`tp`, PP=`pp` (Llama semantics)."""
    from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

    opts = opts or ModelOptions()
    arch.validate_tensor_parallel(tp)
    use_te = resolve_use_te(opts.use_te)
    check_fp8(opts.fp8, use_te)
    rope_kind(arch)  # reject unsupported scaling before building anything
    first, last = pipeline_split(arch.num_layers, pp)
    # The global num_query_groups / ffn_hidden_size only matter for layers without their own
    # value (linear / no-op ones never read them); use a real layer's so validation passes.
    blocks = arch.block_configs(megatron=True)
    kv = next((b["attention"]["num_query_groups"] for b in blocks if b["attention"]["num_query_groups"]),
              arch.num_attention_heads)
    ffn = next((b["ffn"]["ffn_hidden_size"] for b in blocks if b["ffn"]["ffn_hidden_size"]), 4 * arch.hidden_size)
    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=kv,
        ffn_hidden_size=ffn,
        kv_channels=arch.kv_channels,
        heterogeneous_layers_config_encoded_json=json.dumps(arch.to_megatron_json()),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=opts.params_dtype,
        pipeline_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16,
        fp16=opts.params_dtype == torch.float16,
        # the family's computation (Llama: RMSNorm, SwiGLU, no biases, rotate-half RoPE, no dropout)
        **arch.family_spec.transformer_config_kwargs(arch),
        attention_softmax_in_fp32=True,
        # Fused kernels need CUDA/Apex/TE; the unfused paths are exact and run everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not cuda,
        perform_initialization=opts.perform_initialization,
        recompute_granularity=opts.recompute_granularity,
        # The default "full" is deprecated and warns on every per-layer config Megatron derives.
        cuda_graph_scope=[],
    )
    if opts.recompute_granularity == "full":
        kw.update(recompute_method="uniform", recompute_num_layers=1)
    if opts.fp8:
        kw.update(fp8=opts.fp8_format)
    kw.update(opts.extra)
    # what the heterogeneous json cannot carry (a sliding window): each kind's per-layer overrides
    overrides = [{**l.attention.kind_spec.megatron_layer_overrides(arch, l.attention),
                  **l.ffn.kind_spec.megatron_layer_overrides(arch, l.ffn)} for l in arch.layers]
    cls = _layer_override_config_class() if any(overrides) else HeterogeneousTransformerConfig
    try:
        config = cls(**kw)
        if any(overrides):
            config.megapuzzle_layer_overrides = overrides
        return config
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, ArchitectureError):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelConfigError(f"Megatron rejected the model config: {msg}") from e
