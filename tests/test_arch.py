"""The architecture type: lossless HF DeciLM round trip, the ffn_mult rule, search space, errors."""

import json

import pytest

from megapuzzle.arch import (
    Architecture,
    ArchitectureError,
    AttentionVariant,
    FFNVariant,
    LayerArch,
    SearchSpace,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
    load_architecture,
)

A = AttentionVariant
F = FFNVariant


def mixed_arch(**kw) -> Architecture:
    layers = [
        LayerArch(A("gqa", 4), F("mlp", 1024)),
        LayerArch(A("gqa", 2), F("mlp", 768)),
        LayerArch(A("linear"), F("no_op")),
        LayerArch(A("no_op"), F("linear")),
        LayerArch(A("gqa", 1), F("mlp", 100)),  # 100 has no ffn_mult
    ]
    return Architecture(vocab_size=512, hidden_size=256, num_attention_heads=8, layers=layers,
                        rope_theta=500000.0, tie_word_embeddings=True, **kw)


def test_hf_round_trip_is_identity():
    a = mixed_arch(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf = a.to_hf_config()
    assert hf["architectures"] == ["DeciLMForCausalLM"] and hf["model_type"] == "nemotron-nas"
    assert len(hf["block_configs"]) == 5
    assert Architecture.from_hf_config(json.loads(json.dumps(hf))) == a
    assert Architecture.from_json(a.to_json()) == a


def test_block_configs_use_the_ecosystem_fields():
    bc = mixed_arch().to_hf_config()["block_configs"]
    assert bc[0] == {"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
                     "ffn": {"ffn_mult": 6.0, "no_op": False, "replace_with_linear": False}}
    assert bc[1]["ffn"]["ffn_mult"] == 4.5 and bc[1]["attention"]["n_heads_in_group"] == 4
    assert bc[2]["attention"]["replace_with_linear"] and bc[2]["ffn"]["no_op"]
    assert bc[3]["attention"]["no_op"] and bc[3]["ffn"]["replace_with_linear"]
    # not expressible as ffn_mult: explicit size, flagged as not engine-loadable
    assert bc[4]["ffn"] == {"ffn_mult": None, "no_op": False, "replace_with_linear": False, "intermediate_size": 100}
    assert mixed_arch().engine_compatible() == [
        "layer 2: linear attention: vLLM", "layer 3: linear FFN: vLLM",
        "layer 4: intermediate_size 100 has no ffn_mult (not a multiple of 256): TensorRT-LLM and vLLM"]


def test_ffn_mult_rule_matches_nemotron_51b_and_is_inverted_exactly():
    # Llama-3.1-70B: hidden 8192, intermediate 28672 == ffn_mult 5.25 in Nemotron-51B's config
    assert ffn_mult_to_intermediate_size(5.25, 8192) == 28672
    assert intermediate_size_to_ffn_mult(28672, 8192) == 5.25
    for hidden in (256, 2048, 4096, 5120, 8192, 16384):
        for size in range(256, 8 * hidden, 256):
            m = intermediate_size_to_ffn_mult(size, hidden)
            assert ffn_mult_to_intermediate_size(m, hidden) == size
    assert intermediate_size_to_ffn_mult(1000, 4096) is None


def test_megatron_heterogeneous_config_parses_our_json_to_the_same_sizes():
    from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

    a = mixed_arch()
    cfg = HeterogeneousTransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        heterogeneous_layers_config_encoded_json=json.dumps(a.to_megatron_json()), use_cpu_initialization=True)
    for layer, p in zip(a.layers, cfg.per_block_parameters):
        assert p.attention.num_query_groups == layer.attention.num_kv_heads
        assert p.attention.no_op == (layer.attention.kind == "no_op")
        assert p.attention.replace_with_linear == (layer.attention.kind == "linear")
        assert p.mlp.ffn_hidden_size == layer.ffn.intermediate_size
        assert p.mlp.no_op == (layer.ffn.kind == "no_op")
        assert p.mlp.replace_with_linear == (layer.ffn.kind == "linear")
    # Megatron also reads the plain HF DeciLM json (ffn_mult / n_heads_in_group) the same way
    plain = a.with_layers(a.layers[:4])
    cfg2 = HeterogeneousTransformerConfig(
        num_layers=4, hidden_size=256, num_attention_heads=8,
        heterogeneous_layers_config_encoded_json=json.dumps(plain.to_hf_config()), use_cpu_initialization=True)
    assert [p.mlp.ffn_hidden_size for p in cfg2.per_block_parameters] == [1024, 768, None, None]
    assert [p.attention.num_query_groups for p in cfg2.per_block_parameters] == [4, 2, None, None]


