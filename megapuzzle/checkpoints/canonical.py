"""The megapuzzle checkpoint: one directory, independent of TP/PP.

    CKPT/arch.json          the Architecture (megapuzzle.arch)
    CKPT/model.safetensors  full, unsharded tensors under HF DeciLM names (the canonical names)
    CKPT/meta.json          provenance (source, dtype, step, ...)
    CKPT/tokenizer/         tokenizer files, when known

Unsharded so that any TP x PP layout that divides the shapes loads it (each rank slices what
it owns, megapuzzle.model.weights); HF DeciLM names so that export is a rename-free copy.
The directory is written to a temp sibling and renamed into place: a kill never leaves half.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from megapuzzle.arch import Architecture
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json, atomic_write_text, replace_dir, save_safetensors_atomic

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"


def expected_canonical_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of `arch` with its full shape, in file order (embeddings, layers, head)."""
    h, d, nq = arch.hidden_size, arch.kv_channels, arch.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for i, layer in enumerate(arch.layers):
        p = f"model.layers.{i}."
        a, f = layer.attention, layer.ffn
        if a.kind != "no_op":  # no-op subblocks have no norm either
            shapes[p + "input_layernorm.weight"] = (h,)
        if a.kind == "gqa":
            shapes[p + "self_attn.q_proj.weight"] = (nq * d, h)
            shapes[p + "self_attn.k_proj.weight"] = (a.num_kv_heads * d, h)
            shapes[p + "self_attn.v_proj.weight"] = (a.num_kv_heads * d, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, nq * d)
        elif a.kind == "linear":
            shapes[p + "self_attn.linear_attn.weight"] = (h, h)
        if f.kind != "no_op":
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        if f.kind == "mlp":
            shapes[p + "mlp.gate_proj.weight"] = (f.intermediate_size, h)
            shapes[p + "mlp.up_proj.weight"] = (f.intermediate_size, h)
            shapes[p + "mlp.down_proj.weight"] = (h, f.intermediate_size)
        elif f.kind == "linear":
            shapes[p + "mlp.linear_mlp.weight"] = (h, h)
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def validate_tensors(arch: Architecture, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
    """One-line error for the first missing, mis-shaped or unexpected tensor."""
    want = expected_canonical_shapes(arch)
    for name, shape in want.items():
        if name not in tensors:
            raise UserError(f"{source} lack {name} (expected shape {list(shape)}); the weights do not match "
                            f"the architecture")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{source}: {name} has shape {list(tensors[name].shape)} but the architecture needs "
                            f"{list(shape)}; the weights do not match the architecture")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise UserError(f"{source} hold unexpected tensor {extra[0]} ({len(extra)} in all) for this architecture; "
                        f"only Llama/DeciLM weights without biases are supported")


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / ARCH_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def save_checkpoint(out_dir: str | os.PathLike, arch: Architecture, tensors: dict[str, torch.Tensor], *,
                    meta: dict | None = None, tokenizer_dir: str | os.PathLike | None = None,
                    force: bool = False) -> Path:
    """Write a checkpoint directory atomically; refuse to replace a non-empty dir unless `force`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --force to overwrite it")
    validate_tensors(arch, tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        atomic_write_text(tmp / ARCH_FILE, arch.to_json() + "\n")
        save_safetensors_atomic(tensors, tmp / WEIGHTS_FILE, metadata={"format": "megapuzzle-canonical"})
        atomic_write_json(tmp / META_FILE, meta or {})
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_arch(ckpt_dir: str | os.PathLike) -> Architecture:
    p = Path(ckpt_dir)
    if not is_checkpoint(p):
        raise UserError(f"{p} is not a megapuzzle checkpoint (needs {ARCH_FILE} and {WEIGHTS_FILE}); "
                        f"create one with `megapuzzle import-hf`")
    return Architecture.from_json((p / ARCH_FILE).read_text())


def load_checkpoint(ckpt_dir: str | os.PathLike, dtype: torch.dtype | None = None
                    ) -> tuple[Architecture, dict[str, torch.Tensor], dict]:
    """(architecture, canonical tensors, meta). safetensors only: never unpickles anything."""
    from megapuzzle.fileio import read_safetensors

    p = Path(ckpt_dir)
    arch = load_arch(p)
    tensors = read_safetensors(p / WEIGHTS_FILE, fix=f"re-run the stage that wrote {p} (or re-import it)")
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    validate_tensors(arch, tensors)
    meta = json.loads((p / META_FILE).read_text()) if (p / META_FILE).is_file() else {}
    return arch, tensors, meta


def tokenizer_path(ckpt_dir: str | os.PathLike) -> Path | None:
    t = Path(ckpt_dir) / TOKENIZER_DIR
    return t if t.is_dir() else None
