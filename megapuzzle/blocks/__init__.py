"""Subblock kinds: one class per kind, one file per class (see base.py for the interface and
registry.py for the lookup). Torch-free at import."""

from .base import ATTENTION, FFN, SUBBLOCKS, ArchitectureError, BlockKind, WeightEntry, WeightsError
from . import registry
from .registry import get, kind_of, kinds, parse_name, register

__all__ = ["ATTENTION", "FFN", "SUBBLOCKS", "ArchitectureError", "BlockKind", "WeightEntry", "WeightsError",
           "registry", "get", "kind_of", "kinds", "parse_name", "register"]
