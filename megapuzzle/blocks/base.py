"""The interface every subblock kind implements (one class per kind, one file per class).

A *kind* is one way to compute a subblock (attention or FFN) of a layer: `gqa`, `linear`,
`no_op` attention; `mlp`, `linear`, `no_op` FFN. Its class owns everything that depends on
the kind: the variant's name and validation, its parameter count, its canonical tensors, its
HF DeciLM `block_configs` entry (both ways) and Megatron-core's, the search space it offers,
its roofline work and KV-cache bytes, its Megatron-core modules (`megatron_spec`), its Megatron
weight mapping (with TP slicing) and its initialisation from the parent. Code outside
`megapuzzle/blocks/` asks the kind (`megapuzzle.blocks.registry.kind_of(variant)`, or the
variant's own delegating methods) and never compares kind names.

This module and the kinds' name / size / json parts import no torch (`import megapuzzle.arch`
stays torch-free); the torch parts (`init_from`) and Megatron's (`megatron_spec`) import lazily.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

ATTENTION, FFN = "attention", "ffn"
SUBBLOCKS = (ATTENTION, FFN)

FFN_MULT_ROUNDING = 256  # the rule TRT-LLM, vLLM and Megatron-core apply to ffn_mult

# The variant fields that carry a kind's size, per subblock (AttentionVariant / FFNVariant).
# The first is the one every kind of the subblock had before a second existed: it is always in the repr.
SIZE_FIELDS = {ATTENTION: ("num_kv_heads", "window"), FFN: ("intermediate_size",)}


def round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The ecosystem's rule (TRT-LLM, vLLM, Megatron-core, DeciLM)."""
    return round_up(int(2 * ffn_mult * hidden_size / 3), FFN_MULT_ROUNDING)


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> float | None:
    """The shortest `ffn_mult` that maps back to exactly this size, or None if none does."""
    if intermediate_size % FFN_MULT_ROUNDING:
        return None
    exact = 3 * intermediate_size / (2 * hidden_size)
    for digits in range(1, 12):
        cand = round(exact, digits)
        if ffn_mult_to_intermediate_size(cand, hidden_size) == intermediate_size:
            return cand
    # int() truncation can land one below a multiple of 256 for the exact ratio; nudge up.
    cand = math.nextafter(exact, math.inf)
    return cand if ffn_mult_to_intermediate_size(cand, hidden_size) == intermediate_size else None


class ArchitectureError(ValueError):
    """A malformed architecture; the message names the problem and the fix in one line."""


class InitError(ValueError):
    """A variant cannot be initialised from this parent subblock; one line says why."""


class WeightsError(ValueError):
    """Canonical tensors do not fit the architecture / model; the message says which and how."""


@dataclass(frozen=True)
class WeightEntry:
    """One Megatron parameter and the canonical tensor(s) it is made of."""

    param: str
    """Megatron parameter name (in unwrap_model(model).named_parameters())."""
    names: tuple[str, ...]
    """Canonical names it is built from."""
    kind: str
    """TP layout: rep (replicated), dim0 / dim1 (TP split along that dim), qkv, fc1."""
    num_kv: int = 0
    """KV heads (qkv only)."""


@dataclass(frozen=True)
class SubblockModules:
    """What a kind builds in Megatron-core's TransformerLayer for its subblock
    (`BlockKind.megatron_spec`): its part of `TransformerLayerSubmodules`."""

    norm: Any
    """The pre-norm slot (`input_layernorm` / `pre_mlp_layernorm`): a norm class in the local spec;
    IdentityOp under TransformerEngine (the module's first linear holds the norm) or with no norm."""
    module: Any
    """The subblock's ModuleSpec (`self_attention` / `mlp`)."""
    bda: Any
    """The residual add after it (`self_attn_bda` / `mlp_bda`): get_bias_dropout_add, or
    IdentityFuncOp for a subblock that computes nothing."""
    keys_map: Mapping[str, str] = field(default_factory=dict)
    """Its `sharded_state_dict_keys_map` entries (dist-checkpoint names of a local-spec norm)."""


def first_present(params: Mapping[str, Any], *candidates: str) -> str:
    """The first of `candidates` that `params` has (local vs TE spec names)."""
    for c in candidates:
        if c in params:
            return c
    raise WeightsError(f"model has none of the parameters {list(candidates)}; was it built by build_gpt_model?")


# -- the DeciLM block_configs entries, field order as TRT-LLM / vLLM / Megatron-core write them

