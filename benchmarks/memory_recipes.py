"""The H100 recipes' per-rank memory, scaled from the memory benchmark (not a unit test).

    python benchmarks/memory_recipes.py          # -> benchmarks/results/memory_recipes.md

megapuzzle.memory_model fits bytes added per owned byte (k) and the baseline to
benchmarks/results/memory*.json (bench_memory.py); tests/test_examples.py applies it to
examples/llama31_{8b,70b,405b}_h100.yaml at their TP x PP and launch (LAUNCH) and asserts every
stage fits but the named misses (MISSES). This prints the same predictions as a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> int:
    import test_examples as t

    from megapuzzle.fileio import atomic_write_text
    from megapuzzle.memory_model import DGX_H100_HOST_BYTES, GPUS_PER_NODE, H100_BYTES, MemoryModel

    mm = MemoryModel.from_results()
    lines = ["`python benchmarks/memory_recipes.py`", "",
             "Coefficients (megapuzzle.memory_model, from benchmarks/results/memory*.json): per stage, k = max over "
             "the measured rows (every rank, every layout) of added RSS / owned bytes at the largest shape the stage "
             "ran at, and the baseline (interpreter + torch + Megatron) before the command.", "",
             "| stage key | k (bytes per owned byte) | baseline | shape | rows |", "|---|---:|---:|---|---:|"]
    for c in mm.coefficients.values():
        lines.append(f"| {c.stage} | {c.k:.2f} | {c.fixed / (1 << 30):.2f} GiB | {c.shape} | {c.rows} |")
    lines += ["", f"Per rank, worst rank of each stage. GPU = k x owned + activations (arithmetic, per stage in "
                  f"tests/test_examples.py) + 4 GiB CUDA reserve, limit {H100_BYTES / 1e9:.0f} GB (H100); host = "
                  f"baseline + k x owned (the whole measured footprint, as on CPU: a bound), limit "
                  f"{DGX_H100_HOST_BYTES / GPUS_PER_NODE / 1e9:.0f} GB (2 TB / 8 GPUs). import-hf / realize / export-hf "
                  f"are one CPU process each, owned = one shard + the largest tensor. export-hf fp8 (the streamed FP8 "
                  f"export, one process on one GPU): owned = the largest layer in fp32 + one output shard + the "
                  f"embedding in fp32 (host = baseline + k x owned); GPU = k x the layer + activations (the cached "
                  f"calibration hidden states, fp32, once, + one batch through a layer) + reserve.", "",
              "| recipe | stage | owned | activations | GPU | host | fits | miss: cause |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    for size in ("8b", "70b", "405b"):
        for stage, p in t._predict_recipe(size).items():
            gpu = "-" if p.gpu is None else f"{p.gpu / 1e9:.1f} GB"
            lines.append(f"| {size} | {stage} | {p.owned / 1e9:.1f} GB | {p.activations / 1e9:.1f} GB | {gpu} | "
                         f"{p.host / 1e9:.1f} GB | {'yes' if p.fits() else '**no**'} | "
                         f"{t.MISSES.get((size, stage), '')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(REPO / "benchmarks" / "results" / "memory_recipes.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
