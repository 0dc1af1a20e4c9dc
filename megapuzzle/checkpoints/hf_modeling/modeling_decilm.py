# Copyright megapuzzle authors. Apache-2.0.
"""DeciLM / `nemotron-nas` model: a Llama decoder whose layers differ from each other.

Shipped next to an exported checkpoint so that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works offline with
transformers 5.x (and is written to stay within the API of 4.45+). Self-contained: imports
only torch and transformers (this file is copied out of the megapuzzle package).

Per layer (configuration_decilm.DeciLMConfig.layer_kind):
  attention  gqa     input_layernorm + self_attn.{q,k,v,o}_proj (per-layer KV heads, RoPE) + residual
             linear  input_layernorm + self_attn.linear_attn (hidden -> hidden) + residual
             no_op   nothing at all, not even the norm
  ffn        mlp     post_attention_layernorm + SwiGLU mlp.{gate,up,down}_proj + residual
             linear  post_attention_layernorm + mlp.linear_mlp (hidden -> hidden) + residual
             no_op   nothing at all

KV cache: only GQA layers hold one, so the cache is indexed by the layer's rank among the GQA
layers ("slot"), not by its layer number. That keeps `cache.get_seq_length()` (slot 0) right
whatever layer 0 is, and works with any transformers Cache (DynamicCache with or without a
config) because slots are filled densely from 0.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_decilm import DeciLMConfig

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5.2x renamed the cache argument and output field `past_key_values` -> `cache`
# (generate() passes `cache=` and reads `outputs["cache"]`); older releases use the old name.
_CACHE_FIELD = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


# ----------------------------------------------------------------------------- building blocks

class DeciLMRMSNorm(nn.Module):
    """Llama's RMSNorm: normalize in fp32, cast back, then scale (same op order as HF Llama)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: DeciLMConfig, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scale for the config's RoPE (default, linear, llama3 here;
    other types are delegated to transformers' own rope functions when they exist)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if not params and isinstance(getattr(config, "rope_scaling", None), dict):
        scaling = dict(config.rope_scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    dim = config.head_dim
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "llama3":  # Llama-3.1 frequency-dependent interpolation, as in transformers
        factor, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
        lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < hi_wavelen) * ~(wavelen > lo_wavelen)
        return torch.where(medium, smoothed, out), 1.0
    try:  # yarn, longrope, ...: the installed transformers knows them (static part only)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, scale = ROPE_INIT_FUNCTIONS[kind](config, device)
        return inv.float(), float(scale)
    except Exception as e:  # noqa: BLE001 - any failure means: this rope type is not available here
        raise ValueError(f"rope type {kind!r} is not supported by this modeling file or the installed "
                         f"transformers ({e}); use default, linear or llama3") from None


class DeciLMRotary(nn.Module):
    """cos/sin for positions. Holds no buffers (computed lazily per device), so meta-device
    initialisation and state dicts never see it."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.config = config
        self._cache: dict = {}

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(x.device)
        if key not in self._cache:
            self._cache[key] = rope_inv_freq(self.config, x.device)
        inv, scale = self._cache[key]
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv.to(x.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's own number of KV heads."""

    def __init__(self, config: DeciLMConfig, num_kv_heads: int, cache_slot: int, window: int | None = None):
        super().__init__()
        h, d, nq = config.hidden_size, config.head_dim, config.num_attention_heads
        self.head_dim, self.num_heads, self.num_kv_heads = d, nq, num_kv_heads
        self.window = window  # sliding window (block_configs' window_length), None: full attention
        self.cache_slot = cache_slot
        self.scaling = d ** -0.5
        self.q_proj = nn.Linear(h, nq * d, bias=False)
        self.k_proj = nn.Linear(h, num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(nq * d, h, bias=False)

    def forward(self, x, cos, sin, mask, is_causal: bool, cache: Cache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.cache_slot)
        if self.window is not None:
            mask, is_causal = window_mask(mask, t, k.shape[2], self.window, q.dtype, q.device), False
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # each KV head serves `rep` consecutive query heads (HF's repeat_kv order)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DeciLMLinearAttention(nn.Module):
    """Attention replaced by one hidden -> hidden matrix (Puzzle's "linear" attention variant)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, *unused):
        return self.linear_attn(x)


class DeciLMMLP(nn.Module):
    def __init__(self, config: DeciLMConfig, intermediate_size: int):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = nn.Linear(h, intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_slot: int | None):
        super().__init__()
        self.attn_kind, self.ffn_kind = config.layer_kind(layer_idx)
        if self.attn_kind != "no_op":
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = (DeciLMAttention(config, config.layer_num_kv_heads(layer_idx), cache_slot,
                                              config.layer_window(layer_idx))
                              if self.attn_kind == "gqa" else DeciLMLinearAttention(config))
        if self.ffn_kind != "no_op":
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = (DeciLMMLP(config, config.layer_intermediate_size(layer_idx))
                        if self.ffn_kind == "mlp" else DeciLMLinearMLP(config))

    def forward(self, x, cos, sin, mask, is_causal, cache):
        if self.attn_kind != "no_op":
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        if self.ffn_kind != "no_op":
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


def window_mask(mask, q_len: int, kv_len: int, window: int, dtype, device):
    """`mask` (additive [b, 1, q, kv] or None: plain causal) further limited to a sliding window:
    the query at position p sees keys p - window + 1 .. p."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos) & (k_pos > q_pos - window)
    if mask is None:
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)[None, None]
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min if mask.dtype.is_floating_point else False)