def decilm_attention(n_heads_in_group: int | None = None, no_op: bool = False, replace_with_linear: bool = False,
                     **extra) -> dict[str, Any]:
    return {"n_heads_in_group": n_heads_in_group, "no_op": no_op, "replace_with_linear": replace_with_linear,
            **extra}


def decilm_ffn(ffn_mult: float | None = None, no_op: bool = False, replace_with_linear: bool = False,
               **extra) -> dict[str, Any]:
    return {"ffn_mult": ffn_mult, "no_op": no_op, "replace_with_linear": replace_with_linear, **extra}


# ----------------------------------------------------------------------------- the kind table
# Filled by registry.register (registry.py lists the built-in kinds); looked up here so that the
# variant types below need nothing but this module.

_TABLE: dict[str, dict[str, "BlockKind"]] = {ATTENTION: {}, FFN: {}}


def lookup(subblock: str, kind: str) -> "BlockKind":
    """The kind `kind` of `subblock`; one-line ArchitectureError naming the known ones otherwise."""
    try:
        return _TABLE[subblock][kind]
    except (KeyError, TypeError):
        known = list(_TABLE[subblock])
        raise ArchitectureError(f"{subblock} kind {kind!r} unknown; use "
                                f"{', '.join(known[:-1])} or {known[-1]}") from None


def parse_name(subblock: str, name: str):
    """The variant a name denotes (`gqa_kv4`, `mlp_512`, `linear`, `no_op`)."""
    for k in _TABLE[subblock].values():
        v = k.parse_name(name)
        if v is not None:
            return v
    lookup(subblock, name)  # raises: "<subblock> kind 'x' unknown; use ..."
    raise AssertionError(name)


# ----------------------------------------------------------------------------- variants

AttentionKind = str
"""A registered attention kind (`registry.kind_names("attention")`)."""
FFNKind = str
"""A registered FFN kind (`registry.kind_names("ffn")`)."""


class _Variant:
    """What AttentionVariant and FFNVariant share: everything kind-specific is the kind's
    (megapuzzle.blocks), looked up in the registry."""

    SUBBLOCK = ""

    def __post_init__(self):
        lookup(self.SUBBLOCK, self.kind).validate(self)

    def __repr__(self) -> str:  # later size fields only when set, so old reprs stay as they were
        first, *later = SIZE_FIELDS[self.SUBBLOCK]
        parts = [f"kind={self.kind!r}", f"{first}={getattr(self, first)!r}"]
        parts += [f"{f}={getattr(self, f)!r}" for f in later if getattr(self, f) is not None]
        return f"{type(self).__name__}({', '.join(parts)})"

    @property
    def kind_spec(self) -> BlockKind:
        """This variant's kind (megapuzzle.blocks.base.BlockKind)."""
        return lookup(self.SUBBLOCK, self.kind)

    @property
    def name(self) -> str:
        return self.kind_spec.name(self)

    @classmethod
    def from_name(cls, name: str):
        return parse_name(cls.SUBBLOCK, name)

    @property
    def identity(self) -> bool:
        """Computes nothing: no weights, no norm, zero cost (a no-op subblock)."""
        return self.kind_spec.identity

    @property
    def parent_like(self) -> bool:
        """The parent family's own subblock at some size (GQA, SwiGLU MLP)."""
        return self.kind_spec.parent_like


@dataclass(frozen=True, order=True, repr=False)
class AttentionVariant(_Variant):
    """One attention subblock shape."""

    SUBBLOCK = ATTENTION
    kind: AttentionKind
    """`gqa` (grouped-query attention), `linear` (RMSNorm + Linear(hidden, hidden)) or `no_op`
    (and any kind registered in megapuzzle.blocks)."""
    num_kv_heads: int | None = None
    """KV heads for `gqa` (and `swa`); None for the other kinds."""
    window: int | None = None
    """Sliding-window length for `swa` (tokens each query attends to, itself included); None otherwise."""


@dataclass(frozen=True, order=True, repr=False)
class FFNVariant(_Variant):
    """One FFN subblock shape."""

    SUBBLOCK = FFN
    kind: FFNKind
    """`mlp` (SwiGLU), `linear` (RMSNorm + Linear(hidden, hidden)) or `no_op` (and any kind
    registered in megapuzzle.blocks)."""
    intermediate_size: int | None = None
    """SwiGLU intermediate size for `mlp`; None for the other kinds."""


