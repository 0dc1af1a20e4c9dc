"""The serving-engine plumbing that needs no engine: the greedy comparison's near-tie rule, and
a missing engine environment is a one-line error naming the command that makes it."""

from __future__ import annotations

import pytest

from megapuzzle.errors import UserError
from megapuzzle.serving.engines import require_python
from megapuzzle.serving.reference import compare_greedy


def test_greedy_comparison_tells_near_ties_from_mismatches():
    want = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    margins = [[1.0, 1.0, 1.0, 1.0], [1.0, 5e-5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    got = [[1, 2, 3, 4], [5, 0, 0, 0], [9, 9, 0, 9]]  # equal; a near-tie at step 1; a real mismatch at step 2
    res = compare_greedy(got, want, margins, tie=1e-4)
    assert res["equal_tokens"] == 4 + 1 + 2 and res["compared_tokens"] == 4 + 2 + 3
    assert [t["prompt"] for t in res["near_ties"]] == [1] and res["near_ties"][0]["step"] == 1
    assert res["mismatches"] == [{"prompt": 2, "step": 2, "got": 0, "want": 9, "margin": 1.0}]
    assert compare_greedy([[1, 2]], [[1, 2, 3]], [[1.0, 1.0, 1.0]], 1e-4)["mismatches"] == [{"prompt": 0, "length": [2, 3]}]


def test_a_missing_engine_environment_names_the_command(monkeypatch, tmp_path):
    import megapuzzle.serving.engines as engines

    monkeypatch.setattr(engines, "REPO_ROOT", tmp_path)  # a checkout without the reader venvs
    monkeypatch.delenv("MEGAPUZZLE_TRANSFORMERS_OLDEST_PYTHON", raising=False)
    with pytest.raises(UserError, match=r"no transformers-oldest environment found; create it with "
                                        r"`tools/make_reader_venvs.sh transformers-oldest`") as e:
        require_python("transformers-oldest")
    assert "\n" not in str(e.value)


def test_vllm_cost_layouts_isolate_one_variant_and_refuse_what_vllm_cannot_run(tmp_path):
    """The synthetic models measure_costs_vllm times: M0 = one anchor layer (the parent's
    attention, FFN no-op); a stack = anchor + k layers of the variant; config-only directories
    our own config class reads back. Linear subblocks are refused before anything runs."""
    import json

    from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as F, LayerArch, SearchSpace
    from megapuzzle.checkpoints.hf_modeling.configuration_decilm import DeciLMConfig
    from megapuzzle.costs.partial import search_space_variants
    from megapuzzle.serving.vllm_costs import m0, refuse_unservable, stack, write_config_dir

    parent = Architecture(vocab_size=256, hidden_size=128, num_attention_heads=4,
                          layers=[LayerArch(A("gqa", 2), F("mlp", 512))] * 3)
    assert [l.name for l in m0(parent).layers] == [LayerArch(A("gqa", 2), F("no_op")).name]
    s = stack(parent, "ffn.mlp_256", 4)
    assert s.layers[0] == m0(parent).layers[0] and s.layers[1:] == (LayerArch(A("no_op"), F("mlp", 256)),) * 4
    assert stack(parent, "attention.gqa_kv1", 2).layers[1:] == (LayerArch(A("gqa", 1), F("no_op")),) * 2
    assert stack(parent, "check.parent", 4) == parent
    d = write_config_dir(s, tmp_path / "s", "float32")
    assert d.is_absolute() and not list(d.glob("*.safetensors"))  # vLLM's dummy loader brings the weights
    cfg = DeciLMConfig(**json.loads((d / "config.json").read_text()))
    assert [cfg.layer_kind(i) for i in range(5)] == [("gqa", "no_op")] + [("no_op", "mlp")] * 4

    attention, ffn = search_space_variants(parent, SearchSpace.from_dict({"preset": "vllm", "kv_heads": [1]}))
    refuse_unservable(parent, attention, ffn)  # the preset's space: nothing refused
    attention, ffn = search_space_variants(parent, SearchSpace.from_dict({"kv_heads": [1], "ffn_sizes": [100]}))
    with pytest.raises(UserError, match=r"^measure.engine vllm cannot run attention.linear, ffn.mlp_100, ffn.linear "
                                        r"\(vLLM has no linear subblocks") as e:
        refuse_unservable(parent, attention, ffn)
    assert "\n" not in str(e.value)


def test_measure_config_knows_the_engines():
    from megapuzzle.stages.measure.measure import MeasureConfig

    assert MeasureConfig().engine == "megatron"
    assert "engine" not in MeasureConfig().measured_settings()  # Megatron runs keep their old signature
    assert MeasureConfig(engine="vllm").measured_settings()["engine"] == "vllm"
    with pytest.raises(UserError, match="measure.engine 'trtllm' unknown; use megatron or vllm"):
        MeasureConfig(engine="trtllm")
    with pytest.raises(UserError, match="engine vllm times wall clock"):
        MeasureConfig(engine="vllm", clock="cpu")
