"""`megapuzzle import-hf`: a HuggingFace Llama (or DeciLM) directory -> megapuzzle checkpoint.

    megapuzzle import-hf --hf-dir /models/Llama-3.1-8B --out runs/llama8b/parent --tp 4 --pp 2

The checkpoint stores full (not TP-split) tensors in layer-aligned shards
(megapuzzle.checkpoints.canonical), so any TP x PP that divides the shapes loads it; `--tp/--pp`
check that the intended layout works now rather than hours later on the cluster. The import
streams: one tensor is read (and cast) at a time and shards are written as they fill, so its
memory is about one shard plus one layer, never the model.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from megapuzzle.checkpoints.canonical import save_checkpoint
from megapuzzle.checkpoints.shards import DEFAULT_MAX_SHARD_BYTES, parse_size
from megapuzzle.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": None}


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy whatever tokenizer files `src` has into `dst`; returns the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def check_parallel_layout(arch, tp: int, pp: int) -> None:
    arch.validate_tensor_parallel(tp)
    if pp < 1 or arch.num_layers % pp:
        raise UserError(f"pipeline parallel size {pp} does not divide the {arch.num_layers} layers; "
                        f"pick a PP size that divides the layer count")


def import_hf(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, dtype: str = "auto",
              force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    from megapuzzle.checkpoints.canonical import first_dtype
    from megapuzzle.checkpoints.hf_io import open_hf_llama

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} has no config.json; point --hf-dir at a HuggingFace model directory")
    arch, tensors = open_hf_llama(hf_dir, dtype=DTYPES[dtype])  # lazy: read tensor by tensor while writing
    check_parallel_layout(arch, tp, pp)
    with tempfile.TemporaryDirectory() as tok:
        has_tok = bool(copy_tokenizer_files(hf_dir, tok))
        meta = {"source": str(hf_dir.resolve()), "source_format": "hf", "dtype": str(first_dtype(tensors)),
                "checked_layout": {"tp": tp, "pp": pp}, "num_params": arch.num_params()}
        return save_checkpoint(out, arch, tensors, meta=meta, tokenizer_dir=tok if has_tok else None, force=force,
                               max_shard_bytes=max_shard_bytes)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-dir", required=True, help="HF Llama-3.x (or DeciLM) directory with config.json + safetensors")
    p.add_argument("--out", required=True, help="megapuzzle checkpoint directory to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint must load under")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint must load under")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="cast weights (auto keeps the source dtype)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="start a new safetensors shard above this size (layer-aligned; index file written)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")


def run_cli(args: argparse.Namespace) -> int:
    out = import_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, force=args.force,
                    max_shard_bytes=parse_size(args.max_shard_size))
    from megapuzzle.checkpoints.canonical import load_arch

    arch = load_arch(out)
    print(f"imported {args.hf_dir} -> {out}: {arch.num_layers} layers, hidden {arch.hidden_size}, "
          f"{arch.num_params() / 1e6:.2f}M params (checked for TP={args.tp} PP={args.pp})")
    return 0
