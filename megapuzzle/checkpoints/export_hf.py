"""`megapuzzle export-hf` (also `tools/convert_to_hf.py`): checkpoint -> HF DeciLM directory.

    megapuzzle export-hf --checkpoint runs/demo/child --out runs/demo/export [--dtype bf16] [--force]
    megapuzzle export-hf --checkpoint runs/demo/child --out runs/demo/export_fp8 --quantize fp8  # ModelOpt

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
from megapuzzle.checkpoints.shards import parse_size  # noqa: F401 (re-exported)
from megapuzzle.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    q = p.add_argument_group("quantization (nvidia-modelopt; megapuzzle.checkpoints.quantize_fp8)")
    q.add_argument("--quantize", choices=["fp8"], default=None,
                   help="fp8: ModelOpt-calibrated FP8 (E4M3) weights + static input scales for TensorRT-LLM / vLLM")
    q.add_argument("--calib-data", default=None,
                   help="indexed-dataset prefix for calibration (default: the embedded held-out corpus)")
    q.add_argument("--calib-batches", type=int, default=8, help="calibration batches")
    q.add_argument("--calib-batch-size", type=int, default=4, help="sequences per calibration batch")
    q.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence")


def run_cli(args: argparse.Namespace) -> int:
    if args.quantize == "fp8":
        from megapuzzle.checkpoints.quantize_fp8 import export_fp8

        res = export_fp8(args.checkpoint, args.out, calib_data=args.calib_data, calib_batches=args.calib_batches,
                         calib_batch_size=args.calib_batch_size, calib_seq_len=args.calib_seq_len,
                         force=args.force, max_shard_size=args.max_shard_size)
        for w in res["warnings"]:
            print(f"warning: not loadable by {w.rsplit(': ', 1)[-1]}: {w.rsplit(': ', 1)[0]}", file=sys.stderr)
        print(f"exported {args.checkpoint} -> {args.out} (DeciLMForCausalLM, FP8 E4M3 via ModelOpt: "
              f"{res['quantized_linears']} Linear layers, {res['calibration_tokens']} calibration tokens)")
        return 0
    warnings = export_hf(args.checkpoint, args.out, dtype=args.dtype, force=args.force,
                         max_shard_size=args.max_shard_size)
    for w in warnings:
        print(f"warning: not loadable by {w.rsplit(': ', 1)[-1]}: {w.rsplit(': ', 1)[0]}", file=sys.stderr)
    print(f"exported {args.checkpoint} -> {args.out} (DeciLMForCausalLM, {args.dtype})")
    return 0
