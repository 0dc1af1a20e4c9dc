"""Sliding-window GQA (`swa`, megapuzzle/blocks/swa.py), the worked example of adding a block kind:
its name and json round trips, the search space and cost hooks, and the same numbers from the
Megatron model, the exported HF modeling file (with and without the KV cache) and a plain float64
reference that masks by hand."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from megapuzzle.arch import (Architecture, ArchitectureError, AttentionVariant as A, FFNVariant as Fv, LayerArch,
                             SearchSpace)
from megapuzzle.roofline import subblock_work

V, H, NQ, W = 128, 64, 4, 5
LAYERS = (LayerArch(A("swa", 2, window=W), Fv("mlp", 96)),
          LayerArch(A("gqa", 2), Fv("mlp", 64)),
          LayerArch(A("swa", 4, window=3), Fv("linear")))


def tiny(layers=LAYERS) -> Architecture:
    return Architecture(vocab_size=V, hidden_size=H, num_attention_heads=NQ, layers=layers, max_position_embeddings=64)


def test_names_json_and_errors():
    v = A("swa", 2, window=W)
    assert v.name == "swa_kv2_w5" and A.from_name("swa_kv2_w5") == v
    assert repr(v) == "AttentionVariant(kind='swa', num_kv_heads=2, window=5)"
    assert repr(A("gqa", 2)) == "AttentionVariant(kind='gqa', num_kv_heads=2)"  # unchanged for the old kinds
    arch = tiny()
    bc = arch.to_hf_config()["block_configs"]
    assert bc[0]["attention"] == {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False, "window_length": W}
    assert "window_length" not in bc[1]["attention"]
    assert Architecture.from_hf_config(json.loads(json.dumps(arch.to_hf_config()))) == arch
    assert Architecture.from_hf_config(arch.to_megatron_json()) == arch
    assert Architecture.from_dict(arch.to_dict()) == arch
    assert arch.engine_compatible()[0] == "layer 0: sliding window 5: TensorRT-LLM and vLLM"
    assert arch.attention_params(v) == arch.attention_params(A("gqa", 2))  # same weights, another mask
    for bad, words in ((lambda: A("swa", 2), "window >= 1"), (lambda: A("gqa", 2, window=4), "takes no window"),
                       (lambda: A("linear", window=4), "takes no window")):
        with pytest.raises(ArchitectureError, match=words):
            bad()
    cfg = arch.to_hf_config()
    cfg["block_configs"][0]["attention"]["window_length"] = 0  # falsy: a plain GQA layer, as DeciLM reads it
    assert Architecture.from_hf_config(cfg).layers[0].attention == A("gqa", 2)
    cfg["block_configs"][0]["attention"]["window_length"] = "8"
    with pytest.raises(ArchitectureError, match=r"block_configs\[0\]\.attention\.window_length must be a positive int"):
        Architecture.from_hf_config(cfg)


def test_search_space_offers_windows_only_when_asked():
    parent = Architecture.homogeneous(vocab_size=V, hidden_size=H, num_layers=2, num_attention_heads=NQ,
                                      num_kv_heads=4, intermediate_size=128, max_position_embeddings=64)
    assert not any(a.kind == "swa" for a in SearchSpace().attention_variants(parent, 0))
    got = [a.name for a in SearchSpace(attention_windows=(8, 32, 64)).attention_variants(parent, 0)]
    assert got[-2:] == ["swa_kv4_w32", "swa_kv4_w8"]  # after the old kinds; 64 is no window at 64 positions
    with pytest.raises(ArchitectureError, match="preset vllm needs attention_windows"):
        SearchSpace.from_dict({"preset": "vllm", "attention_windows": [8]})


def test_roofline_counts_only_the_window():
    arch = tiny()
    swa, gqa = A("swa", 2, window=W), A("gqa", 2)
    for phase, seq in (("prefill", 3), ("decode", 3)):  # within the window: the same as full attention
        assert subblock_work(arch, "attention", swa, phase, 2, seq) == subblock_work(arch, "attention", gqa, phase, 2, seq)
    for phase in ("prefill", "decode"):
        f_s, b_s = subblock_work(arch, "attention", swa, phase, 2, 100)
        f_g, b_g = subblock_work(arch, "attention", gqa, phase, 2, 100)
        assert f_s < f_g and b_s <= b_g


# ----------------------------------------------------------------------------- numerics

def random_canonical(arch, seed=0):
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes

    g = torch.Generator().manual_seed(seed)
    return {n: (1.0 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else torch.randn(s, generator=g) / math.sqrt(s[-1])
            for n, s in expected_canonical_shapes(arch).items()}


def reference_logits(arch, sd, ids):
    """float64, masks by hand: causal, and for a window w keys p - w + 1 .. p."""
    sd = {k: v.double() for k, v in sd.items()}
    b, n = ids.shape
    d, nq, eps = arch.kv_channels, arch.num_attention_heads, arch.rms_norm_eps
    inv = 1.0 / arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rot(z):
        return torch.cat([-z[..., d // 2:], z[..., : d // 2]], -1)

    def rms(z, w):
        return w * z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)

    pos = torch.arange(n)
    x = sd["model.embed_tokens.weight"][ids]
    for i, layer in enumerate(arch.layers):
        p, a, f = f"model.layers.{i}.", layer.attention, layer.ffn
        if a.kind in ("gqa", "swa"):
            allowed = pos[None, :] <= pos[:, None]
            if a.window:
                allowed &= pos[None, :] > pos[:, None] - a.window
            hn = rms(x, sd[p + "input_layernorm.weight"])
            q = (hn @ sd[p + "self_attn.q_proj.weight"].T).view(b, n, nq, d).transpose(1, 2)
            k = (hn @ sd[p + "self_attn.k_proj.weight"].T).view(b, n, a.num_kv_heads, d).transpose(1, 2)
            v = (hn @ sd[p + "self_attn.v_proj.weight"].T).view(b, n, a.num_kv_heads, d).transpose(1, 2)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            k, v = (t.repeat_interleave(nq // a.num_kv_heads, dim=1) for t in (k, v))
            s = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
            x = x + (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, nq * d) @ sd[p + "self_attn.o_proj.weight"].T
        if f.kind == "mlp":
            hn = rms(x, sd[p + "post_attention_layernorm.weight"])
            x = x + (F.silu(hn @ sd[p + "mlp.gate_proj.weight"].T) * (hn @ sd[p + "mlp.up_proj.weight"].T)
                     ) @ sd[p + "mlp.down_proj.weight"].T
        elif f.kind == "linear":
            x = x + rms(x, sd[p + "post_attention_layernorm.weight"]) @ sd[p + "mlp.linear_mlp.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_the_window_matters_in_the_reference():
    arch, ids = tiny(), torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    sd = random_canonical(arch)
    full = arch.with_layers([LayerArch(A("gqa", l.attention.num_kv_heads), l.ffn) for l in arch.layers])
    a, b = reference_logits(arch, sd, ids), reference_logits(full, sd, ids)
    assert torch.allclose(a[:, :3], b[:, :3]) and (a[:, W:] - b[:, W:]).abs().max() > 1e-3


def test_megatron_model_matches_the_reference():
    from megapuzzle.model import build_gpt_model, forward_logits, load_canonical_into_model
    from megapuzzle.runtime import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    arch = tiny()
    sd = random_canonical(arch, seed=2)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    init_distributed(tp=1, pp=1, seed=1234)
    try:
        model = build_gpt_model(arch)
        load_canonical_into_model(model, sd)
        with torch.no_grad():
            got = forward_logits(model, ids).double()
    finally:
        destroy_distributed()
    want = reference_logits(arch, sd, ids)
    assert (got - want).abs().max().item() / want.abs().max().item() < 1e-5


def test_exported_modeling_file_matches_the_reference_with_and_without_cache(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from megapuzzle.checkpoints.hf_io import write_decilm_dir

    arch = tiny()
    sd = random_canonical(arch, seed=3)
    write_decilm_dir(arch, sd, tmp_path / "export", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    assert [l.self_attn.window if l.attn_kind == "gqa" else None for l in model.model.layers] == [W, None, 3]
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids).logits.double()
        assert (got - reference_logits(arch, sd, ids)).abs().max().item() < 1e-4
        prompt, n_new = ids[:, :4], 9  # generation runs past both windows
        cached = model.generate(prompt, max_new_tokens=n_new, do_sample=False, use_cache=True, pad_token_id=0)
        seq = prompt
        for _ in range(n_new):
            seq = torch.cat([seq, reference_logits(arch, sd, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


def test_init_from_the_parent_gqa():
    from megapuzzle.init import init_attention

    parent = Architecture.homogeneous(vocab_size=V, hidden_size=H, num_layers=1, num_attention_heads=NQ,
                                      num_kv_heads=4, intermediate_size=64)
    local = {k[len("model.layers.0."):]: t for k, t in random_canonical(parent).items() if k.startswith("model.layers.0.")}
    same, how = init_attention(parent, A("gqa", 4), A("swa", 4, window=8), local)
    assert how == "parent_weights" and all(torch.equal(same[k], local[k]) for k in same)
    pooled, how = init_attention(parent, A("gqa", 4), A("swa", 2, window=8), local)
    assert how == "kv_mean_pool" and pooled["self_attn.k_proj.weight"].shape == (2 * parent.kv_channels, H)
