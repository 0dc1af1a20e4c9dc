"""Megatron-core GPTModel built from an Architecture: sizes, config parsing, numerics (vs HF Llama
and a plain-torch DeciLM reference), canonical weights, RoPE scaling, and clear errors. One
process (world 1, gloo on CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megapuzzle.arch import Architecture, ArchitectureError, AttentionVariant as A, FFNVariant as Fv, LayerArch
from megapuzzle.model import (
    ModelConfigError,
    WeightsError,
    build_gpt_model,
    canonical_shapes,
    capture_layer_inputs,
    forward_hidden_states,
    forward_logits,
    gather_canonical_from_model,
    init_random_canonical,
    llama3_inv_freq,
    load_canonical_into_model,
    make_transformer_config,
    stage_layer_ranges,
)
from megapuzzle.runtime import destroy_distributed, init_distributed

V, H, NQ = 128, 64, 4

# Five layers covering all six subblock kinds (gqa / linear / no_op attention, mlp / linear /
# no_op FFN); every KV count is even so the same model also runs at TP=2.
MIXED = (
    LayerArch(A("gqa", 2), Fv("mlp", 96)),
    LayerArch(A("linear"), Fv("linear")),
    LayerArch(A("no_op"), Fv("mlp", 64)),
    LayerArch(A("gqa", 4), Fv("no_op")),
    LayerArch(A("no_op"), Fv("linear")),
)


def tiny(layers=MIXED, **kw) -> Architecture:
    kw.setdefault("max_position_embeddings", 64)
    return Architecture(vocab_size=V, hidden_size=H, num_attention_heads=NQ, layers=layers, **kw)


@pytest.fixture(scope="module", autouse=True)
def dist1():
    torch.set_num_threads(1)
    info = init_distributed(tp=1, pp=1, seed=1234)
    yield info
    destroy_distributed()


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


# ----------------------------------------------------------------------------- sizes and config

@pytest.mark.parametrize("tied", [False, True])
def test_param_counts_match_architecture(tied):
    layers = MIXED + (LayerArch(A("gqa", 1), Fv("mlp", 40)), LayerArch(A("no_op"), Fv("no_op")))
    arch = tiny(layers, tie_word_embeddings=tied)
    model = build_gpt_model(arch)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == arch.num_params()
    for j, layer in enumerate(arch.layers):
        pre = f"decoder.layers.{j}."
        attn = sum(p.numel() for n, p in params.items()
                   if n.startswith(pre + "input_layernorm") or n.startswith(pre + "self_attention"))
        ffn = sum(p.numel() for n, p in params.items()
                  if n.startswith(pre + "pre_mlp_layernorm") or n.startswith(pre + "mlp"))
        assert attn == arch.attention_params(layer.attention), (j, layer.name)
        assert ffn == arch.ffn_params(layer.ffn), (j, layer.name)
        assert attn + ffn == arch.layer_params(j)


def test_megatron_parses_our_json_per_layer():
    arch = tiny()
    cfg = make_transformer_config(arch, tp=1, pp=1)
    assert len(cfg.per_block_parameters) == arch.num_layers
    for i, (layer, block) in enumerate(zip(arch.layers, cfg.per_block_parameters)):
        assert block.attention.no_op == (layer.attention.kind == "no_op")
        assert block.attention.replace_with_linear == (layer.attention.kind == "linear")
        assert block.mlp.no_op == (layer.ffn.kind == "no_op")
        assert block.mlp.replace_with_linear == (layer.ffn.kind == "linear")
        lc = cfg.get_config_for_layer(i + 1)
        if layer.attention.kind == "gqa":
            assert block.attention.num_query_groups == layer.attention.num_kv_heads
            assert lc.num_query_groups == layer.attention.num_kv_heads
        if layer.ffn.kind == "mlp":
            assert block.mlp.ffn_hidden_size == layer.ffn.intermediate_size
            assert lc.ffn_hidden_size == layer.ffn.intermediate_size


def test_megatron_reads_plain_hf_block_configs_like_we_do():
    """Without the Megatron extras (n_heads_in_group / ffn_mult only) Megatron's rules agree."""
    from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

    arch = tiny((LayerArch(A("gqa", 1), Fv("mlp", 256)), LayerArch(A("gqa", 4), Fv("mlp", 512)),
                 LayerArch(A("linear"), Fv("no_op"))))
    hf = arch.to_hf_config()
    assert all("ffn_hidden_size" not in b["ffn"] for b in hf["block_configs"])
    cfg = HeterogeneousTransformerConfig(
        num_layers=3, hidden_size=H, num_attention_heads=NQ, heterogeneous_layers_config_encoded_json=json.dumps(hf),
        use_cpu_initialization=True)
    got = [(b.attention.num_query_groups, b.mlp.ffn_hidden_size) for b in cfg.per_block_parameters]
    assert got == [(1, 256), (4, 512), (None, None)]
    assert Architecture.from_hf_config(hf) == arch


