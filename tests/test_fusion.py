"""FFN Fusion (megapuzzle.fusion): the fold is exact, the fused child is the parallel-FFN model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as Fv, LayerArch
from megapuzzle.errors import UserError
from megapuzzle.fusion import check_runs, find_runs, fold_ffns, fuse_state_dict, fused_arch

V, H, NQ = 128, 64, 4
EPS32 = torch.finfo(torch.float32).eps


def _rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _ffn(hn, gate, up, down):
    return (F.silu(hn @ gate.T) * (hn @ up.T)) @ down.T


def _rand_ffn(h, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 0.3 * torch.randn(h, generator=g), 0.1 * torch.randn(n, h, generator=g),
            0.1 * torch.randn(n, h, generator=g), 0.1 * torch.randn(h, n, generator=g))


@pytest.mark.parametrize("widths", [(96, 160), (256, 512), (64, 64, 128)])
def test_fold_reproduces_sum_of_parallel_ffns(widths):
    """Dependency cut, the fused FFN equals sum_k F_k(h) within fp32 rounding. The bound is the
    usual probabilistic one for fp32 dot products: |error| <= c * eps * sqrt(n) * sum|terms|,
    propagated from the gate/up dot products (width H) to the down product (summed width N)."""
    parts = [_rand_ffn(H, n, seed) for seed, n in enumerate(widths)]
    x = torch.randn(32, H, generator=torch.Generator().manual_seed(99)) * 3.0
    norm, gate, up, down = fold_ffns(parts)
    assert gate.shape == up.shape == (sum(widths), H) and down.shape == (H, sum(widths))
    assert torch.equal(norm, torch.ones(H))
    fused = _ffn(_rms(x, norm), gate, up, down)
    # float64 reference of the unfused parallel sum
    x64 = x.double()
    ref = sum(_ffn(_rms(x64, g.double()), gt.double(), u.double(), d.double()) for g, gt, u, d in parts)
    # error scale, in float64: each gate/up entry's dot-product magnitude, carried through silu * up
    n64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    g64, u64, d64 = gate.double(), up.double(), down.double()
    a_g, a_u = n64 @ g64.T, n64 @ u64.T
    s_g, s_u = n64.abs() @ g64.abs().T, n64.abs() @ u64.abs().T  # sum |terms| of each dot product
    err_in = 4 * EPS32 * math.sqrt(H)
    dsilu = torch.sigmoid(a_g) * (1 + a_g * (1 - torch.sigmoid(a_g)))
    err_act = err_in * (dsilu.abs() * a_u.abs() * s_g + F.silu(a_g).abs() * s_u) + 2 * EPS32 * (F.silu(a_g) * a_u).abs()
    act = (F.silu(a_g) * a_u).abs()
    bound = 4 * EPS32 * math.sqrt(sum(widths)) * (act @ d64.abs().T) + err_act @ d64.abs().T
    err = (fused.double() - ref).abs()
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3g}"
    # the bound is tight enough to matter: forgetting gamma (a wrong fold) is far outside it
    wrong = _ffn(_rms(x, norm), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), down)
    assert ((wrong.double() - ref).abs() > bound).float().mean() > 0.5


def test_fold_keeps_dtype_and_folds_in_fp32():
    parts = [tuple(t.to(torch.bfloat16) for t in _rand_ffn(H, n, s)) for s, n in enumerate((64, 128))]
    norm, gate, up, down = fold_ffns(parts)
    assert {t.dtype for t in (norm, gate, up, down)} == {torch.bfloat16}
    exact = (parts[0][1].float() * parts[0][0].float()[None, :]).to(torch.bfloat16)
    assert torch.equal(gate[:64], exact)


def _arch(layers, **kw):
    kw.setdefault("max_position_embeddings", 64)
    return Architecture(vocab_size=V, hidden_size=H, num_attention_heads=NQ, layers=tuple(layers), **kw)


G2 = A("gqa", 2)
NO = A("no_op")


def test_find_runs_and_fused_arch_widths():
    # attention, then FFNs of widths 256 and 512 with no attention in between (+ an identity layer)
    arch = Architecture(vocab_size=V, hidden_size=1024, num_attention_heads=8, layers=(
        LayerArch(A("gqa", 8), Fv("mlp", 2048)),
        LayerArch(A("gqa", 2), Fv("mlp", 256)),
        LayerArch(NO, Fv("no_op")),
        LayerArch(NO, Fv("mlp", 512)),
        LayerArch(A("gqa", 8), Fv("mlp", 2048)),
        LayerArch(NO, Fv("linear")),
    ))
    assert find_runs(arch) == [(1, 3)]
    assert find_runs(arch, leading_attention=False) == []
    assert find_runs(arch, max_run=2) == []  # (1, 2) holds only one MLP
    new = fused_arch(arch, [(1, 3)])
    assert new.layers[1] == LayerArch(A("gqa", 2), Fv("mlp", 768))
    assert new.layers[2] == new.layers[3] == LayerArch(NO, Fv("no_op"))
    assert new.layers[4:] == arch.layers[4:] and new.layers[0] == arch.layers[0]
    # 768 is a multiple of 256: written as ffn_mult, which TRT-LLM / vLLM read, and read back the same
    bc = new.block_configs()[1]["ffn"]
    assert bc["ffn_mult"] is not None and "intermediate_size" not in bc
    assert Architecture.from_hf_config(new.to_hf_config()) == new
    assert new.engine_compatible() == arch.engine_compatible()
    # fusing saves exactly the extra norms' parameters
    assert arch.num_params() - new.num_params() == 1024
    with pytest.raises(UserError):
        check_runs(arch, [(0, 1)])  # layer 1 has attention
    with pytest.raises(UserError):
        check_runs(arch, [(3, 4)])


def _parallel_reference(arch: Architecture, sd, tokens, runs):
    """Plain-torch DeciLM forward where the FFNs of each run read the run's input (parallel FFNs)."""
    d, nq = arch.kv_channels, arch.num_attention_heads
    b, s = tokens.shape
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2).double() / d))
    ang = torch.outer(torch.arange(s).double(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda x: torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    mask = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)
    sd = {k: v.double() for k, v in sd.items()}
    run_of = {k: (i, j) for i, j in runs for k in range(i, j + 1)}
    x = sd["model.embed_tokens.weight"][tokens]
    run_in = None
    for i, layer in enumerate(arch.layers):
        p = f"model.layers.{i}."
        a, f = layer.attention, layer.ffn
        if a.kind == "gqa":
            hn = _rms(x, sd[p + "input_layernorm.weight"])
            q = (hn @ sd[p + "self_attn.q_proj.weight"].T).view(b, s, nq, d).transpose(1, 2)
            k = (hn @ sd[p + "self_attn.k_proj.weight"].T).view(b, s, a.num_kv_heads, d).transpose(1, 2)
            v = (hn @ sd[p + "self_attn.v_proj.weight"].T).view(b, s, a.num_kv_heads, d).transpose(1, 2)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            k, v = (t.repeat_interleave(nq // a.num_kv_heads, dim=1) for t in (k, v))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, -1)
            x = x + (att @ v).transpose(1, 2).reshape(b, s, nq * d) @ sd[p + "self_attn.o_proj.weight"].T
        if i in run_of and run_of[i][0] == i:
            run_in = x  # every FFN of the run reads this
        src = run_in if i in run_of else x
        if f.kind == "mlp":
            x = x + _ffn(_rms(src, sd[p + "post_attention_layernorm.weight"]), sd[p + "mlp.gate_proj.weight"],
                         sd[p + "mlp.up_proj.weight"], sd[p + "mlp.down_proj.weight"])
    return _rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


@pytest.fixture(scope="module")
def dist1():
    from megapuzzle.runtime import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    info = init_distributed(tp=1, pp=1, seed=1234)
    yield info
    destroy_distributed()


def test_fused_child_forward_equals_parallel_ffn_reference(dist1):
    from megapuzzle.model import build_gpt_model, forward_logits, init_random_canonical, load_canonical_into_model

    arch = _arch([LayerArch(G2, Fv("mlp", 96)), LayerArch(G2, Fv("mlp", 64)), LayerArch(NO, Fv("mlp", 128)),
                  LayerArch(NO, Fv("no_op")), LayerArch(NO, Fv("mlp", 32)), LayerArch(A("gqa", 4), Fv("mlp", 96)),
                  LayerArch(NO, Fv("mlp", 64))])
    # layer 0's FFN is followed by layer 1's attention, so the first run starts at layer 1:
    # gqa+64, no_op+128, the identity layer, no_op+32; then gqa+96, no_op+64
    runs = find_runs(arch)
    assert runs == [(1, 4), (5, 6)]
    assert find_runs(arch, max_run=3) == [(1, 2), (5, 6)]
    sd = init_random_canonical(arch, seed=3, std=0.1, norm_std=0.3)
    new, fused_sd = fuse_state_dict(arch, sd, runs)
    assert new.layers[1].ffn == Fv("mlp", 224) and new.layers[5].ffn == Fv("mlp", 160)
    model = build_gpt_model(new)
    load_canonical_into_model(model, fused_sd)
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = forward_logits(model, tokens).double()
    ref = _parallel_reference(arch, sd, tokens, runs)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, rel
    # and it is a different model from the sequential parent (the fusion is an approximation)
    seq = _parallel_reference(arch, sd, tokens, [])
    assert ((seq - ref).abs().max() / ref.abs().max()).item() > 1e-3


def test_a_run_block_can_start_from_narrower_library_ffns():
    """init_run_block(ffn_locals=...) folds the given (pruned, trained) FFNs, not the parent's: its
    width is their sum and its tensors are exactly fold_ffns of them."""
    from megapuzzle.fusion import fold_ffns
    from megapuzzle.stages.fusion_runs import FFN_NAMES, init_run_block

    torch.manual_seed(0)
    parent = Architecture.homogeneous(vocab_size=128, hidden_size=16, num_layers=3, num_attention_heads=2,
                                      num_kv_heads=2, intermediate_size=64)
    tensors = {}
    for k in range(3):
        p = f"model.layers.{k}."
        tensors.update({p + "input_layernorm.weight": torch.rand(16) + 0.5,
                        p + "self_attn.q_proj.weight": torch.randn(16, 16), p + "self_attn.k_proj.weight": torch.randn(16, 16),
                        p + "self_attn.v_proj.weight": torch.randn(16, 16), p + "self_attn.o_proj.weight": torch.randn(16, 16),
                        p + "post_attention_layernorm.weight": torch.rand(16) + 0.5,
                        p + "mlp.gate_proj.weight": torch.randn(64, 16), p + "mlp.up_proj.weight": torch.randn(64, 16),
                        p + "mlp.down_proj.weight": torch.randn(16, 64)})
    narrow = [{"post_attention_layernorm.weight": torch.rand(16) + 0.5, "mlp.gate_proj.weight": torch.randn(32, 16),
               "mlp.up_proj.weight": torch.randn(32, 16), "mlp.down_proj.weight": torch.randn(16, 32)} for _ in range(2)]
    layer, local = init_run_block(parent, tensors, 1, 2, narrow)
    assert layer.ffn.intermediate_size == 64 and layer.attention == parent.layers[1].attention
    norm, gate, up, down = fold_ffns([tuple(f[n] for n in FFN_NAMES) for f in narrow])
    for name, t in zip(FFN_NAMES, (norm, gate, up, down)):
        assert torch.equal(local[name], t)
    assert torch.equal(local["self_attn.q_proj.weight"], tensors["model.layers.1.self_attn.q_proj.weight"])
    full, _ = init_run_block(parent, tensors, 1, 2)
    assert full.ffn.intermediate_size == 128  # the parent's own: 64 + 64
