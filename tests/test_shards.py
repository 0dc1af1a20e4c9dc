"""Sharded canonical checkpoints (HF-style shards + index, layer-aligned) and the lazy reader:
layout, exact round trips, old single-file checkpoints, one-line errors for broken files, and
that a TP x PP rank reads exactly the elements it owns and nothing else."""

from __future__ import annotations

import json

import pytest
import torch

from _dist import run_distributed
from megapuzzle.checkpoints.canonical import (
    checkpoint_fingerprint,
    expected_canonical_shapes,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from megapuzzle.checkpoints.shards import INDEX_FILE, SINGLE_FILE, SafetensorsReader, layer_group, parse_size
from megapuzzle.errors import UserError
from megapuzzle.fileio import weights_fingerprint
from megapuzzle.model import build_gpt_model, init_random_canonical, load_canonical_into_model
from test_model import tiny


def _sd(arch, dtype=torch.bfloat16):
    return init_random_canonical(arch, seed=5, std=0.1, norm_std=0.1, dtype=dtype)


def test_small_shards_are_layer_aligned_and_read_back_exactly(tmp_path):
    arch = tiny()
    sd = _sd(arch)
    save_checkpoint(tmp_path / "c", arch, sd, max_shard_bytes=12_000)
    index = json.loads((tmp_path / "c" / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "c" / SINGLE_FILE).exists() and is_checkpoint(tmp_path / "c")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    groups: dict[str, set[str]] = {}
    for name, f in index["weight_map"].items():
        groups.setdefault(layer_group(name), set()).add(f)
    assert all(len(fs) == 1 for fs in groups.values())  # no layer straddles two shards
    a2, reader, _ = load_checkpoint(tmp_path / "c")
    assert a2 == arch and isinstance(reader, SafetensorsReader)
    assert list(reader) == list(expected_canonical_shapes(arch))  # canonical order, not file order
    assert all(torch.equal(reader[k], sd[k]) and reader[k].dtype == torch.bfloat16 for k in sd)
    _, as32, _ = load_checkpoint(tmp_path / "c", dtype=torch.float32)
    w = "model.layers.0.mlp.down_proj.weight"
    assert as32[w].dtype == torch.float32 and torch.equal(as32[w], sd[w].float())
    assert torch.equal(as32.read(w, rows=slice(3, 9)), sd[w][3:9].float())
    assert torch.equal(as32.read(w, cols=slice(40, 80)), sd[w][:, 40:80].float())
    assert as32.read(w, cols=slice(40, 80)).is_contiguous()


def test_default_is_one_file_and_old_fingerprints_stay(tmp_path):
    arch = tiny()
    sd = _sd(arch, torch.float32)
    save_checkpoint(tmp_path / "one", arch, sd)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["arch.json", "meta.json", SINGLE_FILE]
    # a single-file checkpoint keeps the fingerprint its runs recorded before shards existed
    assert checkpoint_fingerprint(tmp_path / "one") == weights_fingerprint(tmp_path / "one" / SINGLE_FILE)
    # resharding straight from the lazy reader gives the same tensors and another fingerprint
    _, reader, _ = load_checkpoint(tmp_path / "one")
    save_checkpoint(tmp_path / "many", arch, reader, max_shard_bytes=30_000)
    _, back, _ = load_checkpoint(tmp_path / "many")
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert checkpoint_fingerprint(tmp_path / "many").startswith("shards:")


def test_broken_files_are_one_line_errors(tmp_path):
    arch = tiny()
    save_checkpoint(tmp_path / "c", arch, _sd(arch), max_shard_bytes=12_000)
    index = json.loads((tmp_path / "c" / INDEX_FILE).read_text())
    shard = tmp_path / "c" / sorted(set(index["weight_map"].values()))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])  # data cut short: found when the tensor is read
    _, reader, _ = load_checkpoint(tmp_path / "c")
    name = next(k for k, f in index["weight_map"].items() if f == shard.name)
    with pytest.raises(UserError) as e:
        reader[name]
    assert "\n" not in str(e.value) and shard.name in str(e.value)
    shard.write_bytes(data[:5])  # header cut: found at load
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "c")
    assert "\n" not in str(e.value) and "not a readable safetensors file" in str(e.value)
    shard.unlink()
    with pytest.raises(UserError, match=f"lacks shard {shard.name}"):
        load_checkpoint(tmp_path / "c")
    for bad in ("5 GB?", "GB"):
        with pytest.raises(UserError, match="cannot read size"):
            parse_size(bad)
    assert parse_size("5GB") == 5 << 30 and parse_size("1234") == 1234


def _read_counting(info, ckpt):
    """One rank: load the lazy checkpoint, counting the elements read; compare with a dict load."""
    arch, reader, _ = load_checkpoint(ckpt, dtype=torch.float32)
    read: dict[str, int] = {}
    plain = reader.read

    def counting(name, rows=None, cols=None):
        t = plain(name, rows, cols)
        read[name] = read.get(name, 0) + t.numel()
        return t

    reader.read = counting
    lazy = build_gpt_model(arch)
    load_canonical_into_model(lazy, reader, arch)
    ref = build_gpt_model(arch)
    load_canonical_into_model(ref, {k: plain(k) for k in reader}, arch)
    same = all(torch.equal(a, b) for a, b in zip(lazy.parameters(), ref.parameters()))
    owned = sum(p.numel() for p in lazy.parameters())  # tied weights: one Parameter object each
    return {"info": info, "same": same, "read": read, "owned": owned}


@pytest.mark.parametrize("tp,pp,tied", [(2, 1, False), (1, 2, True), (2, 2, False)])
def test_each_rank_reads_only_what_it_owns(tmp_path, tp, pp, tied):
    arch = tiny(tie_word_embeddings=tied)
    save_checkpoint(tmp_path / "c", arch, _sd(arch), max_shard_bytes=12_000)
    res = run_distributed(_read_counting, world=tp * pp, tp=tp, pp=pp, args=(tmp_path / "c",))
    total = sum(t.numel() for t in _sd(arch).values())
    for r in res:
        assert r["same"], f"rank {r['info'].rank}: lazy load differs from the in-memory one"
        # every element read lands in one of this rank's parameters, and nothing else is read
        assert sum(r["read"].values()) == r["owned"] < total
        layers = {int(n.split(".")[2]) for n in r["read"] if n.startswith("model.layers.")}
        from megapuzzle.model import stage_layer_ranges

        assert layers == set(stage_layer_ranges(arch.num_layers, pp)[r["info"].pp_rank])
        assert ("model.embed_tokens.weight" in r["read"]) == (r["info"].is_first_stage or
                                                              (tied and r["info"].is_last_stage))


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes __metadata__ in Rust HashMap order, which changes from call to call; our
    writer sorts it, so a library block's sha256 is the same in every run. Many saves of the same
    content, with metadata keys given in different orders, are byte-identical and read back the same."""
    import hashlib

    from safetensors import safe_open

    from megapuzzle.fileio import save_safetensors_atomic

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    keys = ["format", "key", "layer", "kind", "z", "é"]
    digests = set()
    for i in range(24):
        order = keys[i % len(keys):] + keys[:i % len(keys)]
        path = tmp_path / f"block{i}.safetensors"
        save_safetensors_atomic(tensors, path, metadata={k: f"v-{k}" for k in order})
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {k: f"v-{k}" for k in keys}
            assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    assert len(digests) == 1
