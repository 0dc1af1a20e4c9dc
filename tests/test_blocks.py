"""The block-kind registry (megapuzzle/blocks): one class per subblock kind owns its name, sizes,
tensors and json; nothing else branches on kind names; the torch-free core stays torch-free."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megapuzzle.arch import Architecture, ArchitectureError, AttentionVariant, FFNVariant, LayerArch
from megapuzzle.blocks import ATTENTION, FFN, registry
from megapuzzle.checkpoints.canonical import expected_canonical_shapes

ROOT = Path(__file__).resolve().parents[1]


def test_the_torch_free_core_imports_no_torch():
    code = ("import megapuzzle.arch, megapuzzle.blocks, megapuzzle.costs.table, sys; "
            "from megapuzzle.blocks import registry; "
            "[k.block_config for k in registry.all_kinds()]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _examples(kind):
    """A couple of variants of each registered kind."""
    if kind.size_field is None:
        return [kind.variant()]
    if "window" in kind.size_fields:
        return [kind.variant(n, window=w) for n, w in ((1, 4), (4, 100))]
    return [kind.variant(n) for n in (1, 2, 4)] if kind.subblock == ATTENTION else [kind.variant(n) for n in (64, 256)]


ARCH = Architecture(vocab_size=64, hidden_size=128, num_attention_heads=8, head_dim=32,
                    layers=[LayerArch(AttentionVariant("gqa", 4), FFNVariant("mlp", 256))])


@pytest.mark.parametrize("kind", list(registry.all_kinds()), ids=lambda k: f"{k.subblock}.{k.kind}")
def test_each_kind_round_trips_and_counts_its_own_tensors(kind):
    for v in _examples(kind):
        assert v.kind_spec is kind
        assert registry.parse_name(kind.subblock, v.name) == v
        other = registry.default(FFN if kind.subblock == ATTENTION else ATTENTION)
        la = (LayerArch(v, _examples(other)[0]) if kind.subblock == ATTENTION else LayerArch(_examples(other)[0], v))
        arch = ARCH.with_layers([la])
        back = Architecture.from_hf_config(json.loads(json.dumps(arch.to_hf_config())))
        assert back == arch
        assert Architecture.from_hf_config(arch.to_megatron_json()) == arch
        shapes = kind.canonical_shapes(arch, v)
        assert set(shapes) <= set(registry.local_names(kind.subblock))
        n = sum(int(__import__("math").prod(s)) for s in shapes.values())
        assert n == kind.params(arch, v) == arch.subblock_params(v)
        assert (n == 0) == kind.identity
        assert kind.matmul_params(arch, v) == n - (0 if kind.identity else arch.hidden_size)
        p = "model.layers.0."
        full = expected_canonical_shapes(arch)
        assert all(full[p + k] == s for k, s in shapes.items())


def test_one_default_kind_per_subblock_and_unique_names():
    for s in (ATTENTION, FFN):
        ks = registry.kinds(s)
        assert [k.block_config_flag for k in ks].count(None) == 1
        assert registry.default(s).parent_like
        assert len({k.kind for k in ks}) == len(ks)
        assert sum(k.identity for k in ks) == 1
    with pytest.raises(ArchitectureError, match="attention kind 'sliding' unknown; use gqa, linear, no_op or swa"):
        AttentionVariant("sliding")
    assert registry.subblocks_of_name("gqa_kv2") == [ATTENTION]
    assert registry.subblocks_of_name("linear") == [ATTENTION, FFN]


def test_registering_a_kind_twice_is_refused():
    cls = type(registry.get(ATTENTION, "gqa"))
    clone = type("Clone", (cls,), {})
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(clone)


# `x.kind == "gqa"`, `kind != 'no_op'`, `kind in ("mlp", ...)` on a registered kind name
_BRANCH = re.compile(r"""\.kind\s*(==|!=|in)\s*\(?\s*["'](%s)["']""" % "|".join(
    sorted({k.kind for k in registry.all_kinds()})))


def test_no_code_outside_the_registry_branches_on_kind_names():
    pkg = ROOT / "megapuzzle"
    found = []
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg).as_posix()
        if rel.startswith(("blocks/", "checkpoints/hf_modeling/")):  # the registry; DeciLM's own files
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if _BRANCH.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "branch on the kind's methods (megapuzzle/blocks) instead:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- parent families

def test_family_is_llama_and_absent_from_arch_json():
    assert ARCH.family == "llama" and ARCH.family_spec.name == "llama"
    assert "family" not in ARCH.to_dict()  # arch.json files of Llama runs stay byte-identical
    with pytest.raises(ArchitectureError, match="family 'gpt2' unknown; known: llama"):
        Architecture(vocab_size=64, hidden_size=128, num_attention_heads=8, layers=ARCH.layers, family="gpt2")


def test_export_refuses_a_family_decilm_cannot_represent(monkeypatch):
    from megapuzzle import families

    class Toy(families.Family):
        name = "toy"  # decilm stays False

    monkeypatch.setitem(families.FAMILIES, "toy", Toy())
    arch = Architecture(vocab_size=64, hidden_size=128, num_attention_heads=8, layers=ARCH.layers, family="toy")
    assert Architecture.from_dict(arch.to_dict()) == arch and arch.to_dict()["family"] == "toy"
    with pytest.raises(ArchitectureError, match="family toy has no HF DeciLM") as e:
        arch.to_hf_config()
    assert "\n" not in str(e.value)
