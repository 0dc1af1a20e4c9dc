"""Each block kind builds its own Megatron modules (`BlockKind.megatron_spec`, assembled per layer by
megapuzzle.model.layer_specs): the same parameters, modules, dist-checkpoint keys and bitwise the same
logits as Megatron's own heterogeneous layer spec built them before, on a tiny model that holds
every kind (GQA at two KV counts, sliding window, linear and no-op attention; MLP at three widths,
linear and no-op FFN), at TP=1 and TP=2, for the GPTModel and for BLD's one-layer students."""

from __future__ import annotations

import hashlib

import pytest
import torch

from _dist import run_distributed
from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as Fv, LayerArch
from megapuzzle.model import build_gpt_model, forward_logits, init_random_canonical, load_canonical_into_model
from megapuzzle.runtime import destroy_distributed, init_distributed

V, H, NQ = 128, 64, 4
LAYERS = (
    LayerArch(A("gqa", 4), Fv("mlp", 96)),
    LayerArch(A("gqa", 2), Fv("linear")),
    LayerArch(A("swa", 2, window=5), Fv("mlp", 64)),
    LayerArch(A("linear"), Fv("no_op")),
    LayerArch(A("no_op"), Fv("mlp", 128)),
    LayerArch(A("swa", 4, window=3), Fv("linear")),
    LayerArch(A("no_op"), Fv("no_op")),
)  # every KV count and width even, so TP=2 runs it too
ARCH = Architecture(vocab_size=V, hidden_size=H, num_attention_heads=NQ, layers=LAYERS, max_position_embeddings=64)
TOKENS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))  # 16 > both windows


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


def structure(module) -> str:
    """Every parameter (name, shape, dtype) and every submodule (name, class)."""
    params = [f"{n} {tuple(p.shape)} {p.dtype}" for n, p in module.named_parameters()]
    mods = [f"{n} {type(m).__module__}.{type(m).__qualname__}" for n, m in module.named_modules()]
    return "\n".join(params + mods)


def checkpoint_keys(model) -> str:
    """The dist-checkpoint keys GKD saves under (the layer spec's sharded_state_dict_keys_map renames norms)."""
    return "\n".join(sorted(f"{k} -> {getattr(v, 'key', '')} {getattr(v, 'global_shape', '')} "
                              f"{getattr(v, 'global_offset', '')}" for k, v in model.sharded_state_dict().items()))


def fingerprint(info) -> dict:
    """One rank: the model's structure, checkpoint keys and logits, and each layer rebuilt as a BLD
    student with the same weights (its output must be the model's layer output, bitwise)."""
    from megapuzzle.init import local_layer_tensors
    from megapuzzle.stages.bld.blocks import StudentBlock, Teacher

    sd = init_random_canonical(ARCH, seed=3, std=0.1, norm_std=0.1)
    model = build_gpt_model(ARCH)
    load_canonical_into_model(model, sd)
    with torch.no_grad():
        logits = forward_logits(model, TOKENS)
    out = {"structure": structure(model), "keys": checkpoint_keys(model), "logits": logits,
           "logits_sha": _sha(logits.contiguous().numpy().tobytes())}
    teacher = Teacher(model, layers=set(range(ARCH.num_layers)), mid_layers=set())
    t = teacher.forward(TOKENS)
    out["students"], out["student_same"] = [], []
    for i, la in enumerate(LAYERS):
        block = StudentBlock(f"b{i}", "layer", i, ARCH, la, teacher=None, tp=info.tp_size)
        block.load_canonical(local_layer_tensors(sd, i))
        with torch.no_grad():
            y, _ = block.layer(hidden_states=t.x[i], attention_mask=None, rotary_pos_emb=t.rotary)
        out["students"].append(structure(block.layer))
        out["student_same"].append(torch.equal(y, t.y[i]))
    return out


@pytest.fixture(scope="module")
def tp1():
    torch.set_num_threads(1)
    info = init_distributed(tp=1, pp=1, seed=1234)
    try:
        yield fingerprint(info)
    finally:
        destroy_distributed()


# Recorded on the code before the kinds owned their ModuleSpecs (Megatron's
# get_gpt_heterogeneous_layer_spec), torch 2.13.0 CPU, one thread.
RECORDED = {
    "tp1": {"structure": "8182bf22c0fd862b", "keys": "a1550823db2d8b76", "logits": "87c825162ae3ca0f",
            "students": "849d4f022f669cb8"},
    "tp2": [{"structure": "a91b00e89cc5cf3f", "keys": keys, "logits": "dac8cd0841a29af7", "students": "4eddb2614ab0a7f5"}
            for keys in ("a1550823db2d8b76", "c6901b79511a1ad7")],  # rank 0, rank 1 (their shards' offsets)
}


def _digest(fp: dict) -> dict:
    return {"structure": _sha(fp["structure"]), "keys": _sha(fp["keys"]), "logits": fp["logits_sha"],
            "students": _sha("\n\n".join(fp["students"]))}


def test_tp1_is_what_it_was(tp1):
    assert all(tp1["student_same"])
    assert _digest(tp1) == RECORDED["tp1"]


def test_tp2_is_what_it_was(tp1):
    res = run_distributed(fingerprint, world=2, tp=2)
    for r in res:
        assert all(r["student_same"])
    assert [_digest(r) for r in res] == RECORDED["tp2"]
    # TP=2 computes the TP=1 logits up to float reassociation (partial sums over two shards)
    assert ((res[0]["logits"] - tp1["logits"]).abs().max() / tp1["logits"].abs().max()).item() < 1e-5
