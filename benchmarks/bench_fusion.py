"""FFN Fusion speed: a child with k consecutive attention-free FFNs vs the same child fused.

    python benchmarks/bench_fusion.py [--rounds 8] [--threads 1] [--clock cpu]

Children are cpu_demo-shaped (hidden 256, 8 heads / 4 KV, FFN 1024, 6 layers, vocab 4096) with
random weights (timing does not depend on them): layer 0 full, layers 1..k no-op attention +
FFN 1024, the rest full. Fused: layer 1 gets FFN k*1024 (megapuzzle.fusion.fused_arch). Timing is
`evaluate`'s (greedy generation, paired ABBA rounds, median of per-pair ratios). Also printed:
the H100 roofline (megapuzzle.roofline) decode time of k Llama-70B FFNs vs their fusion, TP=8,
which is the same by construction (same FLOPs, same weight bytes; no launch / all-reduce terms).
"""
from __future__ import annotations

import argparse

from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as F, LayerArch


def child(k: int) -> Architecture:
    full = LayerArch(A("gqa", 4), F("mlp", 1024))
    layers = [full] + [LayerArch(A("no_op"), F("mlp", 1024))] * k + [full] * (5 - k)
    return Architecture(vocab_size=4096, hidden_size=256, num_attention_heads=8, layers=tuple(layers))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    a = ap.parse_args()
    from megapuzzle.evaluate import EvaluateConfig, measure_pair, paired_speedup
    from megapuzzle.fusion import find_runs, fused_arch
    from megapuzzle.roofline import get_gpu, roofline_time, subblock_work

    cfg = EvaluateConfig(rounds=a.rounds, repeats=1, warmup=1)
    sc = {"batch_size": a.batch, "prefill_len": a.prefill, "gen_len": a.gen}
    settings = {"threads": a.threads, "clock": a.clock, "dtype": "float32", "fp8": False, "fp8_recipe": "delayed"}
    print(f"CPU, fp32, {a.threads} thread(s), clock {a.clock}, batch {a.batch}, prefill {a.prefill} + gen {a.gen}, "
          f"{a.rounds} ABBA rounds")
    print("| k FFNs in the run | unfused tokens/s | fused tokens/s | paired speedup |")
    print("|---:|---:|---:|---:|")
    for k in (2, 3, 4):
        c = child(k)
        f = fused_arch(c, find_runs(c))
        s = measure_pair({"unfused": c, "fused": f}, {"unfused": "random", "fused": "random"}, sc, cfg, settings)
        x = paired_speedup(s["unfused"], s["fused"])
        print(f"| {k} | {s['unfused']['tokens_per_s']:.1f} | {s['fused']['tokens_per_s']:.1f} | {x:.3f}x |")
    big = Architecture.homogeneous(vocab_size=128256, hidden_size=8192, num_layers=80, num_attention_heads=64,
                                   num_kv_heads=8, intermediate_size=28672)
    g = get_gpu("h100")
    print("\nH100 roofline, bf16, decode with 1024 cached tokens, one TP=8 rank (microseconds):")
    print("| batch | k | k separate FFNs | one fused FFN |")
    print("|---:|---:|---:|---:|")
    for b in (1, 64):
        for k in (2, 4):
            one = roofline_time(*subblock_work(big, "ffn", F("mlp", 28672), "decode", b, 1024), g, "bf16")
            fused = roofline_time(*subblock_work(big, "ffn", F("mlp", k * 28672), "decode", b, 1024), g, "bf16")
            print(f"| {b} | {k} | {k * one / 8 * 1e6:.1f} | {fused / 8 * 1e6:.1f} |")


if __name__ == "__main__":
    main()
