"""The megapuzzle checkpoint: one directory, independent of TP/PP.

    CKPT/arch.json          the Architecture (megapuzzle.arch)
    CKPT/model.safetensors  full (not TP-split) tensors under HF DeciLM names (the canonical names), or
                            model-0000i-of-0000n.safetensors + model.safetensors.index.json (HF style,
                            layer-aligned shards: a layer's tensors never straddle two files)
    CKPT/meta.json          provenance (source, dtype, step, ...)
    CKPT/tokenizer/         tokenizer files, when known

Full tensors (not TP shards) so that any TP x PP layout that divides the shapes loads it; each
rank reads only its own layers and its TP slice of them (megapuzzle.model.weights over the
lazy reader of `load_checkpoint`). HF DeciLM names so that export is a rename-free copy.
The directory is written to a temp sibling, shard by shard, and renamed into place: a kill
never leaves half.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from megapuzzle.arch import Architecture
from megapuzzle.errors import UserError
from megapuzzle.checkpoints.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsReader,
    ShardWriter,
)
from megapuzzle.fileio import atomic_write_json, atomic_write_text, replace_dir

ARCH_FILE = "arch.json"
WEIGHTS_FILE = SINGLE_FILE
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"


def expected_canonical_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of `arch` with its full shape, in file order (embeddings, layers, head)."""
    before, after = arch.family_spec.outer_shapes(arch)  # embeddings; final norm + LM head (the family's)
    shapes: dict[str, tuple[int, ...]] = dict(before)
    for i, layer in enumerate(arch.layers):
        p = f"model.layers.{i}."
        for v in (layer.attention, layer.ffn):  # each kind's own tensors, its norm first (megapuzzle.blocks)
            shapes.update((p + k, s) for k, s in v.kind_spec.canonical_shapes(arch, v).items())
    shapes.update(after)
    return shapes


