"""`megapuzzle export-hf` (also `tools/convert_to_hf.py`): checkpoint -> HF DeciLM directory.

    megapuzzle export-hf --checkpoint runs/demo/child --out runs/demo/export [--dtype auto|bf16|fp16|fp32] [--force]
    megapuzzle export-hf --checkpoint runs/demo/child --out runs/demo/export --target vllm   # refuse what vLLM cannot load
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

# auto: the checkpoint's own dtype, so a conversion is lossless unless a down-cast is asked for
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Serving engines an export can be checked against (names as Architecture.engine_compatible() writes them)
TARGETS = {"vllm": "vLLM", "tensorrt-llm": "TensorRT-LLM"}


def check_target(arch, target: str | None) -> None:
    """Refuse, in one line naming the layers, an architecture the target engine cannot load."""
    if target is None:
        return
    if target not in TARGETS:
        raise UserError(f"unknown export target {target!r}; use one of {', '.join(TARGETS)}")
    engine = TARGETS[target]
    problems = [p.rsplit(": ", 1)[0] for p in arch.engine_compatible() if engine in p.rsplit(": ", 1)[-1]]
    if problems:
        raise UserError(f"{engine} cannot load this child: {'; '.join(problems)}; search with "
                        f"`search_space: {{preset: {target}}}` (or drop --target to export it for transformers "
                        f"and Megatron only)")


def export_hf(checkpoint: str | Path, out: str | Path, *, dtype: str = "auto", force: bool = False,
              max_shard_size: str = "2GB", target: str | None = None) -> dict:
    """Write the DeciLM directory. Returns {"warnings": engine-compatibility problems (empty when
    none), "dtype": the dtype written}. dtype auto keeps the checkpoint's own (lossless)."""
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.checkpoints.hf_io import write_decilm_dir

    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --force to overwrite it")
    check_target(load_arch(checkpoint), target)
    arch, tensors, _ = load_checkpoint(checkpoint, dtype=DTYPES[dtype])
    warnings = write_decilm_dir(arch, tensors, out, tokenizer_dir=tokenizer_path(checkpoint), force=force,
                                max_shard_bytes=parse_size(max_shard_size))
    # from the headers: the tensors are a lazy reader, streamed into the export's shards above
    dtypes = {tensors.out_dtype(k) for k in tensors}
    written = {str(d).removeprefix("torch.") for d in dtypes if d.is_floating_point}
    return {"warnings": list(warnings or []), "dtype": ",".join(sorted(written))}


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="megapuzzle checkpoint directory (arch.json + model.safetensors)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="weight dtype in the export; auto (default) keeps the checkpoint's own, so nothing is rounded")
    p.add_argument("--target", choices=list(TARGETS), default=None,
                   help="refuse (exit 2, naming the layers) a child this serving engine cannot load")
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
    res = export_hf(args.checkpoint, args.out, dtype=args.dtype, force=args.force,
                    max_shard_size=args.max_shard_size, target=args.target)
    for w in res["warnings"]:
        print(f"warning: not loadable by {w.rsplit(': ', 1)[-1]}: {w.rsplit(': ', 1)[0]}", file=sys.stderr)
    how = "the checkpoint's own dtype" if args.dtype == "auto" else f"cast to {args.dtype} as asked"
    print(f"exported {args.checkpoint} -> {args.out} (DeciLMForCausalLM, {res['dtype']} weights: {how})")
    return 0