def build_attention_mask(attention_mask, batch: int, q_len: int, past: int, dtype, device):
    """(additive mask or None, is_causal) for SDPA. Explicit masks only when needed: with
    padding, or when new tokens attend to a cache. Keys are visible when causal and not padding;
    masked scores get dtype-min (not -inf) so fully padded rows stay finite, never NaN."""
    kv_len = past + q_len
    pad = None
    if attention_mask is not None:
        if attention_mask.dim() == 4:  # a ready-made HF 4D mask (bool or additive): trust it
            return attention_mask.to(device), False
        am = attention_mask[:, -kv_len:].to(device)
        if am.shape[-1] != kv_len:
            raise ValueError(f"attention_mask covers {am.shape[-1]} positions but the cache plus input have "
                             f"{kv_len}; pass the mask for the whole sequence so far")
        if not bool(am.all()):
            pad = am.bool()
    if pad is None and q_len == 1:
        return None, False
    if pad is None and past == 0:
        return None, True
    q_pos = torch.arange(past, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, kv_len)
    if pad is not None:
        allowed = allowed & pad[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min), False


# ----------------------------------------------------------------------------- models

class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_cache_class = True  # transformers 4.x: let generate() build a DynamicCache
    _supports_static_cache = False  # slots are dense over GQA layers; StaticCache sizes by layer count
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flash_attn_2 = False


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers, slot = [], 0
        for i in range(config.num_hidden_layers):
            is_gqa = config.layer_kind(i)[0] == "gqa"
            layers.append(DeciLMDecoderLayer(config, i, slot if is_gqa else None))
            slot += is_gqa
        self.num_cache_slots = slot
        self.layers = nn.ModuleList(layers)
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeciLMRotary(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None, cache=None,
                **kwargs):
        past_key_values = cache if cache is not None else past_key_values  # either spelling (see _CACHE_FIELD)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (getattr(self.config, "output_hidden_states", False)
                                if output_hidden_states is None else output_hidden_states)
        cache = past_key_values if use_cache or past_key_values is not None else None
        if isinstance(cache, (tuple, list)):
            if not hasattr(DynamicCache, "from_legacy_cache"):
                raise ValueError("past_key_values must be a transformers Cache (e.g. DynamicCache), not a tuple")
            cache = DynamicCache.from_legacy_cache(cache)
        if use_cache and cache is None:
            cache = DynamicCache()
        b, t = inputs_embeds.shape[:2]
        # No GQA layer means nothing is ever cached: every call sees the whole sequence.
        past = cache.get_seq_length(0) if cache is not None and self.num_cache_slots else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=inputs_embeds.device)[None].expand(b, t)
        mask, is_causal = None, False
        if self.num_cache_slots:
            mask, is_causal = build_attention_mask(attention_mask, b, t, past, inputs_embeds.dtype,
                                                   inputs_embeds.device)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids.to(inputs_embeds.device))
        x, all_hidden = inputs_embeds, []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(x)
            x = layer(x, cos, sin, mask, is_causal, cache)
        x = self.norm(x)
        if output_hidden_states:
            all_hidden.append(x)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=tuple(all_hidden) if output_hidden_states else None,
                                       **{_CACHE_FIELD: cache if use_cache else None})


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    # transformers 5 maps tied parameter -> source; 4.x lists the tied parameter names.
    _tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5
                          else ["lm_head.weight"])

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep: int = 0, cache=None, **kwargs):
        logits_to_keep = kwargs.pop("num_logits_to_keep", None) or logits_to_keep  # 4.45 spelling
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states)
        new_cache = getattr(out, _CACHE_FIELD)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            n_items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100,
                                   reduction="sum" if n_items is not None else "mean")
            if n_items is not None:
                loss = loss / n_items
        if return_dict is False:
            return tuple(v for v in (loss, logits, new_cache, out.hidden_states) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{_CACHE_FIELD: new_cache})


def _base_prepare_is_stub() -> bool:
    """transformers < 4.46 has no generic prepare_inputs_for_generation (the base one raises)."""
    try:
        return "NotImplementedError" in inspect.getsource(GenerationMixin.prepare_inputs_for_generation)
    except (OSError, TypeError, AttributeError):
        return False


def _prepare_inputs_for_generation_4x(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, cache_position=None, position_ids=None,
                                      use_cache=True, **kwargs):
    """The 4.45-era input preparation: feed only the tokens the cache has not seen."""
    if past_key_values is not None and cache_position is not None and input_ids.shape[1] != cache_position.shape[0]:
        input_ids = input_ids[:, cache_position]
    if attention_mask is not None and position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    first = cache_position is None or int(cache_position[0]) == 0
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None and first else {"input_ids": input_ids}
    inputs.update(position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                  attention_mask=attention_mask)
    return inputs


if _base_prepare_is_stub():
    DeciLMForCausalLM.prepare_inputs_for_generation = _prepare_inputs_for_generation_4x


__all__ = ["DeciLMForCausalLM", "DeciLMModel", "DeciLMPreTrainedModel"]