def test_exact_parameter_counts():
    a = mixed_arch()
    h, d = 256, 32
    assert a.attention_params(A("gqa", 2)) == h * 8 * d + 2 * h * 2 * d + 8 * d * h + h
    assert a.attention_params(A("linear")) == h * h + h
    assert a.attention_params(A("no_op")) == 0
    assert a.ffn_params(F("mlp", 768)) == 3 * h * 768 + h
    assert a.ffn_params(F("linear")) == h * h + h
    assert a.ffn_params(F("no_op")) == 0
    per_layer = sum(a.layer_params(i) for i in range(5))
    assert a.num_params() == 512 * 256 + 256 + per_layer  # tied: one embedding matrix
    assert a.kv_cache_bytes_per_token(2) == 2 * 2 * d * (4 + 2 + 1)


def test_reads_a_plain_llama_config_including_transformers5_rope_parameters():
    from transformers import LlamaConfig

    c = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    rope_theta=500000.0)
    a = Architecture.from_hf_config(c.to_dict())
    assert a.layers == (LayerArch(A("gqa", 2), F("mlp", 160)),) * 3
    assert a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"
    assert a.rope_scaling["factor"] == 8.0 and a.max_position_embeddings == 16384
    # the Llama-3.1 style (rope_theta + rope_scaling at top level) reads the same
    legacy = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3, "vocab_size": 256,
              "num_key_value_heads": 2, "intermediate_size": 160, "rope_theta": 500000.0,
              "max_position_embeddings": 16384, "rope_scaling": dict(a.rope_scaling),
              "rms_norm_eps": a.rms_norm_eps, "bos_token_id": a.bos_token_id, "eos_token_id": a.eos_token_id}
    assert Architecture.from_hf_config(legacy) == a


