"""`megapuzzle export-hf` (also `tools/convert_to_hf.py`): checkpoint -> HF DeciLM directory.

    megapuzzle export-hf --checkpoint runs/demo/child --out runs/demo/export [--dtype bf16] [--force]

The directory loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
(our own modeling_decilm.py is copied beside the weights) and is what TensorRT-LLM, vLLM and
Megatron-Bridge read (`DeciLMForCausalLM`, `model_type: nemotron-nas`, `block_configs`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megapuzzle.checkpoints.canonical import load_checkpoint, tokenizer_path
from megapuzzle.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * m)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise UserError(f"cannot read size {text!r}; write e.g. 2GB, 500MB or a byte count")


def export_hf(checkpoint: str | Path, out: str | Path, *, dtype: str = "bf16", force: bool = False,
              max_shard_size: str = "2GB") -> list[str]:
    """Write the DeciLM directory; returns engine-compatibility warnings (empty when none)."""
    from megapuzzle.checkpoints.hf_io import write_decilm_dir

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --force to overwrite it")
    arch, tensors, _ = load_checkpoint(checkpoint, dtype=DTYPES[dtype])
    warnings = write_decilm_dir(arch, tensors, out, tokenizer_dir=tokenizer_path(checkpoint), force=force,
                                max_shard_bytes=parse_size(max_shard_size))
    return list(warnings or [])


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="megapuzzle checkpoint directory (arch.json + model.safetensors)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype in the export")
    p.add_argument("--max-shard-size", default="2GB", help="split safetensors above this size (index file written)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")


def run_cli(args: argparse.Namespace) -> int:
    warnings = export_hf(args.checkpoint, args.out, dtype=args.dtype, force=args.force,
                         max_shard_size=args.max_shard_size)
    for w in warnings:
        print(f"warning: not loadable by {w.rsplit(': ', 1)[-1]}: {w.rsplit(': ', 1)[0]}", file=sys.stderr)
    print(f"exported {args.checkpoint} -> {args.out} (DeciLMForCausalLM, {args.dtype})")
    return 0
