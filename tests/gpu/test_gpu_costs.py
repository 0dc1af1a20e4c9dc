"""Measured per-block costs on the GPU are monotone in block size: smaller FFNs are not slower
at prefill, fewer KV heads are not slower at decode, parameter / KV bytes are exact."""

from __future__ import annotations

import pytest
from megapuzzle.arch import Architecture, LayerArch, SearchSpace
from megapuzzle.arch import AttentionVariant as A
from megapuzzle.arch import FFNVariant as F

from _gpu import dist1, requires_cuda  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("dist1")]

NOISE = 1.05  # a smaller block may measure up to 5% above a bigger one (timer noise)


@requires_cuda
def test_measured_costs_are_monotone_in_size():
    from megapuzzle.stages.measure.measure import MeasureConfig, measure_costs

    # Llama-3-8B-like widths on 1 layer: big enough that GEMM time, not launch overhead, counts
    parent = Architecture(vocab_size=4096, hidden_size=4096, num_attention_heads=32,
                          layers=(LayerArch(A("gqa", 8), F("mlp", 14336)),), max_position_embeddings=4096)
    space = SearchSpace(kv_heads=(4, 2, 1), ffn_fractions=(0.75, 0.5, 0.25), attention_linear=False,
                        attention_no_op=True, ffn_linear=False, ffn_no_op=True)
    cfg = MeasureConfig(batch_sizes=(8,), seq_lens=(1024,), stack_layers=2, repeats=7, warmup=2,
                        dtype="bfloat16", check_parent=False)
    costs = measure_costs(parent, cfg, space=space)
    assert costs["device"].startswith("NVIDIA") and costs["precision"] == "bf16"
    v = costs["variants"]

    def t(name, phase):
        return v[name]["runtime"][phase]["median"][0][0]

    ffn = ["ffn.mlp_14336", "ffn.mlp_10752", "ffn.mlp_7168", "ffn.mlp_3584"]
    attn = ["attention.gqa_kv8", "attention.gqa_kv4", "attention.gqa_kv2", "attention.gqa_kv1"]
    for names, phase in ((ffn, "prefill"), (attn, "decode"), (attn, "prefill")):
        times = [t(n, phase) for n in names]
        print(phase, dict(zip(names, [f"{x * 1e3:.3f} ms" for x in times])))
        assert all(b <= a * NOISE for a, b in zip(times, times[1:])), (phase, times)
        assert times[0] > 0
    assert t("ffn.mlp_14336", "prefill") > 2 * t("ffn.mlp_3584", "prefill")  # 4x the FLOPs
    params = [v[n]["param_count"] for n in ffn]
    assert params == [3 * 4096 * s for s in (14336, 10752, 7168, 3584)]
    assert [v[n]["kv_bytes_per_token"] for n in attn] == [2 * k * 128 * 2 for k in (8, 4, 2, 1)]