def test_stage_layer_ranges():
    assert stage_layer_ranges(5, 1) == [range(0, 5)]
    assert stage_layer_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layer_ranges(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    assert stage_layer_ranges(8, 3) == [range(0, 3), range(3, 5), range(5, 8)]
    assert stage_layer_ranges(9, 4) == [range(0, 3), range(3, 5), range(5, 7), range(7, 9)]
    with pytest.raises(ModelConfigError) as e:
        stage_layer_ranges(2, 3)
    _one_line(e)


# ----------------------------------------------------------------------------- numerics

def test_forward_backward_every_param_gets_gradient():
    arch = tiny()
    model = build_gpt_model(arch)
    load_canonical_into_model(model, init_random_canonical(arch, seed=3, std=0.1, norm_std=0.1))
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = forward_logits(model, tokens)
    assert logits.shape == (2, 12, V) and torch.isfinite(logits).all()
    F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def _hf_llama(arch: Architecture, sd):
    from transformers import LlamaConfig, LlamaForCausalLM

    layer = arch.layers[0]
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling:
        rope = {**arch.rope_scaling, "rope_theta": arch.rope_theta}
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=layer.ffn.intermediate_size,
                      num_hidden_layers=arch.num_layers, num_attention_heads=NQ,
                      num_key_value_heads=layer.attention.num_kv_heads, head_dim=arch.kv_channels,
                      rms_norm_eps=arch.rms_norm_eps, rope_parameters=rope,
                      tie_word_embeddings=arch.tie_word_embeddings, max_position_embeddings=64,
                      attention_bias=False, mlp_bias=False)
    cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if arch.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.mark.parametrize("tied,rope", [(False, None), (True, LLAMA3)])
def test_logits_match_hf_llama(tied, rope):
    """Same canonical tensors in HF LlamaForCausalLM and our Megatron model: same logits. This is
    what shows that no q/k row permutation is needed (both rotate halves)."""
    arch = Architecture.homogeneous(vocab_size=V, hidden_size=H, num_layers=3, num_attention_heads=NQ,
                                    num_kv_heads=2, intermediate_size=96, tie_word_embeddings=tied,
                                    rope_theta=500000.0, rope_scaling=rope, max_position_embeddings=64)
    sd = init_random_canonical(arch, seed=1, std=0.1, norm_std=0.1)
    model = build_gpt_model(arch)
    load_canonical_into_model(model, sd)
    hf = _hf_llama(arch, sd)
    tokens = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = forward_logits(model, tokens), hf(tokens).logits
    assert _rel(ours, ref) < 1e-5


