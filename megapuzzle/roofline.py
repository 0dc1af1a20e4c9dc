"""Analytic roofline costs of subblock variants on named datacenter GPUs.

    time = max(FLOPs / (peak_flops * compute_efficiency), bytes / (bandwidth * bandwidth_efficiency))

per subblock variant, phase and (batch, seq) grid point, in the same table shape as the
measured costs (megapuzzle.costs.table), so the MIP can target a GPU this machine does not
have (`target_device: h100`). Pure Python: no torch, no Megatron.

What is counted (and what is not, on purpose: it is a first-order model, the measured table
is the real thing):

* FLOPs: the GEMMs (2 * tokens * matmul parameters) and, for GQA, the attention core
  (QK^T and AV); prefill is causal, so a sequence of s tokens has s(s+1)/2 (query, key)
  pairs, each costing 2*d FLOPs for QK^T and 2*d for AV per query head. Norms, SiLU, RoPE
  and softmax are ignored (elementwise, fused in real engines).
* Bytes: every weight once per forward (prefill or one decode step), the subblock's input
  and output activations, and the KV cache: prefill writes b*s tokens of K and V; a decode
  step reads the s cached tokens and writes the new one, i.e. b*(s+1) tokens of K and V.
* Baseline (outside the layers): embedding rows read, the final norm and the LM head on the
  last token only (serving: prefill needs the next-token logits, not all of them).
  Embeddings and head stay in bf16 under FP8, as TensorRT-LLM's and TransformerEngine's FP8
  recipes leave them unquantized; norms are bf16 too.
* No kernel-launch or scheduling overhead: at small batch the measured table will be slower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class GPUSpec:
    """Peak numbers of one GPU (dense tensor-core math: the data sheets' 'with sparsity' halved)."""

    name: str
    """Marketing name."""
    bf16_flops: float
    """Dense BF16 tensor-core FLOP/s."""
    fp8_flops: float | None
    """Dense FP8 tensor-core FLOP/s; None where the GPU has no FP8 tensor cores."""
    bandwidth: float
    """HBM bandwidth in bytes/s (decimal: 1 TB/s = 1e12 B/s)."""
    memory_bytes: int
    """HBM capacity in bytes (decimal GB, as the data sheets give it)."""
    source: str
    """Where the numbers come from."""


# NVIDIA data sheets list tensor-core throughput "with sparsity" (2:4) next to a footnote;
# the dense numbers below are those halved, which is what a dense LLM GEMM can reach.
GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec(
        name="NVIDIA H100 SXM5 80GB", bf16_flops=989.4e12, fp8_flops=1978.9e12, bandwidth=3.35e12,
        memory_bytes=80 * 10**9,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS and FP8 3,958 TFLOPS "
               "with sparsity, 3.35 TB/s HBM3, 80 GB"),
    "h200": GPUSpec(
        name="NVIDIA H200 SXM 141GB", bf16_flops=989.4e12, fp8_flops=1978.9e12, bandwidth=4.8e12,
        memory_bytes=141 * 10**9,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS and FP8 3,958 TFLOPS "
               "with sparsity (same compute as H100 SXM), 4.8 TB/s HBM3e, 141 GB"),
    "a100": GPUSpec(
        name="NVIDIA A100 80GB SXM", bf16_flops=312e12, fp8_flops=None, bandwidth=2.039e12,
        memory_bytes=80 * 10**9,
        source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS dense (624 with "
               "sparsity), no FP8, 2,039 GB/s HBM2e, 80 GB"),
    "b200": GPUSpec(
        name="NVIDIA B200 (HGX B200, per GPU)", bf16_flops=2.25e15, fp8_flops=4.5e15, bandwidth=8.0e12,
        memory_bytes=180 * 10**9,
        source="NVIDIA HGX B200 datasheet, per GPU: FP16/BF16 4.5 PFLOPS and FP8 9 PFLOPS with "
               "sparsity, 8 TB/s HBM3e, 180 GB"),
}

_ALIASES = {"h100sxm": "h100", "h100sxm5": "h100", "h10080gb": "h100", "h200sxm": "h200",
            "a10080gb": "a100", "a100sxm": "a100", "a10080gbsxm": "a100", "hgxb200": "b200"}

# bytes per element at each roofline precision: weights of the subblock GEMMs, KV cache.
# FP8 deployments (TensorRT-LLM) also quantize the KV cache to FP8.
_WEIGHT_BYTES = {"bf16": 2, "fp8": 1}
_KV_BYTES = {"bf16": 2, "fp8": 1}
_ACT_BYTES = 2  # activations between subblocks stay bf16
_HEAD_BYTES = 2  # embeddings, LM head and norms stay bf16


def gpu_key(name: str) -> str:
    """Canonical key ("h100", ...) of a GPU name such as "H100", "h100_sxm" or "A100-80GB"."""
    k = re.sub(r"[^a-z0-9]", "", str(name).lower())
    k = _ALIASES.get(k, k)
    if k not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}")
    return k


def get_gpu(name: str) -> GPUSpec:
    return GPUS[gpu_key(name)]


def effective_precision(gpu: GPUSpec, precision: str) -> str:
    """"fp8" where the GPU has FP8 tensor cores and it was asked for, else "bf16"."""
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"roofline precision must be bf16 or fp8, got {precision!r}")
    return "fp8" if precision == "fp8" and gpu.fp8_flops else "bf16"