# ----------------------------------------------------------------------------- the kind interface

class BlockKind(ABC):
    """One subblock kind. Subclasses set the class attributes and override what differs (and
    must implement `megatron_spec`); the registry holds one instance of each (`registry.register`)."""

    subblock: str = ""
    """`attention` or `ffn`."""
    kind: str = ""
    """The variant's `kind` string (unique within its subblock)."""
    size_field: str | None = None
    """The variant field this kind sets (`num_kv_heads`, `intermediate_size`), None if it has none."""
    identity: bool = False
    """Computes nothing: no weights, not even the norm, zero runtime (the subblock is skipped)."""
    parent_like: bool = False
    """The parent family's own subblock at some size (a plain Llama layer holds it)."""
    block_config_flag: str | None = None
    """The DeciLM boolean that selects this kind (`no_op`, `replace_with_linear`); None for the
    subblock's default kind (read when no flag is set). Exactly one kind per subblock has None."""
    tensor_names: tuple[str, ...] = ()
    """Layer-local canonical tensor names this kind holds (norm first); `canonical_shapes` gives
    their shapes."""

    # -- names and validation
    def variant(self, *args, **kw):
        """A variant of this kind (AttentionVariant / FFNVariant)."""
        return (AttentionVariant if self.subblock == ATTENTION else FFNVariant)(self.kind, *args, **kw)

    def name(self, v) -> str:
        """The variant's name in arch.json, library keys and costs (`gqa_kv4`, `mlp_512`, `linear`)."""
        return self.kind

    def parse_name(self, name: str):
        """The variant `name` denotes if it is of this kind, else None."""
        return self.variant() if name == self.kind else None

    @property
    def size_fields(self) -> tuple[str, ...]:
        """Every variant field this kind sets (the others must stay None)."""
        return (self.size_field,) if self.size_field else ()

    def validate(self, v) -> None:
        """One-line ArchitectureError for a malformed variant of this kind (fields it does not take)."""
        for f in SIZE_FIELDS[self.subblock]:
            val = getattr(v, f)
            if f not in self.size_fields and val is not None:
                raise ArchitectureError(f"{self.kind} {self.subblock} takes no {f} (got {val})")

    def validate_in(self, arch, v, layer: int) -> None:
        """One-line ArchitectureError if `v` does not fit `arch` (e.g. KV heads vs query heads)."""

    # -- sizes
    def matmul_params(self, arch, v) -> int:
        """Weights of the subblock's GEMMs (no norm)."""
        return 0

    def params(self, arch, v) -> int:
        """All parameters: the GEMMs plus the pre-norm (none for identity kinds)."""
        return 0 if self.identity else self.matmul_params(arch, v) + arch.hidden_size

    def kv_elems_per_token(self, arch, v) -> int:
        """KV-cache elements one token adds in this subblock (K and V)."""
        return 0

    def canonical_shapes(self, arch, v) -> dict[str, tuple[int, ...]]:
        """Layer-local canonical (HF DeciLM) tensor names -> full shapes, norm first."""
        return {}

    def local_names(self) -> tuple[str, ...]:
        return self.tensor_names

    def norm_name(self) -> str:
        return "input_layernorm.weight" if self.subblock == ATTENTION else "post_attention_layernorm.weight"

    def tp_problem(self, arch, v, tp: int) -> str | None:
        """Why `v` cannot be split over `tp` ranks (None: it can)."""
        return None

    def engine_problems(self, arch, v) -> list[str]:
        """`PROBLEM: ENGINES` strings for serving engines that cannot load `v`."""
        return []

    # -- HF DeciLM block_configs and Megatron-core's heterogeneous json
    def block_config(self, arch, v) -> dict[str, Any]:
        """This subblock's DeciLM `block_configs` entry."""
        if self.subblock == ATTENTION:
            return decilm_attention(**({self.block_config_flag: True} if self.block_config_flag else {}))
        return decilm_ffn(**({self.block_config_flag: True} if self.block_config_flag else {}))

    def megatron_block_config(self, arch, v) -> dict[str, Any]:
        """The entry Megatron-core's HeterogeneousTransformerConfig reads: the DeciLM one plus the
        explicit `num_query_groups` / `ffn_hidden_size` it prefers."""
        extra = "num_query_groups" if self.subblock == ATTENTION else "ffn_hidden_size"
        return {**self.block_config(arch, v), extra: getattr(v, self.size_field) if self.size_field else None}

    def from_block_config(self, d: Mapping[str, Any], where: str, arch_dims: Mapping[str, int]):
        """The variant a `block_configs[i].<subblock>` dict `d` selecting this kind describes
        (`where` names it in errors; `arch_dims`: hidden_size, num_attention_heads)."""
        return self.variant()

    def megatron_layer_overrides(self, arch, v) -> dict[str, Any]:
        """TransformerConfig fields this layer sets beyond what the heterogeneous json carries
        (applied per layer by megapuzzle.model.config); {} for all built-in kinds but `swa`."""
        return {}

    # -- the Megatron-core modules (megapuzzle.model.layer_specs assembles a layer from its two kinds')
    @abstractmethod
    def megatron_spec(self, arch, v, config, use_te: bool) -> SubblockModules:
        """This subblock's Megatron modules in a TransformerLayer built with `config` (the layer's
        own TransformerConfig: `get_config_for_layer`, with `megatron_layer_overrides` applied):
        the pre-norm, the ModuleSpec, the residual add. `use_te`: the TransformerEngine spec (the
        norm fused into the first linear) instead of the local one (a separate norm module).
        Imports Megatron lazily (`megapuzzle.blocks.megatron_modules` has the shared pieces); the
        parameter names it gives are the ones `weight_entries` maps."""

    # -- search space
    def offered(self, space, parent, own) -> list:
        """Variants of this kind the search space offers for a layer whose parent subblock is `own`
        (not including `own` itself, which the search space lists first)."""
        return []

    # -- roofline (megapuzzle.roofline): FLOPs and bytes beyond the GEMMs, norm and activations
    def extra_work(self, arch, v, phase: str, batch: int, seq: int, kv_bytes: int) -> tuple[float, float]:
        return 0.0, 0.0

    # -- Megatron weights (megapuzzle.model.weights)
    def weight_entries(self, params: Mapping[str, Any], mp: str, cp: str, v) -> list[WeightEntry]:
        """The Megatron parameters of this subblock (names under `mp`, `decoder.layers.{j}.`) and
        the canonical tensors (under `cp`, `model.layers.{i}.`) each is built from, with the TP
        layout that slices them."""
        return []

    # -- child initialisation (megapuzzle.init); torch, imported lazily
    def needs_calibration(self, parent_v, v) -> bool:
        """Initialising `v` from `parent_v` needs calibration statistics (FFN channel scores)."""
        return False

    def init_from(self, arch, parent_v, v, local, scores=None) -> tuple[dict, str]:
        """(layer-local tensors, init method name) for `v` from the parent subblock `parent_v`
        (not equal to `v`); raises megapuzzle.init.InitError when there is no rule."""
        raise InitError(f"no initialisation from {parent_v.name} {self.subblock_label()} to {v.name}")

    def subblock_label(self) -> str:
        return "attention" if self.subblock == ATTENTION else "FFN"


