"""Peak RSS of the FP8 export, streamed (today's `export-hf --quantize fp8`) vs ModelOpt's whole-model flow.

    python benchmarks/bench_fp8_export.py [--hidden 1024 --layers 8 --vocab 32000 --ffn 4096] \\
        [--out benchmarks/results/fp8_export.md]
    python benchmarks/bench_fp8_export.py --layers 24 --max-shard-size 256MB \\
        --json benchmarks/results/memory_fp8_export.json    # the memory model's export-fp8 row

Builds a random Llama-shaped bf16 checkpoint (nothing downloaded), then runs each path in a fresh
process on the same calibration tokens and records its peak RSS (ru_maxrss at exit) and its RSS
after importing torch / transformers / ModelOpt (the interpreter's baseline, paid by both):
* streamed: megapuzzle.checkpoints.quantize_fp8.write_fp8_dir (one layer at a time), with the per-layer
  resume checkpoints `export-hf --quantize fp8` writes (checkpoints/fp8_resume.py);
* whole: the flow the export had before #14: the checkpoint as an fp32 DeciLM directory, loaded
  whole with transformers, `mtq.quantize(model, FP8_DEFAULT_CFG, loop)`, bf16, `export_hf_checkpoint`.
Both outputs must hold the same tensors (the bench checks FP8 weights bitwise).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1 << 30


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(mode: str, ckpt: Path, out: Path, batches: int, batch_size: int, seq_len: int, shard: int) -> dict:
    import modelopt.torch.quantization as mtq  # noqa: F401 - the baseline includes every import
    import torch
    import transformers  # noqa: F401

    from megapuzzle.checkpoints.canonical import load_checkpoint

    torch.set_num_threads(2)
    base = _rss_now()
    t0 = time.time()
    arch, tensors, _ = load_checkpoint(ckpt, dtype=torch.float32)
    tokens = torch.randint(0, arch.vocab_size, (batches, batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    if mode == "streamed":  # as export-hf --quantize fp8 runs it: each layer checkpointed for a resume
        from megapuzzle.checkpoints.canonical import checkpoint_fingerprint
        from megapuzzle.checkpoints.fp8_resume import Progress, inputs_key, work_dir
        from megapuzzle.checkpoints.quantize_fp8 import fp8_device, write_fp8_dir
        from megapuzzle.fileio import replace_dir

        progress = Progress(work_dir(out), inputs_key(checkpoint_fingerprint(ckpt), tokens, shard, fp8_device()))
        write_fp8_dir(arch, tensors, tokens, progress.out, max_shard_bytes=shard, progress=progress)
        replace_dir(progress.out, out)
        progress.finish()
    else:
        from modelopt.torch.export import export_hf_checkpoint
        from transformers import AutoModelForCausalLM

        from megapuzzle.checkpoints.hf_io import write_decilm_dir

        write_decilm_dir(arch, tensors, out.parent / "fp32")
        model = AutoModelForCausalLM.from_pretrained(out.parent / "fp32", trust_remote_code=True,
                                                     dtype=torch.float32).eval()

        def loop(m):
            with torch.no_grad():
                for b in tokens:
                    m(b, use_cache=False)

        mtq.quantize(model, mtq.FP8_DEFAULT_CFG, loop)
        model.to(torch.bfloat16)
        export_hf_checkpoint(model, export_dir=out, max_shard_size=shard)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "baseline": base, "peak": peak, "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--calib", default="2,4,128", help="batches,batch_size,seq_len")
    ap.add_argument("--max-shard-size", default="256MB", help="output shards (both paths): the writer's buffer")
    ap.add_argument("--out", default=None, help="markdown table to write (default: print only)")
    ap.add_argument("--json", default=None,
                    help="also write the streamed row as megapuzzle.memory_model reads it (benchmarks/results/"
                         "memory_fp8_export.json: key export-fp8)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches, batch_size, seq_len = (int(x) for x in args.calib.split(","))
    from megapuzzle.checkpoints.shards import parse_size

    shard = parse_size(args.max_shard_size)
    if args.child:
        mode, ckpt, out = args.child
        print(json.dumps(child(mode, Path(ckpt), Path(out), batches, batch_size, seq_len, shard)))
        return

    import torch

    from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as F, LayerArch
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes, write_checkpoint
    from megapuzzle.fileio import atomic_write_text

    arch = Architecture(vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads,
                        layers=[LayerArch(A("gqa", args.kv_heads), F("mlp", args.ffn))] * args.layers,
                        max_position_embeddings=4096)
    g = torch.Generator().manual_seed(0)
    shapes = expected_canonical_shapes(arch)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    with tempfile.TemporaryDirectory(dir=REPO.parent) as tmp:
        ckpt = Path(tmp) / "ckpt"
        write_checkpoint(ckpt, arch, ((n, (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16))
                                      for n, s in shapes.items()))
        rows, outs = [], {}
        for mode in ("whole", "streamed"):
            outs[mode] = Path(tmp) / mode / "fp8"
            r = subprocess.run([sys.executable, __file__, "--calib", args.calib, "--max-shard-size",
                                args.max_shard_size, "--child", mode, str(ckpt),
                                str(outs[mode])], capture_output=True, text=True, cwd=REPO)
            if r.returncode:
                sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        from safetensors.torch import load_file

        a, b = ({n: t for f in sorted(outs[m].glob("*.safetensors")) for n, t in load_file(f).items()}
                for m in ("whole", "streamed"))
        same = set(a) == set(b) and all(torch.equal(a[n].float(), b[n].float()) for n in a
                                        if not n.endswith("input_scale"))
    bf16 = params * 2
    lines = [f"# FP8 export peak RSS: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, vocab {args.vocab} "
             f"({params / 1e6:.0f}M params, {bf16 / GB:.2f} GiB bf16, {2 * bf16 / GB:.2f} GiB fp32)", "",
             f"`python benchmarks/bench_fp8_export.py --layers {args.layers} --max-shard-size {args.max_shard_size}` "
             f"(calibration {batches} x {batch_size} x {seq_len} tokens); "
             f"same tensors in both exports (FP8 weights and weight scales bitwise): {same}", "",
             "| path | peak RSS GiB | baseline (imports) GiB | peak - baseline GiB | seconds |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['peak'] / GB:.2f} | {r['baseline'] / GB:.2f} | "
                     f"{(r['peak'] - r['baseline']) / GB:.2f} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)
    if args.json:
        write_json(Path(args.json), args, arch, params, shard, next(r for r in rows if r["mode"] == "streamed"))


def write_json(path: Path, args, arch, params: int, shard: int, r: dict) -> None:
    """The streamed export's row for megapuzzle.memory_model. owned = what the export holds that scales
    with the model: the largest decoder layer in fp32, one output shard, the embedding in fp32 (read
    whole: the largest tensor). The calibration hidden states (batches x batch_size x seq_len x hidden
    x 4 B, held once: each batch's output replaces its input) are arithmetic in the recipes' model, as
    activations are for every stage; here they are a few MB."""
    from megapuzzle.fileio import atomic_write_json

    layer = max(arch.layer_params(i) for i in range(arch.num_layers)) * 4
    embed = arch.vocab_size * arch.hidden_size * 4
    b, bs, t = (int(x) for x in args.calib.split(","))
    owned = layer + shard + embed
    cmd = (f"python benchmarks/bench_fp8_export.py --layers {args.layers} --max-shard-size {args.max_shard_size}"
           f" --json {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    atomic_write_json(path, {
        "format": "megapuzzle-bench-memory/1", "command": cmd, "shape": f"fp8-{args.layers}l", "cpus": os.cpu_count(),
        "params": params, "num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
        "vocab_size": arch.vocab_size, "model_bytes": params * 2, "largest_tensor_bytes": embed // 2,
        "shard_bytes": shard, "calibration_hidden_bytes": b * bs * t * arch.hidden_size * 4,
        "rows": [{"key": "export-fp8", "stage": "export-hf --quantize fp8 (streamed, resumable)",
                  "layout": "1 process", "rank": 0, "owned": owned, "baseline": r["baseline"], "peak": r["peak"],
                  "target": None, "within": None, "seconds": round(r["seconds"], 1),
                  "note": f"owned: one layer fp32 {layer / 2**20:.0f} MiB + shard {shard / 2**20:.0f} MiB + "
                          f"embedding fp32 {embed / 2**20:.0f} MiB"}]})


if __name__ == "__main__":
    main()
