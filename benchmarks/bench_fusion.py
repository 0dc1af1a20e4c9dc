"""FFN Fusion speed: a child with k consecutive attention-free FFNs vs the same child fused.

    python benchmarks/bench_fusion.py [--rounds 8] [--threads 1] [--clock cpu]

Children are cpu_demo-shaped (hidden 256, 8 heads / 4 KV, FFN 1024, 6 layers, vocab 4096) with
random weights (timing does not depend on them): layer 0 full, layers 1..k no-op attention +
FFN 1024, the rest full. Fused: layer 1 gets FFN k*1024 (megapuzzle.fusion.fused_arch). Timing is
`evaluate`'s (greedy generation, paired ABBA rounds, median of per-pair ratios). Also printed:
the H100 roofline (megapuzzle.roofline) decode time of k Llama-70B FFNs vs their fusion, TP=8:
the same by construction (same FLOPs, same weight bytes), then with the TP all-reduce each FFN
ends in added from an assumed NCCL cost (k all-reduces unfused, 1 fused). Kernel launches and
the sequential GEMM chain are still left out.
"""
from __future__ import annotations

import argparse

from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as F, LayerArch


# Assumed NCCL all-reduce cost on one 8x H100 SXM node (NVLink 4 / NVSwitch), for the model only:
# the order of magnitude nccl-tests' all_reduce_perf reports (latency-bound below ~64 KB, ~450 GB/s
# bus bandwidth for large messages). Only a measured GPU cost table can replace these.
ALLREDUCE_LATENCY_S = 10e-6
ALLREDUCE_BUS_BW = 450e9


def allreduce_time(nbytes: float, tp: int) -> float:
    """Ring all-reduce of `nbytes` over `tp` GPUs: latency + 2 (tp-1)/tp x bytes / bus bandwidth."""
    return 0.0 if tp == 1 else ALLREDUCE_LATENCY_S + 2 * (tp - 1) / tp * nbytes / ALLREDUCE_BUS_BW


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
    from megapuzzle.stages.evaluate.evaluate import EvaluateConfig, measure_pair, paired_speedup
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
    tp = 8
    print(f"\nH100 roofline, bf16, decode with 1024 cached tokens, one TP={tp} rank (microseconds). The roofline"
          f" proper has no communication term; the last two columns add the TP all-reduce that ends every FFN"
          f" (after the row-parallel down projection) with the assumed NCCL figures below:")
    print(f"all-reduce(n bytes) = {ALLREDUCE_LATENCY_S * 1e6:.0f} us + 2 (tp-1)/tp n / {ALLREDUCE_BUS_BW / 1e9:.0f} GB/s")
    print("| batch | k | k separate FFNs | one fused FFN | k FFNs + k all-reduces | fused + 1 all-reduce | gain |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in (1, 64):
        ar = allreduce_time(b * big.hidden_size * 2, tp)  # one decode token per sequence, bf16
        for k in (2, 4):
            one = roofline_time(*subblock_work(big, "ffn", F("mlp", 28672), "decode", b, 1024), g, "bf16") / tp
            fused = roofline_time(*subblock_work(big, "ffn", F("mlp", k * 28672), "decode", b, 1024), g, "bf16") / tp
            sep, fus = k * (one + ar), fused + ar
            print(f"| {b} | {k} | {k * one * 1e6:.1f} | {fused * 1e6:.1f} | {sep * 1e6:.1f} | {fus * 1e6:.1f} | "
                  f"{sep / fus:.3f}x |")

if __name__ == "__main__":
    main()
