"""The block-kind registry: every subblock kind, looked up by (subblock, kind), by variant,
by name or by DeciLM `block_configs` entry. Torch-free.

Order matters and is the registration order (`_BUILTIN` below, then `register` calls): it is
the order the search space offers a layer's variants in (after the parent's own), and the
default kind of a subblock is the one with no DeciLM flag (`default`).
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Mapping

from .base import _TABLE as _KINDS
from .base import ATTENTION, FFN, SUBBLOCKS, ArchitectureError, BlockKind, decilm_attention, decilm_ffn, lookup, parse_name  # noqa: F401

# module:Class of every built-in kind, in search-space order
_BUILTIN = (
    "gqa:GQAAttention", "linear_attention:LinearAttention", "noop_attention:NoOpAttention",
    "swa:SlidingWindowAttention",
    "mlp:MLP", "linear_ffn:LinearFFN", "noop_ffn:NoOpFFN",
)


def register(cls: type[BlockKind]) -> type[BlockKind]:
    """Add a kind (a BlockKind subclass); usable as a class decorator. One kind per
    (subblock, kind) name, and one default kind (block_config_flag None) per subblock."""
    if cls.subblock not in SUBBLOCKS or not cls.kind:
        raise ValueError(f"{cls.__name__}: set subblock (attention|ffn) and kind")
    kinds = _KINDS[cls.subblock]
    if cls.kind in kinds and type(kinds[cls.kind]) is not cls:
        raise ValueError(f"{cls.subblock} kind {cls.kind!r} is registered twice ({cls.__name__})")
    kinds[cls.kind] = cls()
    return cls


for _spec in _BUILTIN:
    _mod, _cls = _spec.split(":")
    register(getattr(importlib.import_module(f"{__package__}.{_mod}"), _cls))


def kinds(subblock: str) -> list[BlockKind]:
    """The kinds of one subblock, in registration order."""
    return list(_KINDS[subblock].values())


def all_kinds() -> Iterator[BlockKind]:
    for s in SUBBLOCKS:
        yield from _KINDS[s].values()


def kind_names(subblock: str) -> tuple[str, ...]:
    return tuple(_KINDS[subblock])


get = lookup  # the kind `kind` of `subblock` (one-line ArchitectureError for unknown ones)


def kind_of(v) -> BlockKind:
    """The kind of a variant (AttentionVariant / FFNVariant)."""
    return get(v.SUBBLOCK, v.kind)


def subblocks_of_name(name: str) -> list[str]:
    """The subblocks a variant name parses in (`linear` in both, `gqa_kv4` in attention only)."""
    out = []
    for s in SUBBLOCKS:
        if any(k.parse_name(name) is not None for k in _KINDS[s].values()):
            out.append(s)
    return out


def from_block_config(subblock: str, d: Mapping[str, Any], where: str, arch_dims: Mapping[str, int]):
    """The variant one DeciLM `block_configs[i].<subblock>` dict describes."""
    flagged = [k for k in _KINDS[subblock].values() if k.block_config_flag and d.get(k.block_config_flag)]
    if len(flagged) > 1:  # named in the format's own field order
        order = list((decilm_attention() if subblock == ATTENTION else decilm_ffn()).keys())
        flagged.sort(key=lambda k: order.index(k.block_config_flag) if k.block_config_flag in order else len(order))
        raise ArchitectureError(f"{where} is both {' and '.join(k.block_config_flag for k in flagged)}; pick one")
    if flagged:
        return flagged[0].from_block_config(d, where, arch_dims)
    return default(subblock).from_block_config(d, where, arch_dims)


def default(subblock: str) -> BlockKind:
    """The kind a DeciLM entry with no flag set means (GQA, SwiGLU MLP: a plain Llama layer's)."""
    return next(k for k in _KINDS[subblock].values() if k.block_config_flag is None)


def local_names(subblock: str) -> tuple[str, ...]:
    """Every layer-local canonical tensor name any kind of `subblock` may hold (norm first)."""
    out: list[str] = []
    for k in _KINDS[subblock].values():
        for n in k.local_names():
            if n not in out:
                out.append(n)
    return tuple(out)
