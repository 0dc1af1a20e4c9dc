"""Run configuration (one YAML file, one section per stage) and the run-directory layout.

    parent:        where the parent comes from (a checkpoint, a HF dir, or train-parent)
    data:          tokenized train / held-out data (Megatron indexed prefixes)
    search_space:  megapuzzle.arch.SearchSpace fields
    bld: score: measure: mip: gkd: evaluate: export:   one section per stage

Each section is a frozen dataclass in this package, one module per stage (config/bld.py, ...),
torch-free: every field is documented and states its rule in its type (config/rules.py), rules
that tie fields are named functions. `section()` builds it and rejects unknown keys with a
one-line error.

Run directory (`RunDir`): every stage reads and writes files here, so any stage can be re-run
or resumed alone.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

from megapuzzle.errors import UserError

T = TypeVar("T")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config {p} does not exist; pass --config with a YAML file (see examples/)")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config {p} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(cfg, dict):
        raise UserError(f"config {p} must be a mapping of sections (parent:, bld:, ...)")
    return cfg


def section(cfg: dict[str, Any] | None, name: str, cls: type[T]) -> T:
    """`cls(**cfg[name])`, with a one-line error for unknown keys or bad values."""
    raw = (cfg or {}).get(name) or {}
    if not isinstance(raw, dict):
        raise UserError(f"config section '{name}' must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in config section '{name}'; known: {sorted(known)}")
    # YAML gives lists where dataclasses hold tuples
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"config section '{name}': {e}") from None


def section_dict(obj) -> dict[str, Any]:
    """A section dataclass as plain json-able data (tuples -> lists); used for manifests."""
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return {k: conv(v) for k, v in dataclasses.asdict(obj).items()}


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one Puzzle run."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    parent = property(lambda self: self.root / "parent")          # canonical checkpoint of the parent
    data = property(lambda self: self.root / "data")              # train.{bin,idx}, heldout.{bin,idx}
    train_data = property(lambda self: self.root / "data" / "train")      # indexed-dataset prefix
    heldout_data = property(lambda self: self.root / "data" / "heldout")  # indexed-dataset prefix
    library = property(lambda self: self.root / "library")        # BLD block library (index.json + blocks/)
    scores = property(lambda self: self.root / "scores.json")
    costs = property(lambda self: self.root / "costs.json")
    mip = property(lambda self: self.root / "mip")                # solutions.json, pareto.json
    child = property(lambda self: self.root / "child")            # realized child checkpoint
    gkd = property(lambda self: self.root / "gkd")                # GKD train state + final checkpoint
    export = property(lambda self: self.root / "export")          # HF DeciLM directory
    tb = property(lambda self: self.root / "tb")                  # tensorboard, one subdir per stage
    state = property(lambda self: self.root / "state")            # resumable per-stage scratch state
    manifest = property(lambda self: self.root / "manifest.json")
    report = property(lambda self: self.root / "report.md")

    def require_data(self, split: str = "train") -> Path:
        prefix = self.train_data if split == "train" else self.heldout_data
        if not prefix.with_suffix(".idx").is_file():
            raise UserError(f"{prefix}.idx missing; run `megapuzzle prepare-data --out {prefix}` "
                            f"(or `megapuzzle run CONFIG`) first")
        return prefix