def shape_of(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape; from the file header when `tensors` is a lazy reader (no data read)."""
    if isinstance(tensors, SafetensorsReader):
        return tensors.shape(name)
    return tuple(tensors[name].shape)


def first_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the first tensor (what a checkpoint was saved in), without reading it."""
    name = next(iter(tensors))
    if isinstance(tensors, SafetensorsReader):
        return tensors.out_dtype(name)
    return tensors[name].dtype


def _check_tensor(want: Mapping[str, tuple[int, ...]], name: str, shape: tuple[int, ...], source: str) -> None:
    if name not in want:
        raise UserError(f"{source} hold unexpected tensor {name} for this architecture; "
                        f"only Llama/DeciLM weights without biases are supported")
    if tuple(shape) != want[name]:
        raise UserError(f"{source}: {name} has shape {list(shape)} but the architecture needs "
                        f"{list(want[name])}; the weights do not match the architecture")


def validate_tensors(arch: Architecture, tensors: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """One-line error for the first missing, mis-shaped or unexpected tensor."""
    want = expected_canonical_shapes(arch)
    for name, shape in want.items():
        if name not in tensors:
            raise UserError(f"{source} lack {name} (expected shape {list(shape)}); the weights do not match "
                            f"the architecture")
        _check_tensor(want, name, shape_of(tensors, name), source)
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise UserError(f"{source} hold unexpected tensor {extra[0]} ({len(extra)} in all) for this architecture; "
                        f"only Llama/DeciLM weights without biases are supported")


# ----------------------------------------------------------------------------- per-layer names

def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def local_layer_tensors(tensors: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The canonical tensors of one layer under layer-local names."""
    p = layer_prefix(layer)
    return {k[len(p):]: tensors[k] for k in tensors if k.startswith(p)}  # keys first: a lazy reader reads only these


def with_layer_prefix(local: Mapping[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    p = layer_prefix(layer)
    return {p + k: v for k, v in local.items()}



def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / ARCH_FILE).is_file() and ((p / WEIGHTS_FILE).is_file() or (p / INDEX_FILE).is_file())


def require_parent(run) -> Path:
    """RUN/parent (run: a config.RunDir), or a one-line error saying how to make it."""
    if not is_checkpoint(run.parent):
        raise UserError(f"{run.parent} holds no parent checkpoint; run `megapuzzle import-hf --out "
                        f"{run.parent}` (or `megapuzzle run CONFIG`) first")
    return run.parent


def write_checkpoint(out_dir: str | os.PathLike, arch: Architecture, items: Iterable[tuple[str, torch.Tensor]], *,
                     meta: dict | None = None, tokenizer_dir: str | os.PathLike | None = None, force: bool = False,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a checkpoint from (name, tensor) pairs in canonical order, one shard at a time (peak
    memory: one shard + one layer + whatever the iterator holds). Atomic: a temp sibling directory
    renamed into place; refuses to replace a non-empty dir unless `force`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --force to overwrite it")
    want = expected_canonical_shapes(arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        writer = ShardWriter(tmp, max_shard_bytes, metadata={"format": "megapuzzle-canonical"})
        seen = set()
        for name, t in items:
            _check_tensor(want, name, tuple(t.shape), "weights")
            writer.add(name, t)
            seen.add(name)
        missing = [n for n in want if n not in seen]
        if missing:
            raise UserError(f"weights lack {missing[0]} (expected shape {list(want[missing[0]])}); the weights do "
                            f"not match the architecture")
        writer.close()
        atomic_write_text(tmp / ARCH_FILE, arch.to_json() + "\n")
        atomic_write_json(tmp / META_FILE, meta or {})
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_checkpoint(out_dir: str | os.PathLike, arch: Architecture, tensors: Mapping[str, torch.Tensor], *,
                    meta: dict | None = None, tokenizer_dir: str | os.PathLike | None = None,
                    force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a checkpoint directory atomically; refuse to replace a non-empty dir unless `force`.
    `tensors` may be a lazy reader (another checkpoint): it is read one tensor at a time."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --force to overwrite it")
    validate_tensors(arch, tensors)
    return write_checkpoint(out, arch, ((n, tensors[n]) for n in expected_canonical_shapes(arch)), meta=meta,
                            tokenizer_dir=tokenizer_dir, force=force, max_shard_bytes=max_shard_bytes)


def load_arch(ckpt_dir: str | os.PathLike) -> Architecture:
    p = Path(ckpt_dir)
    if not is_checkpoint(p):
        raise UserError(f"{p} is not a megapuzzle checkpoint (needs {ARCH_FILE} and {WEIGHTS_FILE} or {INDEX_FILE}); "
                        f"create one with `megapuzzle import-hf`")
    return Architecture.from_json((p / ARCH_FILE).read_text())


def load_checkpoint(ckpt_dir: str | os.PathLike, dtype: torch.dtype | None = None
                    ) -> tuple[Architecture, SafetensorsReader, dict]:
    """(architecture, canonical tensors, meta). The tensors are a lazy read-only Mapping: each
    access reads that tensor (cast to `dtype`) from disk, and megapuzzle.model.weights reads just
    a rank's slices; nothing is loaded here beyond the file headers (names and shapes, checked).
    safetensors only: never unpickles anything."""
    p = Path(ckpt_dir)
    arch = load_arch(p)
    tensors = SafetensorsReader(p, dtype=dtype, order=list(expected_canonical_shapes(arch)),
                                fix=f"re-run the stage that wrote {p} (or re-import it)")
    validate_tensors(arch, tensors, source=str(p))
    meta = json.loads((p / META_FILE).read_text()) if (p / META_FILE).is_file() else {}
    return arch, tensors, meta


def checkpoint_fingerprint(ckpt_dir: str | os.PathLike) -> str:
    """Content fingerprint of a checkpoint's weights (a single-file checkpoint keeps the value
    megapuzzle.fileio.weights_fingerprint gave it before shards existed, so runs do not redo work)."""
    return SafetensorsReader(ckpt_dir).fingerprint()


def tokenizer_path(ckpt_dir: str | os.PathLike) -> Path | None:
    t = Path(ckpt_dir) / TOKENIZER_DIR
    return t if t.is_dir() else None
