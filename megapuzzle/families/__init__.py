"""Parent families (families/base.py is the interface). Only Llama today; `Architecture.family`
names one."""

from __future__ import annotations

from .base import Family
from .llama import Llama

DEFAULT = "llama"
FAMILIES: dict[str, Family] = {f.name: f for f in (Llama(),)}


def get_family(name: str) -> Family:
    from megapuzzle.blocks.base import ArchitectureError

    if name not in FAMILIES:
        raise ArchitectureError(f"family {name!r} unknown; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["DEFAULT", "FAMILIES", "Family", "get_family"]