def test_search_space_enumerates_per_layer_variants():
    parent = Architecture.homogeneous(vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=8,
                                      num_kv_heads=4, intermediate_size=1024)
    ss = SearchSpace(kv_heads=(8, 4, 2, 1), ffn_fractions=(0.75, 0.5, 0.25, 0.1))
    assert [v.name for v in ss.attention_variants(parent, 0)] == ["gqa_kv4", "gqa_kv2", "gqa_kv1", "linear", "no_op"]
    # 0.1 * 1024 rounds up to one granule (256), deduplicated with 0.25
    assert [v.name for v in ss.ffn_variants(parent, 0)] == ["mlp_1024", "mlp_768", "mlp_512", "mlp_256",
                                                            "linear", "no_op"]
    fine = SearchSpace(ffn_fractions=(0.5, 0.1), ffn_granularity=32, attention_linear=False, ffn_no_op=False)
    assert [v.name for v in fine.ffn_variants(parent, 1)] == ["mlp_1024", "mlp_512", "mlp_128", "linear"]
    assert [v.name for v in fine.attention_variants(parent, 1)] == ["gqa_kv4", "gqa_kv2", "gqa_kv1", "no_op"]
    assert len(ss.layer_variants(parent, 0)) == 5 * 6
    with pytest.raises(ArchitectureError, match="unknown search_space keys"):
        SearchSpace.from_dict({"kv_head": [2]})


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["block_configs"][1]["attention"].update(n_heads_in_group=3),
     "n_heads_in_group 3 does not divide num_attention_heads 8"),
    (lambda d: d["block_configs"].pop(), "block_configs has 4 entries but num_hidden_layers is 5"),
    (lambda d: d["block_configs"].__setitem__(0, {"attention": {}}), "block_configs[0] is malformed"),
    (lambda d: d.__setitem__("block_configs", "oops"), "block_configs must be a list"),
    (lambda d: d["block_configs"][0]["ffn"].update(ffn_mult=None), "ffn_mult must be a positive number"),
    (lambda d: d["block_configs"][2]["attention"].update(no_op=True), "both no_op and replace_with_linear"),
    (lambda d: d.pop("hidden_size"), "HF config lacks a valid 'hidden_size'"),
])
def test_bad_hf_configs_give_one_line_errors(mutate, message):
    d = mixed_arch().to_hf_config()
    mutate(d)
    with pytest.raises(ArchitectureError) as e:
        Architecture.from_hf_config(d)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_architectures_and_tp_give_one_line_errors():
    with pytest.raises(ArchitectureError, match="num_kv_heads 3 does not divide num_attention_heads 8"):
        Architecture.homogeneous(vocab_size=64, hidden_size=64, num_layers=1, num_attention_heads=8,
                                 num_kv_heads=3, intermediate_size=128)
    a = mixed_arch()
    with pytest.raises(ArchitectureError, match="tensor parallel size 2 does not divide num_kv_heads 1"):
        a.validate_tensor_parallel(2)
    with pytest.raises(ArchitectureError, match="tensor parallel size 3 does not divide num_attention_heads"):
        a.validate_tensor_parallel(3)
    with pytest.raises(ArchitectureError, match="gqa attention needs num_kv_heads"):
        A("gqa")
    with pytest.raises(ArchitectureError, match="ffn kind 'moe' unknown"):
        F("moe")


def test_load_architecture_reads_both_formats(tmp_path):
    a = mixed_arch()
    (tmp_path / "arch.json").write_text(a.to_json())
    (tmp_path / "config.json").write_text(json.dumps(a.to_hf_config()))
    assert load_architecture(str(tmp_path / "arch.json")) == a
    assert load_architecture(str(tmp_path / "config.json")) == a
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArchitectureError, match="is not valid json"):
        load_architecture(str(tmp_path / "bad.json"))


def test_vllm_preset_gives_a_search_space_vllm_serves():
    from megapuzzle.arch import ArchitectureError, SearchSpace

    s = SearchSpace.from_dict({"preset": "vllm", "kv_heads": [1], "ffn_fractions": [0.3]})
    assert (s.attention_linear, s.ffn_linear, s.ffn_granularity, s.kv_heads) == (False, False, 256, (1,))
    parent = Architecture(vocab_size=128, hidden_size=512, num_attention_heads=8,
                          layers=[LayerArch(AttentionVariant("gqa", 8), FFNVariant("mlp", 1536))] * 3)
    for l in range(3):  # every child of this space: no linear block, every FFN size writable as ffn_mult
        child = parent.with_layers([LayerArch(a, f) for a, f in zip(s.attention_variants(parent, l),
                                                                      s.ffn_variants(parent, l))])
        assert child.engine_compatible() == []
    with pytest.raises(ArchitectureError, match="preset vllm needs attention_linear: False"):
        SearchSpace.from_dict({"preset": "vllm", "attention_linear": True})
    with pytest.raises(ArchitectureError, match=r"ffn_sizes \[100\] are not multiples of 256"):
        SearchSpace.from_dict({"preset": "vllm", "ffn_sizes": [100]})
    with pytest.raises(ArchitectureError, match="unknown search_space.preset 'trt'"):
        SearchSpace.from_dict({"preset": "trt"})
