"""The one architecture type: global dims + per-layer (attention, FFN) variants.

Every stage, file and tool speaks `Architecture`. It converts losslessly to and from
the HF DeciLM (`nemotron-nas`) `config.json` that TensorRT-LLM, vLLM, Megatron-Bridge
and transformers read, and to the `block_configs` json Megatron-core's
`HeterogeneousTransformerConfig` reads.

FFN sizes and `ffn_mult`: the ecosystem derives the intermediate size as
`round_up(int(2 * ffn_mult * hidden / 3), 256)`. A size that no `ffn_mult` maps to
(anything that is not a multiple of 256, e.g. in tiny test models) is written with
`"ffn_mult": null` plus an explicit `"intermediate_size"` (and `ffn_hidden_size` for
Megatron-core). Our loader, our HF modeling file and Megatron-core read it; TensorRT-LLM
and vLLM do not, so `Architecture.engine_compatible()` reports it and export warns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Iterable

from megapuzzle.blocks import registry
from megapuzzle.families import DEFAULT as DEFAULT_FAMILY
from megapuzzle.families import Family, get_family
from megapuzzle.blocks.base import (  # noqa: F401  (re-exported: the public names live here)
    ATTENTION,
    FFN,
    FFN_MULT_ROUNDING,
    ArchitectureError,
    AttentionKind,
    AttentionVariant,
    BlockKind,
    FFNKind,
    FFNVariant,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
    round_up,
)

# ----------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class LayerArch:
    """One transformer layer: an attention subblock then an FFN subblock, each residual."""

    attention: AttentionVariant
    ffn: FFNVariant

    @property
    def name(self) -> str:
        return f"{self.attention.name}+{self.ffn.name}"


def empty_layer() -> LayerArch:
    """A layer that computes nothing: the identity (no-op) kind in both subblocks."""
    return LayerArch(*(next(k for k in registry.kinds(s) if k.identity).variant() for s in (ATTENTION, FFN)))


# ----------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class Architecture:
    """A (possibly heterogeneous) Llama-style decoder: RMSNorm, SwiGLU, RoPE, no biases."""

    vocab_size: int
    """Rows of the embedding and output matrices."""
    hidden_size: int
    """Residual stream width; every variant keeps it."""
    num_attention_heads: int
    """Query heads of every `gqa` layer (reduced-KV variants change only the KV heads)."""
    layers: tuple[LayerArch, ...]
    """Per-layer attention and FFN variants, input to output."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 2048
    """Longest sequence RoPE is set up for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict | None = None
    """HF rope scaling dict (e.g. Llama-3 `{"rope_type": "llama3", "factor": 8, ...}`) or None."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Output layer shares the embedding matrix."""
    bos_token_id: int | None = None
    """Begin-of-sequence id written to HF configs."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence id(s) written to HF configs."""
    family: str = DEFAULT_FAMILY
    """The parent family (megapuzzle.families): tensors outside the layers, HF model types, the
    Megatron config that makes its computation. Only "llama" today."""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for name in ("vocab_size", "hidden_size", "num_attention_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ArchitectureError(f"{name} must be a positive int, got {v!r}")
        if not self.layers:
            raise ArchitectureError("an architecture needs at least one layer")
        get_family(self.family)  # one-line error for an unknown family
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ArchitectureError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly or change the head count")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LayerArch):
                raise ArchitectureError(f"layer {i} is {type(layer).__name__}, expected LayerArch")
            layer.attention.kind_spec.validate_in(self, layer.attention, i)
            layer.ffn.kind_spec.validate_in(self, layer.ffn, i)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ArchitectureError(f"rope_scaling must be a dict or null, got {self.rope_scaling!r}")

    @property
    def family_spec(self) -> Family:
        return get_family(self.family)

    # -- derived sizes
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def with_layers(self, layers: Iterable[LayerArch]) -> "Architecture":
        return replace(self, layers=tuple(layers))

    def with_layer(self, index: int, layer: LayerArch) -> "Architecture":
        layers = list(self.layers)
        layers[index] = layer
        return self.with_layers(layers)

    def attention_params(self, v: AttentionVariant) -> int:
        return v.kind_spec.params(self, v)

    def ffn_params(self, v: FFNVariant) -> int:
        return v.kind_spec.params(self, v)

    def subblock_params(self, v: AttentionVariant | FFNVariant) -> int:
        """Parameters of one subblock variant (its GEMMs and its norm)."""
        return v.kind_spec.params(self, v)

    def layer_params(self, i: int) -> int:
        return self.attention_params(self.layers[i].attention) + self.ffn_params(self.layers[i].ffn)

    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        out = 0 if self.tie_word_embeddings else emb
        return emb + out + self.hidden_size + sum(self.layer_params(i) for i in range(self.num_layers))

    def kv_cache_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """K and V for one token over all layers."""
        return sum(l.attention.kind_spec.kv_elems_per_token(self, l.attention) * bytes_per_elem
                   for l in self.layers)

    def validate_tensor_parallel(self, tp: int) -> None:
        """Raise a one-line error if this architecture cannot be split over `tp` ranks."""
        if tp < 1:
            raise ArchitectureError(f"tensor parallel size must be >= 1, got {tp}")
        if self.num_attention_heads % tp:
            raise ArchitectureError(
                f"tensor parallel size {tp} does not divide num_attention_heads "
                f"{self.num_attention_heads}; pick a TP size that divides it")
        if self.vocab_size % tp:
            raise ArchitectureError(
                f"tensor parallel size {tp} does not divide vocab_size {self.vocab_size}; "
                f"pad the vocabulary to a multiple of {tp} or pick another TP size")
        for i, l in enumerate(self.layers):
            for v in (l.attention, l.ffn):
                problem = v.kind_spec.tp_problem(self, v, tp)
                if problem:
                    raise ArchitectureError(f"layer {i}: {problem}")

    def engine_compatible(self) -> list[str]:
        """Reasons TensorRT-LLM / vLLM cannot load this architecture (empty list: both can).

        TensorRT-LLM reads FFN sizes only through `ffn_mult`; vLLM's nemotron_nas also has no
        linear-replacement subblocks (it ignores `replace_with_linear`)."""
        out = []
        for i, l in enumerate(self.layers):
            found = [p for v in (l.attention, l.ffn) for p in v.kind_spec.engine_problems(self, v)]
            # per layer, what more engines cannot load first ("...: TensorRT-LLM and vLLM" before "...: vLLM")
            found.sort(key=lambda p: -len(p.rsplit(": ", 1)[-1].split(" and ")))
            out += [f"layer {i}: {p}" for p in found]
        return out

    # -- our own json (typed, explicit sizes)
    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "vocab_size", "hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings",
            "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
            "eos_token_id")}
        d["layers"] = [{"attention": l.attention.name, "ffn": l.ffn.name} for l in self.layers]
        if self.family != DEFAULT_FAMILY:  # absent for Llama: arch.json files stay as they were
            d["family"] = self.family
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Architecture":
        d = dict(d)
        try:
            layers = tuple(LayerArch(AttentionVariant.from_name(l["attention"]), FFNVariant.from_name(l["ffn"]))
                           for l in d.pop("layers"))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ArchitectureError):
                raise
            raise ArchitectureError(f"malformed 'layers' in architecture json ({e}); "
                                    f"each layer needs 'attention' and 'ffn' variant names") from None
        known = {f for f in cls.__dataclass_fields__}
        return cls(layers=layers, **{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Architecture":
        return cls.from_dict(json.loads(text))

    # -- HF DeciLM config.json
    def block_configs(self, megatron: bool = False) -> list[dict]:
        """Per-layer DeciLM block configs; `megatron=True` adds explicit `num_query_groups`
        / `ffn_hidden_size`, which Megatron-core's HeterogeneousTransformerConfig prefers."""
        enc = "megatron_block_config" if megatron else "block_config"
        return [{"attention": getattr(l.attention.kind_spec, enc)(self, l.attention),
                 "ffn": getattr(l.ffn.kind_spec, enc)(self, l.ffn)} for l in self.layers]

    def to_hf_config(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        if not self.family_spec.decilm:
            raise ArchitectureError(f"family {self.family} has no HF DeciLM (nemotron-nas) form; "
                                    f"DeciLM represents Llama-family children only")
        cfg: dict[str, Any] = {
            "architectures": ["DeciLMForCausalLM"],
            "model_type": "nemotron-nas",
            "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                         "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_layers,
            "head_dim": self.kv_channels,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
            "block_configs": self.block_configs(),
        }
        return cfg

    def to_megatron_json(self) -> dict[str, Any]:
        """What `HeterogeneousTransformerConfig(heterogeneous_layers_config_encoded_json=...)` reads."""
        d = self.to_hf_config()
        d["block_configs"] = self.block_configs(megatron=True)
        return d

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "Architecture":
        """Read a HF DeciLM (`block_configs`) or plain Llama config dict."""
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            n_layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArchitectureError(f"HF config lacks a valid {e}; a Llama or DeciLM config.json needs "
                                    f"hidden_size, num_attention_heads, num_hidden_layers, vocab_size") from None
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 folds theta + scaling in here
        rope_theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        if "block_configs" in cfg:
            layers = _layers_from_block_configs(cfg["block_configs"], n_layers, hidden, heads)
        else:
            kv = int(cfg.get("num_key_value_heads") or heads)
            inter = int(cfg["intermediate_size"])
            layers = (_llama_layer(kv, inter),) * n_layers
        head_dim = cfg.get("head_dim")
        if head_dim is not None and int(head_dim) == hidden // heads:
            head_dim = None
        return cls(
            vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, layers=layers,
            head_dim=None if head_dim is None else int(head_dim),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        )

    @classmethod
    def homogeneous(cls, *, vocab_size: int, hidden_size: int, num_layers: int, num_attention_heads: int,
                    num_kv_heads: int, intermediate_size: int, **kw) -> "Architecture":
        layer = _llama_layer(num_kv_heads, intermediate_size)
        return cls(vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                   layers=(layer,) * num_layers, **kw)


def _llama_layer(num_kv_heads: int, intermediate_size: int) -> LayerArch:
    """A plain Llama layer: the default (flag-free) attention and FFN kinds of DeciLM."""
    return LayerArch(registry.default(ATTENTION).variant(num_kv_heads),
                     registry.default(FFN).variant(intermediate_size))


def _layers_from_block_configs(blocks: Any, n_layers: int, hidden: int, heads: int) -> tuple[LayerArch, ...]:
    if not isinstance(blocks, list):
        raise ArchitectureError(f"block_configs must be a list of per-layer dicts, got {type(blocks).__name__}")
    if len(blocks) != n_layers:
        raise ArchitectureError(f"block_configs has {len(blocks)} entries but num_hidden_layers is {n_layers}; "
                                f"give exactly one block config per layer")
    layers = []
    dims = {"hidden_size": hidden, "num_attention_heads": heads}
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or "attention" not in b or not ("ffn" in b or "mlp" in b):
            raise ArchitectureError(f"block_configs[{i}] is malformed; each entry needs "
                                    f"'attention' and 'ffn' dicts")
        a, f = b["attention"], b.get("ffn", b.get("mlp"))
        if not isinstance(a, dict) or not isinstance(f, dict):
            raise ArchitectureError(f"block_configs[{i}]: 'attention' and 'ffn' must be dicts")
        layers.append(LayerArch(registry.from_block_config(ATTENTION, a, f"block_configs[{i}].attention", dims),
                                registry.from_block_config(FFN, f, f"block_configs[{i}].ffn", dims)))
    return tuple(layers)


# ----------------------------------------------------------------------------- search space

SEARCH_SPACE_PRESETS: dict[str, dict[str, Any]] = {
    # vLLM's nemotron_nas has no linear subblocks and reads FFN sizes only through ffn_mult
    # (nor sliding windows: it ignores window_length)
    "vllm": {"attention_linear": False, "ffn_linear": False, "ffn_granularity": FFN_MULT_ROUNDING,
             "attention_windows": ()},
}


@dataclass(frozen=True)
class SearchSpace:
    """Which variants each layer may take. Built from a config dict (the `search_space:` YAML block)."""

    kv_heads: tuple[int, ...] = (8, 4, 2, 1)
    """KV-head counts for GQA variants; counts above the parent's or not dividing the query heads
    are dropped per layer."""
    ffn_fractions: tuple[float, ...] = (1.0, 0.875, 0.75, 0.5, 0.25, 0.2, 0.1)
    """Intermediate sizes as fractions of the parent layer's, rounded to `ffn_granularity`."""
    ffn_sizes: tuple[int, ...] = ()
    """Explicit intermediate sizes, in addition to the fractions."""
    ffn_granularity: int = FFN_MULT_ROUNDING
    """Round sizes to multiples of this (256 keeps every size writable as ffn_mult)."""
    attention_linear: bool = True
    """Offer the linear attention replacement."""
    attention_no_op: bool = True
    """Offer removing attention."""
    ffn_linear: bool = True
    """Offer the linear FFN replacement."""
    ffn_no_op: bool = True
    """Offer removing the FFN."""
    fusion_max_run: int = 1
    """Longest run of consecutive layers one MIP candidate may cover (FFN Fusion, megapuzzle.fusion;
    1 = one candidate per layer)."""
    attention_windows: tuple[int, ...] = ()
    """Sliding-window lengths: offer the parent's GQA attending to only this many recent tokens
    (kind `swa`, megapuzzle/blocks/swa.py). Empty: none offered."""

    def __post_init__(self):
        object.__setattr__(self, "kv_heads", tuple(int(k) for k in self.kv_heads))
        object.__setattr__(self, "ffn_fractions", tuple(float(f) for f in self.ffn_fractions))
        object.__setattr__(self, "ffn_sizes", tuple(int(s) for s in self.ffn_sizes))
        if any(k < 1 for k in self.kv_heads):
            raise ArchitectureError(f"search_space.kv_heads must be positive, got {self.kv_heads}")
        if any(not 0 < f <= 1 for f in self.ffn_fractions):
            raise ArchitectureError(f"search_space.ffn_fractions must lie in (0, 1], got {self.ffn_fractions}")
        object.__setattr__(self, "attention_windows", tuple(int(w) for w in self.attention_windows))
        if any(w < 1 for w in self.attention_windows):
            raise ArchitectureError(f"search_space.attention_windows must be positive, got {self.attention_windows}")
        if self.ffn_granularity < 1:
            raise ArchitectureError(f"search_space.ffn_granularity must be >= 1, got {self.ffn_granularity}")
        if not isinstance(self.fusion_max_run, int) or self.fusion_max_run < 1:
            raise ArchitectureError(f"search_space.fusion_max_run must be an integer >= 1, got {self.fusion_max_run!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "SearchSpace":
        """From the `search_space:` YAML block. `preset: NAME` (SEARCH_SPACE_PRESETS) fixes the
        keys that make every child loadable by that engine; the other keys stay free."""
        d = dict(d or {})
        preset = d.pop("preset", None)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ArchitectureError(f"unknown search_space keys {sorted(unknown)}; "
                                    f"known: {sorted(cls.__dataclass_fields__) + ['preset']}")
        if preset is not None:
            if preset not in SEARCH_SPACE_PRESETS:
                raise ArchitectureError(f"unknown search_space.preset {preset!r}; known: {sorted(SEARCH_SPACE_PRESETS)}")
            fixed = SEARCH_SPACE_PRESETS[preset]
            clash = sorted(k for k in fixed if k in d and d[k] != fixed[k])
            if clash:
                raise ArchitectureError(f"search_space.preset {preset} needs {', '.join(f'{k}: {fixed[k]}' for k in clash)}"
                                        f"; remove {', '.join(clash)} or the preset")
            odd = [s for s in d.get("ffn_sizes", ()) if int(s) % FFN_MULT_ROUNDING]
            if odd:
                raise ArchitectureError(f"search_space.preset {preset}: ffn_sizes {odd} are not multiples of "
                                        f"{FFN_MULT_ROUNDING}, so no ffn_mult can express them; round them")
            d = {**d, **fixed}
        return cls(**d)

    def attention_variants(self, parent: Architecture, layer: int) -> list[AttentionVariant]:
        """Variants for one layer's attention, the parent's own first."""
        own = parent.layers[layer].attention
        return [own] + [v for k in registry.kinds(ATTENTION) for v in k.offered(self, parent, own)]

    def ffn_variants(self, parent: Architecture, layer: int) -> list[FFNVariant]:
        """Variants for one layer's FFN, the parent's own first, then smaller MLPs, linear, no-op."""
        own = parent.layers[layer].ffn
        return [own] + [v for k in registry.kinds(FFN) for v in k.offered(self, parent, own)]

    def layer_variants(self, parent: Architecture, layer: int) -> list[LayerArch]:
        """Coupled (attention, FFN) pairs for one layer."""
        return [LayerArch(a, f) for a in self.attention_variants(parent, layer)
                for f in self.ffn_variants(parent, layer)]


def load_architecture(path: str) -> Architecture:
    """Read an architecture from our arch json or a HF (Llama / DeciLM) config.json."""
    try:
        with open(path) as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ArchitectureError(f"{path} is not valid json ({e}); fix or regenerate the file") from None
    return Architecture.from_dict(d) if "layers" in d else Architecture.from_hf_config(d)
