"""Child initialisation (megapuzzle.init): shapes, exactness at full size, the channel ranking
against a brute-force loop, and the linear-attention / linear-FFN formulas checked numerically
against plain-torch reference subblocks. Pure torch, no Megatron."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as Fv, LayerArch, SearchSpace
from megapuzzle.checkpoints.canonical import expected_canonical_shapes
from megapuzzle.init import (
    InitError,
    expand_v,
    ffn_channel_contributions,
    ffn_intermediate,
    init_attention,
    init_ffn,
    linear_attention,
    linear_ffn,
    local_layer_tensors,
    pool_kv_heads,
    prune_ffn,
    top_channels,
)
from megapuzzle.model.weights import init_random_canonical

H, NQ, KV, D, I = 32, 8, 4, 4, 96
EPS = 1e-5


def parent_arch(kv=KV, inter=I) -> Architecture:
    return Architecture.homogeneous(vocab_size=64, hidden_size=H, num_layers=1, num_attention_heads=NQ,
                                    num_kv_heads=kv, intermediate_size=inter)


@pytest.fixture(scope="module")
def parent():
    torch.manual_seed(0)
    arch = parent_arch()
    local = local_layer_tensors(init_random_canonical(arch, seed=3, std=0.2, norm_std=0.2), 0)
    return arch, local


def _x(seed=1, b=2, s=7):
    return torch.randn(b, s, H, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- references

def rms(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def rope(x, theta=10000.0):
    """HF rotate-half RoPE on [b, heads, s, d]."""
    s, d = x.shape[2], x.shape[3]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).double() / d)
    ang = torch.outer(torch.arange(s).double(), inv)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype), torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention_ref(t, x, num_kv, mask="causal"):
    """Plain-torch GQA subblock update (without the residual): o_proj(attn(norm(x)))."""
    b, s, _ = x.shape
    xn = rms(x, t["input_layernorm.weight"])
    q = (xn @ t["self_attn.q_proj.weight"].T).view(b, s, NQ, D).transpose(1, 2)
    k = (xn @ t["self_attn.k_proj.weight"].T).view(b, s, num_kv, D).transpose(1, 2)
    v = (xn @ t["self_attn.v_proj.weight"].T).view(b, s, num_kv, D).transpose(1, 2)
    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(NQ // num_kv, dim=1), v.repeat_interleave(NQ // num_kv, dim=1)
    allowed = torch.eye(s, dtype=torch.bool) if mask == "self" else torch.ones(s, s, dtype=torch.bool).tril()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return o.transpose(1, 2).reshape(b, s, NQ * D) @ t["self_attn.o_proj.weight"].T


def ffn_ref(t, x):
    xn = rms(x, t["post_attention_layernorm.weight"])
    return (F.silu(xn @ t["mlp.gate_proj.weight"].T) * (xn @ t["mlp.up_proj.weight"].T)) @ t["mlp.down_proj.weight"].T


# ----------------------------------------------------------------------------- shapes

def test_every_variant_has_the_canonical_shapes(parent):
    arch, local = parent
    space = SearchSpace(kv_heads=(2, 1), ffn_fractions=(0.5, 0.25), ffn_granularity=16)
    scores = ffn_channel_contributions(local, _x(), EPS)
    attns, ffns = space.attention_variants(arch, 0), space.ffn_variants(arch, 0)
    assert [a.name for a in attns] == ["gqa_kv4", "gqa_kv2", "gqa_kv1", "linear", "no_op"]
    assert [f.name for f in ffns] == ["mlp_96", "mlp_48", "mlp_32", "linear", "no_op"]
    for a in attns:
        for f in ffns:
            ta, ma = init_attention(arch, arch.layers[0].attention, a, local)
            tf, mf = init_ffn(arch.layers[0].ffn, f, local, scores)
            want = {k[len("model.layers.0."):]: v for k, v in
                    expected_canonical_shapes(arch.with_layers([LayerArch(a, f)])).items()
                    if k.startswith("model.layers.0.")}
            got = {k: tuple(v.shape) for k, v in {**ta, **tf}.items()}
            assert got == want, (a.name, f.name)
            assert ma == {"gqa_kv4": "parent", "gqa_kv2": "kv_mean_pool", "gqa_kv1": "kv_mean_pool",
                          "linear": "wo_wv", "no_op": "no_op"}[a.name]
            assert mf == {"mlp_96": "parent", "mlp_48": "channel_contribution", "mlp_32": "channel_contribution",
                          "linear": "wdown_wup", "no_op": "no_op"}[f.name]


def test_parent_variant_is_the_parent_unchanged(parent):
    arch, local = parent
    ta, _ = init_attention(arch, arch.layers[0].attention, arch.layers[0].attention, local)
    tf, _ = init_ffn(arch.layers[0].ffn, arch.layers[0].ffn, local)
    assert set(ta) | set(tf) == set(local)
    for k, v in {**ta, **tf}.items():
        assert torch.equal(v, local[k])


def test_impossible_inits_fail_in_one_line(parent):
    arch, local = parent
    with pytest.raises(InitError, match="calibration"):
        init_ffn(Fv("mlp", I), Fv("mlp", 48), local, None)
    with pytest.raises(InitError, match="grow"):
        init_ffn(Fv("mlp", I), Fv("mlp", 2 * I), local, torch.ones(I))
    with pytest.raises(InitError, match="divide"):
        pool_kv_heads(local, 4, 3, D)
    with pytest.raises(InitError):
        init_attention(arch, A("linear"), A("gqa", 2), local)


# ----------------------------------------------------------------------------- full size is exact

def test_full_size_pruning_and_all_kv_heads_reproduce_the_parent(parent):
    arch, local = parent
    x = _x()
    scores = ffn_channel_contributions(local, x, EPS)
    full = prune_ffn(local, top_channels(scores, I))
    for k, v in full.items():
        assert torch.equal(v, local[k]), k  # all channels, original order
    assert torch.equal(ffn_ref(full, x), ffn_ref(local, x))
    same = pool_kv_heads(local, KV, KV, D)
    for k, v in same.items():
        assert torch.equal(v, local[k]), k
    assert torch.equal(attention_ref(same, x, KV), attention_ref(local, x, KV))


# ----------------------------------------------------------------------------- FFN pruning

def test_channel_contribution_equals_a_brute_force_loop(parent):
    _, local = parent
    x = _x(seed=5, b=3, s=11)
    got = ffn_channel_contributions(local, x, EPS)
    xn = rms(x, local["post_attention_layernorm.weight"]).reshape(-1, H).double()
    wg, wu, wd = (local[f"mlp.{n}_proj.weight"].double() for n in ("gate", "up", "down"))
    brute = torch.empty(I, dtype=torch.float64)
    for i in range(I):  # one channel at a time, straight from the definition
        xi = F.silu(xn @ wg[i]) * (xn @ wu[i])
        brute[i] = xi.abs().mean() * wd[:, i].norm()
    torch.testing.assert_close(got, brute, rtol=1e-5, atol=0)
    assert torch.equal(torch.argsort(got, descending=True)[:20], torch.argsort(brute, descending=True)[:20])
    # the intermediate X is exactly what the FFN multiplies by W_down
    X = ffn_intermediate(local, x, EPS)
    torch.testing.assert_close(X @ local["mlp.down_proj.weight"].T, ffn_ref(local, x), rtol=1e-5, atol=1e-6)


def test_pruning_keeps_the_top_channels_in_original_order(parent):
    _, local = parent
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0, 2.0, 0.0] + [0.01] * (I - 6), dtype=torch.float64)
    keep = top_channels(scores, 4)
    assert keep.tolist() == [0, 1, 3, 4]
    pruned = prune_ffn(local, keep)
    assert torch.equal(pruned["mlp.gate_proj.weight"], local["mlp.gate_proj.weight"][[0, 1, 3, 4]])
    assert torch.equal(pruned["mlp.down_proj.weight"], local["mlp.down_proj.weight"][:, [0, 1, 3, 4]])
    # the pruned FFN is the parent's with the dropped channels' activations zeroed
    x = _x()
    X = ffn_intermediate(local, x, EPS)
    mask = torch.zeros(I)
    mask[keep] = 1
    torch.testing.assert_close(ffn_ref(pruned, x), (X * mask) @ local["mlp.down_proj.weight"].T, rtol=1e-5, atol=1e-6)


def test_multi_batch_scorer_equals_one_big_batch(parent):
    from megapuzzle.init import FFNChannelScorer

    _, local = parent
    a, b = _x(seed=2), _x(seed=3)
    s = FFNChannelScorer(local, EPS)
    s.update(a)
    s.update(b)
    torch.testing.assert_close(s.scores(), ffn_channel_contributions(local, torch.cat([a, b]), EPS), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- attention

def test_linear_attention_is_attention_with_each_token_attending_to_itself(parent):
    arch, local = parent
    x = _x(seed=4)
    lin = linear_attention(local, NQ, KV, D)
    assert lin["self_attn.linear_attn.weight"].shape == (H, H)
    got = rms(x, lin["input_layernorm.weight"]) @ lin["self_attn.linear_attn.weight"].T
    want = attention_ref(local, x, KV, mask="self")  # causal mask replaced by the identity
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and it is not the causal attention (the test would be vacuous otherwise)
    assert not torch.allclose(got, attention_ref(local, x, KV), atol=1e-3)


def test_expand_v_follows_the_gqa_head_mapping():
    wv = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2 * 3, 5)  # kv=2 heads of d=3
    e = expand_v(wv, num_heads=4, num_kv=2, head_dim=3)
    assert torch.equal(e[0:3], wv[0:3]) and torch.equal(e[3:6], wv[0:3])   # q heads 0, 1 -> kv 0
    assert torch.equal(e[6:9], wv[3:6]) and torch.equal(e[9:12], wv[3:6])  # q heads 2, 3 -> kv 1


def test_kv_pooling_means_each_group_and_is_exact_when_the_group_agrees(parent):
    _, local = parent
    pooled = pool_kv_heads(local, KV, 2, D)
    k = local["self_attn.k_proj.weight"].view(KV, D, H)
    torch.testing.assert_close(pooled["self_attn.k_proj.weight"].view(2, D, H), (k[0::2] + k[1::2]) / 2)
    for n in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.o_proj.weight"):
        assert torch.equal(pooled[n], local[n])
    # if the KV heads of each new group are equal, the pooled 2-KV attention is the 4-KV one
    same = dict(local)
    for n in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        w = local[n].view(KV, D, H).clone()
        w[1], w[3] = w[0], w[2]
        same[n] = w.reshape(KV * D, H)
    x = _x(seed=6)
    torch.testing.assert_close(attention_ref(pool_kv_heads(same, KV, 2, D), x, 2), attention_ref(same, x, KV),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- linear FFN

def test_linear_ffn_is_down_times_up(parent):
    _, local = parent
    lin = linear_ffn(local)
    x = _x(seed=8)
    xn = rms(x, local["post_attention_layernorm.weight"])
    got = xn @ lin["mlp.linear_mlp.weight"].T
    want = (xn @ local["mlp.up_proj.weight"].T) @ local["mlp.down_proj.weight"].T  # the FFN without its gate
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(lin["post_attention_layernorm.weight"], local["post_attention_layernorm.weight"])
