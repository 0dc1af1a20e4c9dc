"""The fused-run block library on disk: RUN/library_runs (FFN Fusion inside the search, issue #16).

    RUN/library_runs/index.json                      {"format", "blocks": {key: entry}, "score_settings"}
    RUN/library_runs/blocks/R{i:03d}-{j:03d}.{ffn}.safetensors   the fused FFN (layer-local names)

A run block replaces parent layers i..j by ONE layer: the parent's attention at i and an FFN of
width W, the run's other layers no-op / no-op. Only the FFN is stored (the attention at i stays
the parent's, or whatever variant the MIP picks there). An entry: first, last, ffn, file, sha256,
start ("parent" or the narrower variant whose trained blocks were folded), sources (their
checksums), BLD's nmse_init / nmse_final / bld_signature, and after `score` kl / lm_loss_delta /
top1. Writers (several BLD / score ranks at once) update the index under an exclusive lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json, read_safetensors, save_safetensors_atomic, sha256_file
from megapuzzle.fusion import FFN_NAMES  # noqa: F401 (what a run block stores)

RUNS_DIR = "library_runs"
FORMAT = "megapuzzle-run-blocks/1"


def run_key(i: int, j: int, ffn: FFNVariant) -> str:
    return f"R{i:03d}-{j:03d}.{ffn.name}"


def run_windows(parent: Architecture, max_run: int) -> list[tuple[int, int]]:
    """Every [i, j] of 2..max_run layers whose FFNs are all MLPs."""
    L = parent.num_layers
    return [(i, i + n - 1) for n in range(2, max_run + 1) for i in range(L - n + 1)
            if all(parent.layers[k].ffn.parent_like for k in range(i, i + n))]


def _index_path(run_root) -> Path:
    return Path(run_root) / RUNS_DIR / "index.json"


def load_run_index(run_root) -> dict:
    p = _index_path(run_root)
    if not p.is_file():
        return {"format": FORMAT, "blocks": {}}
    d = json.loads(p.read_text())
    if d.get("format") != FORMAT:
        raise UserError(f"{p} is not a {FORMAT} index; delete {p.parent} and re-run bld")
    return d


class RunLibrary:
    """RUN/library_runs as BLD's and score's ranks write it. `add_block(key, tensors, meta)` is the
    sink megapuzzle.stages.bld.train writes finished blocks to (as it does to a BlockLibrary); `runs`
    gives each key's first / last layer, start and sources."""

    def __init__(self, run_root, runs: Mapping[str, Mapping[str, Any]] | None = None):
        self.root = Path(run_root) / RUNS_DIR
        self.runs = dict(runs or {})

    @contextlib.contextmanager
    def locked_index(self):
        """The index for a read-modify-write under an exclusive lock; written back on exit."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                idx = load_run_index(self.root.parent)
                yield idx
                atomic_write_json(self.root / "index.json", idx)
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def entries(self) -> dict[str, dict]:
        return dict(load_run_index(self.root.parent)["blocks"])

    def entry_ok(self, e: Mapping[str, Any] | None) -> bool:
        if not e:
            return False
        f = self.root / e["file"]
        return f.is_file() and sha256_file(f) == e.get("sha256")

    def load_block(self, key: str) -> dict[str, torch.Tensor]:
        """A run block's fused FFN, checksum verified (score builds its layer from it)."""
        return run_block_ffn(self.root.parent, key)

    def add_block(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
        """Write a trained run block's fused FFN, then its index entry (any earlier scores dropped)."""
        r = self.runs[key]
        f = self.root / "blocks" / f"{key}.safetensors"
        save_safetensors_atomic({n: tensors[n].contiguous() for n in FFN_NAMES}, f)
        entry = {"first": r["first"], "last": r["last"], "ffn": key.split(".", 1)[1], "file": f"blocks/{f.name}",
                 "start": r["start"], "sources": r["sources"], "sha256": sha256_file(f),
                 "nmse_init": meta["init_nmse"], "nmse_final": meta["final_nmse"],
                 **{k: meta[k] for k in ("init", "tokens", "steps", "trained_nmse", "kept", "params",
                                         "bld_signature", "trained_dtype") if k in meta}}
        with self.locked_index() as idx:
            idx["blocks"][key] = entry
            idx["blocks"] = dict(sorted(idx["blocks"].items()))
        return entry


def run_block_ffn(run_root, key: str) -> dict[str, torch.Tensor]:
    """The stored fused FFN of one run block (layer-local names), checksum verified."""
    e = load_run_index(run_root)["blocks"][key]
    f = _index_path(run_root).parent / e["file"]
    if sha256_file(f) != e["sha256"]:
        raise UserError(f"{f} does not match its checksum in the run-block index; re-run bld")
    return read_safetensors(f, fix="re-run bld")


def run_score_value(e: dict, metric: str) -> float:
    if "kl" not in e:
        raise UserError(f"run block {e.get('first')}-{e.get('last')} has no score; re-run score")
    if metric == "kl":
        return max(0.0, float(e["kl"]))
    if metric == "lm_loss":
        return float(e["lm_loss_delta"])
    return 1.0 - float(e["top1"])


def narrower_starts(parent: Architecture, library, i: int, j: int) -> list[tuple[FFNVariant, list[str]]]:
    """Per narrower parent-like FFN variant the library holds at every layer of run [i, j] (all its
    layers MLPs): (variant, the library checksums of those blocks, layer by layer). A fused block of
    the run can start from the fold of these trained blocks (width = their sum) as well as from the
    parent's own FFNs; a retrained block retrains the run blocks made from it. Reads the index only."""
    from megapuzzle.library import ffn_key

    entries = library.entries()
    common = None
    for k in range(i, j + 1):
        own = parent.layers[k].ffn
        names = {e["ffn"] for e in entries.values() if e["layer"] == k and e["kind"] == "ffn"}
        vs = {FFNVariant.from_name(n) for n in names}
        vs = {v for v in vs if v.parent_like and v.intermediate_size < own.intermediate_size}
        common = vs if common is None else common & vs
    return [(v, [entries[ffn_key(k, v)].get("sha256", "") for k in range(i, j + 1)])
            for v in sorted(common or (), key=lambda v: -v.intermediate_size)]


def iter_child_with_runs(lib, run_root, parent: Architecture, parent_tensors, layers: list[LayerArch],
                         runs: list[tuple[int, int]]):
    """A child's canonical (name, tensor) pairs where run layers come from the run library: the
    library streams everything else (a run's first layer with a no-op FFN, its other layers
    no-op / no-op) and the stored fused FFN is spliced in at the run's first layer."""
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes

    lib_layers = list(layers)
    for i, j in runs:
        lib_layers[i] = LayerArch(layers[i].attention, FFNVariant("no_op"))
        for k in range(i + 1, j + 1):
            lib_layers[k] = LayerArch(AttentionVariant("no_op"), FFNVariant("no_op"))
    stream = lib.iter_assembled(parent, parent_tensors, lib_layers)
    starts = {i: j for i, j in runs}
    child = parent.with_layers(layers)
    ffn: dict[str, torch.Tensor] = {}
    for name in expected_canonical_shapes(child):
        parts = name.split(".")
        if name.startswith("model.layers.") and int(parts[2]) in starts and ".".join(parts[3:]) in FFN_NAMES:
            i = int(parts[2])
            if not ffn or next(iter(ffn)) != i:
                ffn = {i: run_block_ffn(run_root, run_key(i, starts[i], layers[i].ffn))}
            yield name, ffn[i][".".join(parts[3:])]
            continue
        got, t = next(stream)
        if got != name:
            raise UserError(f"realize with runs: expected {name} from the library, got {got}")
        yield name, t