def _reference_forward(arch: Architecture, sd, tokens):
    """DeciLM semantics in plain torch: no-op = nothing, linear = x + W norm(x)."""
    d, nq = arch.kv_channels, arch.num_attention_heads
    rms = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + arch.rms_norm_eps))
    b, s = tokens.shape
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(s).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda x: torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    mask = torch.full((s, s), float("-inf")).triu(1)
    x = sd["model.embed_tokens.weight"][tokens]
    for i, layer in enumerate(arch.layers):
        p = f"model.layers.{i}."
        a, f = layer.attention, layer.ffn
        if a.kind == "gqa":
            hn = rms(x, sd[p + "input_layernorm.weight"])
            q = (hn @ sd[p + "self_attn.q_proj.weight"].T).view(b, s, nq, d).transpose(1, 2)
            k = (hn @ sd[p + "self_attn.k_proj.weight"].T).view(b, s, a.num_kv_heads, d).transpose(1, 2)
            v = (hn @ sd[p + "self_attn.v_proj.weight"].T).view(b, s, a.num_kv_heads, d).transpose(1, 2)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            k, v = (t.repeat_interleave(nq // a.num_kv_heads, dim=1) for t in (k, v))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, -1)
            x = x + (att @ v).transpose(1, 2).reshape(b, s, nq * d) @ sd[p + "self_attn.o_proj.weight"].T
        elif a.kind == "linear":
            x = x + rms(x, sd[p + "input_layernorm.weight"]) @ sd[p + "self_attn.linear_attn.weight"].T
        if f.kind == "mlp":
            hn = rms(x, sd[p + "post_attention_layernorm.weight"])
            x = x + (F.silu(hn @ sd[p + "mlp.gate_proj.weight"].T) * (hn @ sd[p + "mlp.up_proj.weight"].T)
                     ) @ sd[p + "mlp.down_proj.weight"].T
        elif f.kind == "linear":
            x = x + rms(x, sd[p + "post_attention_layernorm.weight"]) @ sd[p + "mlp.linear_mlp.weight"].T
    head = sd["model.embed_tokens.weight"] if arch.tie_word_embeddings else sd["lm_head.weight"]
    return rms(x, sd["model.norm.weight"]) @ head.T


@pytest.mark.parametrize("tied", [False, True])
def test_mixed_variants_match_plain_torch_reference(tied):
    arch = tiny(tie_word_embeddings=tied)
    sd = init_random_canonical(arch, seed=2, std=0.1, norm_std=0.1)
    model = build_gpt_model(arch)
    load_canonical_into_model(model, sd)
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(forward_logits(model, tokens), _reference_forward(arch, sd, tokens)) < 1e-5


def test_hidden_states_are_the_residual_stream():
    arch = tiny()
    sd = init_random_canonical(arch, seed=4, std=0.1, norm_std=0.1)
    model = build_gpt_model(arch)
    load_canonical_into_model(model, sd)
    tokens = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(4))
    logits, hidden = forward_hidden_states(model, tokens)
    assert sorted(hidden) == list(range(arch.num_layers + 1))
    assert torch.equal(hidden[0], sd["model.embed_tokens.weight"][tokens])
    assert not torch.equal(hidden[2], hidden[3])  # layer 2 (no-op attn + MLP) changes the stream
    final = hidden[arch.num_layers]
    normed = final * torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + arch.rms_norm_eps) * sd["model.norm.weight"]
    assert _rel(normed @ sd["lm_head.weight"].T, logits) < 1e-5
    with capture_layer_inputs(model, layers=[1]) as store, torch.no_grad():
        forward_logits(model, tokens[:1])
        forward_logits(model, tokens[1:])
    assert list(store) == [1] and len(store[1]) == 2
    assert torch.equal(torch.cat(store[1]), hidden[1])


# ----------------------------------------------------------------------------- RoPE scaling

def test_llama3_rope_matches_hf_and_megatron_where_it_can():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in (dict(LLAMA3, original_max_position_embeddings=8192),  # Llama-3.1 values
                    dict(LLAMA3, factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0)):
        arch = tiny(rope_theta=500000.0, rope_scaling=scaling)
        cfg = LlamaConfig(hidden_size=H, num_attention_heads=NQ, head_dim=arch.kv_channels,
                          rope_parameters={**scaling, "rope_theta": arch.rope_theta})
        hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        ours = llama3_inv_freq(arch)
        torch.testing.assert_close(ours, hf_inv, rtol=1e-6, atol=0)
        model = build_gpt_model(arch)
        assert torch.equal(model.rotary_pos_emb.inv_freq.cpu(), ours)
        meg = RotaryEmbedding(kv_channels=arch.kv_channels, rotary_percent=1.0, rotary_base=arch.rope_theta,
                              rope_scaling=True, rope_scaling_factor=scaling["factor"],
                              use_cpu_initialization=True).inv_freq
        # Megatron's own scaling hard-codes the Llama-3.1 low/high/original values: equal there,
        # different elsewhere, which is why build_gpt_model installs the HF formula.
        same = torch.allclose(meg, hf_inv, rtol=1e-6, atol=0)
        assert same == (scaling["original_max_position_embeddings"] == 8192)


# ----------------------------------------------------------------------------- canonical weights

