# Copyright megapuzzle authors. Apache-2.0.
"""DeciLM / `nemotron-nas` configuration for heterogeneous Llama-style decoders.

Shipped next to an exported checkpoint so that
`AutoConfig.from_pretrained(DIR, trust_remote_code=True)` works offline. Self-contained:
imports only transformers (this file is copied out of the megapuzzle package).

`block_configs` holds one entry per layer:
    {"attention": {"n_heads_in_group": int|null, "no_op": bool, "replace_with_linear": bool},
     "ffn": {"ffn_mult": float|null, "no_op": bool, "replace_with_linear": bool}}
A GQA layer has num_attention_heads // n_heads_in_group KV heads; an MLP layer has
round_up(int(2 * ffn_mult * hidden / 3), 256) channels, or `intermediate_size` when the ffn
dict gives one (sizes that are not multiples of 256 cannot be written as ffn_mult).
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

FFN_MULT_ROUNDING = 256  # the rounding TRT-LLM, vLLM, Megatron-core and DeciLM apply to ffn_mult
# Fields of NVIDIA's DeciLM block configs that change the computation in ways this file does not implement.
UNSUPPORTED_BLOCK_KEYS = ("num_sink_tokens", "unshifted_sink", "sparsify")


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % FFN_MULT_ROUNDING == 0 else n + FFN_MULT_ROUNDING - n % FFN_MULT_ROUNDING


class BlockPart(dict):
    """A plain dict (json, and TensorRT-LLM's dict path, see plain json) that also allows attribute reads:
    vLLM and TensorRT-LLM's PyTorch backend read `config.block_configs[i].attention.no_op`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _as_dict(obj) -> dict:
    if isinstance(obj, dict):
        return dict(obj)
    if dataclasses.is_dataclass(obj):  # NVIDIA's BlockConfig dataclasses
        return dataclasses.asdict(obj)
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    raise ValueError(f"block config entry {obj!r} is neither a dict nor an object with attributes")


def normalize_block_config(entry, index: int, num_attention_heads: int) -> BlockPart:
    """Validate one layer's block config and return it as attribute-readable dicts."""
    entry = _as_dict(entry)
    attn = _as_dict(entry.get("attention", {}))
    ffn = _as_dict(entry.get("ffn", entry.get("mlp", {})))
    for name, part in (("attention", attn), ("ffn", ffn)):
        part.setdefault("no_op", False)
        part.setdefault("replace_with_linear", False)
        if part["no_op"] and part["replace_with_linear"]:
            raise ValueError(f"block_configs[{index}].{name} is both no_op and replace_with_linear; pick one")
    unsupported = [f"{name}.{key}" for name, part in (("attention", attn), ("ffn", ffn))
                   for key in UNSUPPORTED_BLOCK_KEYS if part.get(key)]
    if unsupported:  # computing them as plain attention / MLP would silently give a different model
        raise ValueError(f"block_configs[{index}] sets {unsupported[0]}; sink and sparsified "
                         f"blocks are not supported by this modeling file")
    w = attn.get("window_length")
    if w is not None and (not isinstance(w, int) or w < 1 or attn["no_op"] or attn["replace_with_linear"]):
        raise ValueError(f"block_configs[{index}].attention.window_length must be a positive int on a GQA "
                         f"layer, got {w!r}")
    if not (attn["no_op"] or attn["replace_with_linear"]):
        if attn.get("num_query_groups") is None:
            g = attn.get("n_heads_in_group")
            if not isinstance(g, int) or g < 1 or num_attention_heads % g:
                raise ValueError(f"block_configs[{index}].attention.n_heads_in_group must be a positive divisor "
                                 f"of num_attention_heads {num_attention_heads}, got {g!r}")
    if not (ffn["no_op"] or ffn["replace_with_linear"]):
        if ffn.get("intermediate_size") is None and ffn.get("ffn_hidden_size") is None:
            m = ffn.get("ffn_mult")
            if not isinstance(m, (int, float)) or m <= 0:
                raise ValueError(f"block_configs[{index}].ffn needs a positive ffn_mult or an explicit "
                                 f"intermediate_size, got ffn_mult={m!r}")
        elif ffn.get("ffn_mult") is None:
            # vLLM takes `ffn_mult` whenever the attribute exists (even when null) and reads
            # `intermediate_size` only when it does not: drop the null so an explicit size survives.
            ffn.pop("ffn_mult", None)
    out = BlockPart(entry)
    out["attention"], out["ffn"] = BlockPart(attn), BlockPart(ffn)
    out.pop("mlp", None)
    return out


def _normalize_rope(rope_theta, rope_scaling, rope_parameters) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from legacy `rope_theta`/`rope_scaling` or transformers-5 `rope_parameters`."""
    theta = rope_theta
    scaling = dict(rope_scaling) if isinstance(rope_scaling, dict) else None
    if isinstance(rope_parameters, dict):
        params = dict(rope_parameters)
        theta = params.pop("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if scaling is not None:
        scaling.pop("rope_theta", None)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        else:
            scaling["rope_type"] = kind  # transformers >= 4.45 spell it rope_type; old configs wrote type
    return float(theta if theta is not None else 10000.0), scaling


class DeciLMConfig(PretrainedConfig):
    """Llama-style config plus per-layer `block_configs` (the DeciLM / Nemotron-NAS format)."""

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        intermediate_size=11008,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=None,
        rope_scaling=None,
        rope_parameters=None,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        block_configs=None,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported by this modeling file; only silu (SwiGLU)")
        if attention_bias or mlp_bias:
            raise ValueError("attention_bias / mlp_bias are not supported by this modeling file")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = False
        self.mlp_bias = False
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.pretraining_tp = 1

        if block_configs is None:  # homogeneous Llama: the parent written as a DeciLM config
            kv = num_key_value_heads or num_attention_heads
            block_configs = [{"attention": {"n_heads_in_group": num_attention_heads // kv},
                              "ffn": {"ffn_mult": None, "intermediate_size": intermediate_size}}
                             for _ in range(num_hidden_layers)]
        if len(block_configs) != num_hidden_layers:
            raise ValueError(f"block_configs has {len(block_configs)} entries but num_hidden_layers is "
                             f"{num_hidden_layers}; give exactly one block config per layer")
        self.block_configs = [normalize_block_config(b, i, num_attention_heads) for i, b in enumerate(block_configs)]
        # Llama-style scalars that TensorRT-LLM's DeciConfig.from_hugging_face reads as fallbacks.
        kv_heads = [self.layer_num_kv_heads(i) for i in range(num_hidden_layers)]
        sizes = [self.layer_intermediate_size(i) for i in range(num_hidden_layers)]
        self.num_key_value_heads = next((k for k in kv_heads if k), num_key_value_heads or num_attention_heads)
        self.intermediate_size = max([s for s in sizes if s] or [intermediate_size])

        theta, scaling = _normalize_rope(rope_theta, rope_scaling, rope_parameters)
        if scaling is not None and scaling.get("rope_type") in ("llama3", "yarn", "longrope"):
            scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
        self.rope_theta = theta
        # transformers 5 keeps theta + scaling in `rope_parameters` (and makes `rope_scaling` a
        # deprecated alias of it); 4.x reads `rope_theta` + `rope_scaling`. Set what each expects.
        self.rope_parameters = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
        if not isinstance(getattr(type(self), "rope_scaling", None), property):
            self.rope_scaling = scaling

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Some transformers versions swallow the token ids / tying flag into other places; pin them.
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id

    # -- per-layer shapes, the one place the modeling file reads block_configs from
    def layer_kind(self, i: int) -> tuple[str, str]:
        """('gqa' | 'linear' | 'no_op', 'mlp' | 'linear' | 'no_op') for layer i."""
        a, f = self.block_configs[i]["attention"], self.block_configs[i]["ffn"]
        attn = "no_op" if a["no_op"] else "linear" if a["replace_with_linear"] else "gqa"
        ffn = "no_op" if f["no_op"] else "linear" if f["replace_with_linear"] else "mlp"
        return attn, ffn

    def layer_num_kv_heads(self, i: int) -> int | None:
        a = self.block_configs[i]["attention"]
        if self.layer_kind(i)[0] != "gqa":
            return None
        if a.get("num_query_groups") is not None:  # Megatron-core's explicit spelling
            return int(a["num_query_groups"])
        return self.num_attention_heads // int(a["n_heads_in_group"])

    def layer_window(self, i: int) -> int | None:
        """Sliding-window length of layer i's attention (each query sees this many most recent
        tokens, itself included), None for full attention."""
        w = self.block_configs[i]["attention"].get("window_length")
        return int(w) if w else None

    def layer_intermediate_size(self, i: int) -> int | None:
        f = self.block_configs[i]["ffn"]
        if self.layer_kind(i)[1] != "mlp":
            return None
        for key in ("intermediate_size", "ffn_hidden_size"):
            if f.get(key) is not None:
                return int(f[key])
        return ffn_mult_to_intermediate_size(float(f["ffn_mult"]), self.hidden_size)

    def to_dict(self):
        out = super().to_dict()
        # BlockPart is a dict subclass: hand json plain dicts so the file reads like any DeciLM config.
        out["block_configs"] = [{k: (dict(v) if isinstance(v, dict) else v) for k, v in b.items()}
                                for b in self.block_configs]
        return out


__all__ = ["DeciLMConfig", "ffn_mult_to_intermediate_size"]
