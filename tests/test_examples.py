"""Every example config parses and validates (FP8 switched off on this CPU box, where it must
fail at start), and the Llama-3.1 H100 recipes fit: the TP sizes split every variant of the
search space, the PP sizes split the layers, and the bf16 teacher shard fits an 80 GB H100."""

from __future__ import annotations

from pathlib import Path

import pytest

from megapuzzle.arch import Architecture, SearchSpace
from megapuzzle.config import load_config
from megapuzzle.errors import UserError
from megapuzzle.pipeline import validate_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
H100_BYTES = 80e9

# The published HF configs (config.json) of the two parents: no download needed.
LLAMA31 = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}
COMMON = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0,
              max_position_embeddings=131072, tie_word_embeddings=False,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def _without_fp8(cfg: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "fp8"} if isinstance(v, dict) else v)
            for k, v in cfg.items()}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_configs_validate(path):
    cfg = load_config(path)
    cfg.setdefault("parent", {"train": "debug"})  # stage-only configs (bld_debug.yaml) lack a source
    if any(isinstance(v, dict) and v.get("fp8") for v in cfg.values()):
        with pytest.raises(UserError, match=r"fp8: fp8=True needs"):  # no TE / GPU here
            validate_config(cfg)
        cfg = _without_fp8(cfg)
    validate_config(cfg)


@pytest.mark.parametrize("size", ["8b", "70b"])
def test_llama31_h100_recipes_fit(size):
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / f"llama31_{size}_h100.yaml")
    parent = Architecture.from_hf_config({**COMMON, **LLAMA31[size]})
    space = SearchSpace.from_dict(cfg["search_space"])
    attn = space.attention_variants(parent, 0)
    ffn = space.ffn_variants(parent, 0)
    assert len(attn) == 6 and len(ffn) == 9  # gqa 8/4/2/1, linear, no-op; 7 MLP widths, linear, no-op
    assert all(v.intermediate_size % 256 == 0 for v in ffn if v.kind == "mlp")  # ffn_mult-expressible
    for stage in ("bld", "gkd"):
        tp, pp = cfg[stage]["tensor_parallel"], cfg[stage]["pipeline_parallel"]
        for a in attn:
            for f in ffn:
                parent.with_layers([type(parent.layers[0])(a, f)] * parent.num_layers).validate_tensor_parallel(tp)
        assert parent.num_layers % pp == 0
        teacher_per_gpu = 2 * parent.num_params() / (tp * pp)
        assert teacher_per_gpu < 0.25 * H100_BYTES, f"{stage}: bf16 teacher shard {teacher_per_gpu / 1e9:.1f} GB"
    # BLD's optimizer state per GPU at the DP size the example's comments name (bf16 params with
    # fp32 master weights: 20 B per trainable param) plus the bf16 teacher shard fits an H100
    bld_dp = {"8b": 8, "70b": 16}[size]
    trainable = sum(parent.attention_params(a) for a in attn if a != parent.layers[0].attention) + \
        sum(parent.ffn_params(f) for f in ffn if f != parent.layers[0].ffn)
    per_stage = trainable * parent.num_layers // cfg["bld"]["pipeline_parallel"]
    bld_per_gpu = 20 * per_stage / bld_dp + 2 * parent.num_params() / cfg["bld"]["pipeline_parallel"]
    assert cfg["bld"]["dtype"] == "auto" and bld_per_gpu < 0.85 * H100_BYTES, f"BLD {bld_per_gpu / 1e9:.1f} GB"
    # the paper's budgets: ~1B BLD tokens per block at 70B (0.5B, the saturation point, at 8B);
    # GKD tens of billions at 70B
    assert cfg["bld"]["tokens_per_block"] == (1_000_000_000 if size == "70b" else 500_000_000)
    assert cfg["gkd"]["tokens"] >= (10_000_000_000 if size == "70b" else 1_000_000_000)
    assert cfg["export"]["quantize"] == "fp8" and cfg["measure"]["fp8"] and cfg["bld"]["fp8"] and cfg["gkd"]["fp8"]
