"""The block library on disk: every trained (or parent) subblock variant, one file each.

    RUN/library/index.json                    {"format": ..., "blocks": {key: entry}}
    RUN/library/blocks/<key>.safetensors      layer-local canonical tensors of that block

Keys: `L{layer:03d}.attention.{variant}`, `L{layer:03d}.ffn.{variant}`, and for coupled
blocks `L{layer:03d}.layer.{attn}+{ffn}`. A block file holds the canonical tensors of its
subblock(s) without the `model.layers.{i}.` prefix (an attention block: its norm and
projections; an FFN block: its norm and projections; a coupled block: both). No-op blocks
are files with no tensors, so every variant, trained or not, has one entry and one file.

The parent's own variants are entries too (init "parent", 0 tokens, NMSE 0), so scoring and
realize treat all variants alike. New variants are added without touching old ones.

Writes: the block file atomically first, then the index under an exclusive lock (several
BLD ranks share one library), read-modify-written atomically. An entry therefore never
names a file that is not complete; a file without an entry is simply retrained. Reads verify
the file's sha256 against the index: a corrupted block raises LibraryError and is never used
(BLD retrains it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch, empty_layer
from megapuzzle.checkpoints.canonical import expected_canonical_shapes, layer_prefix, with_layer_prefix
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json, read_safetensors, save_safetensors_atomic, sha256_file

INDEX_FILE = "index.json"
BLOCKS_DIR = "blocks"
FORMAT = "megapuzzle-block-library/1"
KINDS = ("attention", "ffn", "layer")
ENTRY_FIELDS = ("key", "layer", "kind", "attention", "ffn", "init", "tokens", "init_nmse", "final_nmse",
                "sha256", "file", "status")


class LibraryError(UserError):
    """A block is missing or corrupted; the message names it and the fix (re-run BLD)."""


def attention_key(layer: int, v: AttentionVariant | str) -> str:
    return f"L{layer:03d}.attention.{v if isinstance(v, str) else v.name}"


def ffn_key(layer: int, v: FFNVariant | str) -> str:
    return f"L{layer:03d}.ffn.{v if isinstance(v, str) else v.name}"


def layer_key(layer: int, la: LayerArch) -> str:
    return f"L{layer:03d}.layer.{la.attention.name}+{la.ffn.name}"


def parse_key(key: str) -> tuple[int, str, str | None, str | None]:
    """(layer, kind, attention name, ffn name) of a block key."""
    try:
        lpart, kind, var = key.split(".", 2)
        layer = int(lpart[1:]) if lpart.startswith("L") else None
    except ValueError:
        layer, kind, var = None, None, None
    if layer is None or kind not in KINDS or not var:
        raise LibraryError(f"malformed block key {key!r}; expected L###.attention.V, L###.ffn.V or L###.layer.A+F")
    if kind == "attention":
        return layer, kind, var, None
    if kind == "ffn":
        return layer, kind, None, var
    a, _, f = var.partition("+")
    return layer, kind, a, f


def block_shapes(arch: Architecture, layer: int, kind: str, attention: str | None, ffn: str | None
                 ) -> dict[str, tuple[int, ...]]:
    """Layer-local tensor shapes a block must hold (from the checkpoint format's own definition)."""
    empty = empty_layer()
    one = arch.with_layers([LayerArch(AttentionVariant.from_name(attention) if attention else empty.attention,
                                      FFNVariant.from_name(ffn) if ffn else empty.ffn)])
    p = layer_prefix(0)
    return {k[len(p):]: s for k, s in expected_canonical_shapes(one).items() if k.startswith(p)}


class BlockLibrary:
    """RUN/library: `entries()`, `has()`, `load_block()`, `add_block()`, `layer_tensors()`, `assemble()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.blocks_dir = self.path / BLOCKS_DIR
        self.index_path = self.path / INDEX_FILE

    # -- index
    def _read_index(self) -> dict[str, Any]:
        if not self.index_path.is_file():
            return {"format": FORMAT, "blocks": {}}
        try:
            d = json.loads(self.index_path.read_text())
        except json.JSONDecodeError as e:
            raise LibraryError(f"{self.index_path} is not valid json ({e}); delete it and re-run "
                               f"`megapuzzle bld` (blocks are retrained)") from None
        if d.get("format") != FORMAT or not isinstance(d.get("blocks"), dict):
            raise LibraryError(f"{self.index_path} is not a {FORMAT} index; point --run-dir at a megapuzzle run")
        return d

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive lock for the index's read-modify-write (BLD ranks write concurrently)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def entries(self) -> dict[str, dict[str, Any]]:
        """All index entries by key (read fresh: other ranks may have written since)."""
        return dict(self._read_index()["blocks"])

    def entry(self, key: str) -> dict[str, Any] | None:
        return self._read_index()["blocks"].get(key)

    def file_path(self, key: str) -> Path:
        return self.blocks_dir / f"{key}.safetensors"

    # -- queries
    def has(self, key: str, verify: bool = True) -> bool:
        """Entry present, status done, file present and (verify) its sha256 matches the index."""
        return self.entry_ok(self.entry(key), verify)

    def entry_ok(self, e: Mapping[str, Any] | None, verify: bool = True) -> bool:
        """`has()` for an entry already read (checking many blocks reads the index once)."""
        if e is None or e.get("status") != "done":
            return False
        f = self.blocks_dir / e["file"]
        if not f.is_file():
            return False
        return not verify or sha256_file(f) == e["sha256"]

    def load_block(self, key: str) -> dict[str, torch.Tensor]:
        """Layer-local tensors of a block, after checking its sha256 against the index."""
        e = self.entry(key)
        if e is None or e.get("status") != "done":
            raise LibraryError(f"block {key} is not in the library {self.path}; run `megapuzzle bld` with a "
                               f"search space that contains it")
        f = self.blocks_dir / e["file"]
        if not f.is_file():
            raise LibraryError(f"block file {f} is missing; re-run `megapuzzle bld` to retrain it")
        if sha256_file(f) != e["sha256"]:
            raise LibraryError(f"block file {f} is corrupted (sha256 mismatch with the index); re-run "
                               f"`megapuzzle bld` to retrain it")
        return read_safetensors(f, fix="delete it and re-run `megapuzzle bld` to retrain the block")

    # -- writes
    def add_block(self, key: str, tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> dict[str, Any]:
        """Write the block file atomically, then its index entry (key/layer/kind/variants, file,
        sha256 and status are filled in here; the caller gives init, tokens, NMSEs, ...)."""
        layer, kind, a, f = parse_key(key)
        fname = f"{key}.safetensors"
        path = self.blocks_dir / fname
        save_safetensors_atomic(dict(tensors), path, metadata={"format": FORMAT, "key": key})
        full = {"key": key, "layer": layer, "kind": kind, "attention": a, "ffn": f,
                "init": None, "tokens": 0, "init_nmse": None, "final_nmse": None}
        full.update(entry)
        full.update({"key": key, "file": fname, "sha256": sha256_file(path), "status": "done"})
        assert all(f in full for f in ENTRY_FIELDS)
        with self._locked():
            idx = self._read_index()
            idx["blocks"][key] = full
            idx["blocks"] = dict(sorted(idx["blocks"].items()))
            atomic_write_json(self.index_path, idx)
        return full

    # -- realize
    def layer_tensors(self, layer: int, la: LayerArch) -> dict[str, torch.Tensor]:
        """Canonical tensors (with the `model.layers.{layer}.` prefix) of one layer's
        (attention, FFN) choice: the coupled block when the library has it, else the two
        decoupled blocks (no-op subblocks have no weights and need no block)."""
        ck = layer_key(layer, la)
        if self.has(ck, verify=False):
            return with_layer_prefix(self.load_block(ck), layer)
        local: dict[str, torch.Tensor] = {}
        if not la.attention.identity:
            local.update(self.load_block(attention_key(layer, la.attention)))
        if not la.ffn.identity:
            local.update(self.load_block(ffn_key(layer, la.ffn)))
        return with_layer_prefix(local, layer)

    def assemble(self, parent_arch: Architecture, parent_tensors: Mapping[str, torch.Tensor],
                 choices: list[LayerArch]) -> tuple[Architecture, dict[str, torch.Tensor]]:
        """A realized child: the parent's embeddings / final norm / head plus the chosen blocks."""
        arch = self.child_arch(parent_arch, choices)
        return arch, dict(self.iter_assembled(parent_arch, parent_tensors, choices))

    def child_arch(self, parent_arch: Architecture, choices: list[LayerArch]) -> Architecture:
        if len(choices) != parent_arch.num_layers:
            raise LibraryError(f"{len(choices)} layer choices for a {parent_arch.num_layers}-layer parent; "
                               f"give exactly one LayerArch per layer")
        return parent_arch.with_layers(choices)

    def iter_assembled(self, parent_arch: Architecture, parent_tensors: Mapping[str, torch.Tensor],
                       choices: list[LayerArch]) -> Iterator[tuple[str, torch.Tensor]]:
        """The child's (name, tensor) pairs in canonical file order, one layer's blocks loaded at
        a time (realize streams them into the checkpoint's shards)."""
        want = expected_canonical_shapes(self.child_arch(parent_arch, choices))
        for name in want:
            if not name.startswith("model.layers.") and name not in parent_tensors:
                raise LibraryError(f"parent tensors lack {name}; pass the parent checkpoint's tensors")
        layer_of = {n: int(n.split(".")[2]) for n in want if n.startswith("model.layers.")}
        current: tuple[int, dict[str, torch.Tensor]] | None = None
        for name, shape in want.items():
            if name in layer_of:
                i = layer_of[name]
                if current is None or current[0] != i:
                    current = (i, self.layer_tensors(i, choices[i]))
                    extra = sorted(n for n in current[1] if n not in want)
                    if extra:
                        raise LibraryError(f"assembled child holds unexpected tensor {extra[0]}; the library "
                                           f"is inconsistent")
                t = current[1].get(name)
            else:
                t = parent_tensors[name]
            if t is None or tuple(t.shape) != shape:
                got = None if t is None else list(t.shape)
                raise LibraryError(f"assembled {name} has shape {got}, the child needs {list(shape)}; the "
                                   f"library was built from another parent")
            yield name, t