# ----------------------------------------------------------------------------- work counts

def matmul_params(arch: Architecture, subblock: str, v: AttentionVariant | FFNVariant) -> int:
    """Weights of the subblock's GEMMs (no norm); the kind counts them (megapuzzle.blocks)."""
    return v.kind_spec.matmul_params(arch, v)


def subblock_work(arch: Architecture, subblock: str, v: AttentionVariant | FFNVariant, phase: str,
                  batch: int, seq: int, precision: str = "bf16") -> tuple[float, float]:
    """(FLOPs, bytes moved) of one subblock for `batch` sequences: prefill of `seq` tokens, or one
    decode step with `seq` tokens cached. See the module docstring for what is counted."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if v.identity:
        return 0.0, 0.0
    h = arch.hidden_size
    wb, kvb = _WEIGHT_BYTES[precision], _KV_BYTES[precision]
    mp = matmul_params(arch, subblock, v)
    tokens = batch * seq if phase == "prefill" else batch
    flops = 2.0 * tokens * mp
    nbytes = float(mp * wb + h * _HEAD_BYTES + 2 * tokens * h * _ACT_BYTES)  # weights, norm, in + out
    extra_flops, extra_bytes = v.kind_spec.extra_work(arch, v, phase, batch, seq, kvb)  # e.g. attention + KV cache
    if extra_flops or extra_bytes:
        flops += extra_flops
        nbytes += extra_bytes
    return flops, nbytes


def baseline_work(arch: Architecture, phase: str, batch: int, seq: int) -> tuple[float, float]:
    """(FLOPs, bytes) outside the layers: embedding lookup, final norm, LM head on the last token."""
    h, V = arch.hidden_size, arch.vocab_size
    tokens = batch * seq if phase == "prefill" else batch
    flops = 2.0 * batch * h * V
    nbytes = float(tokens * h * _HEAD_BYTES + V * h * _HEAD_BYTES + h * _HEAD_BYTES + batch * V * _ACT_BYTES)
    return flops, nbytes


def roofline_time(flops: float, nbytes: float, gpu: GPUSpec, precision: str,
                  compute_efficiency: float = 0.6, bandwidth_efficiency: float = 0.8) -> float:
    """Seconds: the slower of the compute and the memory bound."""
    peak = gpu.fp8_flops if effective_precision(gpu, precision) == "fp8" else gpu.bf16_flops
    return max(flops / (peak * compute_efficiency), nbytes / (gpu.bandwidth * bandwidth_efficiency))


# ----------------------------------------------------------------------------- tables

def roofline_table(parent: Architecture, attention: Iterable[AttentionVariant], ffn: Iterable[FFNVariant],
                   batch_sizes: Iterable[int], seq_lens: Iterable[int], gpu: str, precision: str = "bf16",
                   compute_efficiency: float = 0.6, bandwidth_efficiency: float = 0.8,
                   phases: Iterable[str] = PHASES) -> dict[str, Any]:
    """A cost table (same keys as the measured one, see megapuzzle.costs.table) for one GPU.

    IQRs are zero (nothing is measured); the empty-layer overhead is zero (no launch costs)."""
    spec = get_gpu(gpu)
    prec = effective_precision(spec, precision)
    bs, ss, phases = [int(b) for b in batch_sizes], [int(s) for s in seq_lens], list(phases)
    head_time = {ph: [[roofline_time(*baseline_work(parent, ph, b, s), spec, "bf16", compute_efficiency,
                                     bandwidth_efficiency) for s in ss] for b in bs] for ph in phases}
    zeros = [[0.0] * len(ss) for _ in bs]
    table: dict[str, Any] = {
        "source": "roofline", "gpu": gpu_key(gpu), "device": spec.name, "datasheet": spec.source,
        "precision": prec, "peak_flops": spec.fp8_flops if prec == "fp8" else spec.bf16_flops,
        "bandwidth": spec.bandwidth, "memory_bytes": spec.memory_bytes,
        "compute_efficiency": compute_efficiency, "bandwidth_efficiency": bandwidth_efficiency,
        "grid": {"batch_sizes": bs, "seq_lens": ss}, "phases": phases,
        "baseline": {ph: {"median": head_time[ph], "iqr": zeros} for ph in phases},
        "empty_layer": {ph: {"median": zeros, "iqr": zeros} for ph in phases},
        "variants": {},
    }
    wb, kvb = _WEIGHT_BYTES[prec], _KV_BYTES[prec]
    for subblock, variants in (("attention", attention), ("ffn", ffn)):
        for v in variants:
            runtime = {}
            for ph in phases:
                med = [[roofline_time(*subblock_work(parent, subblock, v, ph, b, s, prec), spec, prec,
                                      compute_efficiency, bandwidth_efficiency) for s in ss] for b in bs]
                runtime[ph] = {"median": med, "iqr": zeros}
            mp = matmul_params(parent, subblock, v)
            norm = 0 if v.identity else parent.hidden_size
            kv = v.kind_spec.kv_elems_per_token(parent, v)
            table["variants"][f"{subblock}.{v.name}"] = {
                "subblock": subblock, "name": v.name, "param_count": mp + norm,
                "param_bytes": mp * wb + norm * _HEAD_BYTES, "kv_bytes_per_token": kv * kvb,
                "runtime": runtime}
    return table