@pytest.mark.parametrize("tied", [False, True])
def test_canonical_roundtrip_is_exact(tied):
    arch = tiny(tie_word_embeddings=tied)
    sd = init_random_canonical(arch, seed=5, norm_std=0.1)
    assert list(sd) == list(canonical_shapes(arch))
    model = build_gpt_model(arch)
    load_canonical_into_model(model, sd)
    back = gather_canonical_from_model(model)
    assert list(back) == list(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    assert ("lm_head.weight" in sd) is not tied


def test_canonical_names_follow_decilm():
    names = set(canonical_shapes(tiny()))
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.self_attn.linear_attn.weight" in names
    assert "model.layers.1.mlp.linear_mlp.weight" in names
    assert not any(n.startswith("model.layers.2.input_layernorm") for n in names)  # no-op attention
    assert not any(n.startswith("model.layers.3.post_attention_layernorm") for n in names)  # no-op FFN


def test_bad_weights_raise_one_line_errors():
    arch = tiny()
    model = build_gpt_model(arch)
    sd = init_random_canonical(arch)
    missing = {k: v for k, v in sd.items() if k != "model.layers.0.mlp.up_proj.weight"}
    with pytest.raises(WeightsError) as e:
        load_canonical_into_model(model, missing)
    assert "missing" in _one_line(e) and "up_proj" in str(e.value)
    with pytest.raises(WeightsError) as e:
        load_canonical_into_model(model, {**sd, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    assert "unexpected" in _one_line(e)
    bad = dict(sd, **{"model.layers.3.self_attn.k_proj.weight": torch.zeros(32, H)})
    with pytest.raises(WeightsError) as e:
        load_canonical_into_model(model, bad)
    assert "k_proj" in _one_line(e) and "[64, 64]" in str(e.value)
    other = tiny(MIXED[:4] + (LayerArch(A("linear"), Fv("no_op")),))
    with pytest.raises(WeightsError) as e:
        load_canonical_into_model(model, init_random_canonical(other), arch)
    _one_line(e)


# ----------------------------------------------------------------------------- bad inputs

def test_kv_heads_not_dividing_query_heads():
    with pytest.raises(ArchitectureError) as e:
        tiny((LayerArch(A("gqa", 3), Fv("mlp", 96)),))
    assert "does not divide" in _one_line(e)


def test_tp_not_dividing_kv_heads():
    arch = tiny((LayerArch(A("gqa", 1), Fv("mlp", 96)),))
    with pytest.raises(ArchitectureError) as e:
        build_gpt_model(arch, tp=2)
    assert "num_kv_heads" in _one_line(e)
    with pytest.raises(ArchitectureError) as e:
        make_transformer_config(arch, tp=2, pp=1)
    _one_line(e)


@pytest.mark.parametrize("blocks,words", [
    ("not a list", "must be a list"),
    ([{"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False}}], "malformed"),
    ([{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0}}] * 2, "num_hidden_layers"),
    ([{"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 1.0}}], "does not divide"),
    ([{"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"no_op": True}}], "pick one"),
])
def test_malformed_block_configs(blocks, words):
    cfg = {"vocab_size": V, "hidden_size": H, "num_attention_heads": NQ, "num_hidden_layers": 1,
           "block_configs": blocks}
    with pytest.raises(ArchitectureError) as e:
        Architecture.from_hf_config(cfg)
    assert words in _one_line(e)


def test_fp8_without_te_or_gpu_fails_at_once():
    with pytest.raises(ModelConfigError) as e:
        build_gpt_model(tiny(), fp8=True)
    assert "fp8" in _one_line(e)


def test_unsupported_rope_scaling_and_use_te_on_cpu():
    with pytest.raises(ModelConfigError) as e:
        build_gpt_model(tiny(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    assert "yarn" in _one_line(e)
    if not torch.cuda.is_available():
        with pytest.raises(ModelConfigError) as e:
            build_gpt_model(tiny(), use_te=True)
        _one_line(e)


# ----------------------------------------------------------------------------- CPU bridges

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU bridges apply only without CUDA")
def test_cpu_compat_is_idempotent_narrow_and_keeps_rng_semantics():
    import megatron.core.transformer.utils as mutils
    from megatron.core import tensor_parallel

    from megapuzzle.runtime import apply_cpu_compat
    from megapuzzle.runtime.cpu_compat import _TORCH_VIEW_MODULES

    assert apply_cpu_compat() and apply_cpu_compat()
    assert mutils.get_default_causal_mask(4).device.type == "cpu"
    with pytest.raises(Exception):  # the real torch.cuda is untouched for everyone else
        torch.cuda.current_device()
    assert len(_TORCH_VIEW_MODULES) >= 10
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # fork() leaves the default stream alone
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # ...and the tracked stream advances
    with tracker.fork("data-parallel-rng"):
        c = torch.rand(4)
    assert not torch.equal(a, c)
