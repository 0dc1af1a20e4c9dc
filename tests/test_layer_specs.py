"""Each block kind builds its own Megatron modules (`BlockKind.megatron_spec`, assembled per layer by
megapuzzle.model.layer_specs): the same parameters, modules, dist-checkpoint keys and bitwise the same
logits as Megatron's own heterogeneous layer spec (`get_gpt_heterogeneous_layer_spec`, which built
them before) on a tiny model that holds every kind (GQA at two KV counts, sliding window, linear and
no-op attention; MLP at three widths, linear and no-op FFN), at TP=1 and TP=2, for the GPTModel and
for BLD's one-layer students; compared with Megatron's spec built in the same process and with
digests recorded on the old code. And every registered kind builds a layer of its own."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
import torch

from _dist import run_distributed
from megapuzzle.arch import Architecture, ArchitectureError, AttentionVariant as A, FFNVariant as Fv, LayerArch
from megapuzzle.blocks import ATTENTION, FFN, registry
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


@contextlib.contextmanager
def megatron_heterogeneous_spec():
    """Build with Megatron-core's own heterogeneous layer spec, as megapuzzle did before the kinds
    owned their modules: the reference (it knows the DeciLM kinds; the window comes from the config)."""
    from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec

    import megapuzzle.model.layer_specs as ours
    import megapuzzle.stages.bld.blocks as bld

    saved = ours.decoder_block_spec, bld.layer_spec
    ours.decoder_block_spec = lambda arch, config, use_te: get_gpt_heterogeneous_layer_spec(config, use_te=use_te)
    bld.layer_spec = lambda arch, i, config, use_te: get_gpt_heterogeneous_layer_spec(config, use_te).layer_specs[i]
    try:
        yield
    finally:
        ours.decoder_block_spec, bld.layer_spec = saved


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
    out = {"structure": structure(model), "keys": checkpoint_keys(model), "logits": logits}
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


def ours_and_megatrons(info) -> tuple[dict, dict]:
    ours = fingerprint(info)
    with megatron_heterogeneous_spec():
        return ours, fingerprint(info)


@pytest.fixture(scope="module")
def tp1():
    torch.set_num_threads(1)
    info = init_distributed(tp=1, pp=1, seed=1234)
    try:
        yield info, ours_and_megatrons(info)
    finally:
        destroy_distributed()


# Digests recorded on the code before the kinds owned their ModuleSpecs (Megatron's heterogeneous
# spec): structure, dist-checkpoint keys and BLD students hold on any machine. Logits are compared
# bitwise against Megatron's own spec built in the same process (float bits depend on the CPU's
# kernels, so no recorded logits digest: a test must pass on any x86-64 machine).
RECORDED = {
    "tp1": {"structure": "8182bf22c0fd862b", "keys": "a1550823db2d8b76", "students": "849d4f022f669cb8"},
    "tp2": [{"structure": "a91b00e89cc5cf3f", "keys": keys, "students": "4eddb2614ab0a7f5"}
            for keys in ("a1550823db2d8b76", "c6901b79511a1ad7")],  # rank 0, rank 1 (their shards' offsets)
}


def _digest(fp: dict) -> dict:
    return {"structure": _sha(fp["structure"]), "keys": _sha(fp["keys"]), "students": _sha("\n\n".join(fp["students"]))}


def _check(ours: dict, megatrons: dict, recorded: dict) -> None:
    assert all(ours["student_same"]) and all(megatrons["student_same"])  # BLD's layer == the model's layer
    for k in ("structure", "keys", "students"):
        assert ours[k] == megatrons[k], k
    assert torch.equal(ours["logits"], megatrons["logits"])
    assert _digest(ours) == recorded


def test_tp1_builds_what_megatrons_spec_built(tp1):
    _, (ours, megatrons) = tp1
    _check(ours, megatrons, RECORDED["tp1"])


def test_tp2_builds_what_megatrons_spec_built(tp1):
    _, (ours1, _) = tp1
    res = run_distributed(ours_and_megatrons, world=2, tp=2)
    for (ours, megatrons), recorded in zip(res, RECORDED["tp2"]):
        _check(ours, megatrons, recorded)
    # TP=2 computes the TP=1 logits up to float reassociation (partial sums over two shards)
    assert ((res[0][0]["logits"] - ours1["logits"]).abs().max() / ours1["logits"].abs().max()).item() < 1e-5


# ----------------------------------------------------------------------------- every registered kind

def _example(kind):
    """A variant of `kind` that fits ONE_LAYER (every registered kind: this test covers a new one)."""
    sizes = {"num_kv_heads": 2, "window": 3, "intermediate_size": 96}
    return kind.variant(**{f: sizes[f] for f in kind.size_fields})


ONE_LAYER = Architecture(vocab_size=V, hidden_size=H, num_attention_heads=NQ, max_position_embeddings=64,
                         layers=[LayerArch(A("gqa", 2), Fv("mlp", 96))])


@pytest.mark.parametrize("kind", list(registry.all_kinds()), ids=lambda k: f"{k.subblock}.{k.kind}")
def test_every_kind_builds_its_own_module(tp1, kind):
    from megapuzzle.model import gather_canonical_from_model

    v = _example(kind)
    other = registry.default(FFN if kind.subblock == ATTENTION else ATTENTION)
    la = LayerArch(v, _example(other)) if kind.subblock == ATTENTION else LayerArch(_example(other), v)
    arch = ONE_LAYER.with_layers([la])
    model = build_gpt_model(arch)
    layer = model.decoder.layers[0]
    spec = kind.megatron_spec(arch, v, model.config.get_config_for_layer(1), use_te=False)
    assert type(layer.self_attention if kind.subblock == ATTENTION else layer.mlp) is spec.module.module
    assert sum(p.numel() for p in layer.parameters()) == arch.layer_params(0)
    sd = init_random_canonical(arch, seed=1, std=0.1, norm_std=0.1)
    load_canonical_into_model(model, sd)  # the kind's weight_entries name the parameters its spec built
    back = gather_canonical_from_model(model)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_swa_refuses_a_layer_config_without_its_window(tp1):
    from megapuzzle.model import make_transformer_config

    v = A("swa", 2, window=3)
    config = make_transformer_config(ONE_LAYER, tp=1, pp=1)  # a GQA layer: no window in its config
    with pytest.raises(ArchitectureError, match=r"^swa_kv2_w3: the layer config's window_size is None, not \(2, 0\)"):
        v.kind_spec.megatron_spec(ONE_LAYER, v, config.get_config_for_layer(1), use_te=False)