class SizedKind(BlockKind):
    """A kind named by one integer size, `<prefix><size>` (gqa_kv4, mlp_512): its size field."""

    prefix: str = ""
    """The name before the size."""

    def name(self, v) -> str:
        return f"{self.prefix}{getattr(v, self.size_field)}"

    def parse_name(self, name: str):
        if name.startswith(self.prefix):
            return self.variant(int(name[len(self.prefix):]))
        return None

    def validate(self, v) -> None:
        super().validate(v)
        size = getattr(v, self.size_field)
        if not isinstance(size, int) or size < 1:
            raise ArchitectureError(f"{self.kind} {self.subblock} needs {self.size_field} >= 1, got {size!r}")


class LinearReplacement(BlockKind):
    """A subblock replaced by one hidden x hidden linear map after its norm (DeciLM's
    `replace_with_linear`); the attention and FFN kinds differ in names, offer and init only."""

    kind = "linear"
    block_config_flag = "replace_with_linear"

    def matmul_params(self, arch, v) -> int:
        return arch.hidden_size * arch.hidden_size

    def canonical_shapes(self, arch, v):
        h = arch.hidden_size
        return {self.tensor_names[0]: (h,), self.tensor_names[1]: (h, h)}

    def tp_problem(self, arch, v, tp):
        if arch.hidden_size % tp:
            return (f"tensor parallel size {tp} does not divide hidden_size {arch.hidden_size} (linear subblock); "
                    f"pick a TP size that divides it")
        return None
