"""BLD and the block library on the debug parent: every variant kind trains and improves, the
library is consistent, kill + resume is bitwise, corrupted blocks are retrained, an extended
search space trains only the new variants, coupled mode works, TP=2 and DP=2 agree with one
process, and assemble() with the parent's own variants is the parent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from _dist import run_distributed
from conftest import make_run
from _logs import captured
from megapuzzle.train.faults import kill_after
from megapuzzle.arch import AttentionVariant as A, FFNVariant as Fv, LayerArch
from megapuzzle.stages.bld.bld import BLDConfig, run_bld
from megapuzzle.checkpoints.canonical import load_checkpoint
from megapuzzle.config import load_config
from megapuzzle.errors import UserError
from megapuzzle.fileio import sha256_file
from megapuzzle.library import BlockLibrary, LibraryError, block_shapes, parse_key
from megapuzzle.runtime import destroy_distributed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bld_debug.yaml"
CFG = load_config(EXAMPLE)  # the example config is the test config
SPACE, BLD = CFG["search_space"], CFG["bld"]
BATCH, SEQ = BLD["batch_size"], BLD["seq_len"]
STEPS = BLD["tokens_per_block"] // (BATCH * SEQ)
QUIET = dict(progress=False)


def cfg(space=None, **bld):
    return {"search_space": {**SPACE, **(space or {})}, "bld": {**BLD, **bld}}


@pytest.fixture(scope="module")
def base(debug_parent, tmp_path_factory):
    """RUN with parent/ and data/ from the session's debug parent."""
    torch.set_num_threads(1)
    run = make_run(debug_parent, tmp_path_factory.mktemp("base") / "run")
    yield run
    destroy_distributed()


def fresh(base: Path, tmp: Path, with_library: Path | None = None) -> Path:
    run = tmp / "run"
    shutil.copytree(base / "parent", run / "parent")
    shutil.copytree(base / "data", run / "data")
    if with_library is not None:
        shutil.copytree(with_library / "library", run / "library")
    return run


@pytest.fixture(scope="module")
def full(base, tmp_path_factory):
    """The uninterrupted single-process decoupled run every other test compares with."""
    run = fresh(base, tmp_path_factory.mktemp("full"))
    res = run_bld(run, CFG, **QUIET)
    return run, res


def _lib_tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    lib = BlockLibrary(run / "library")
    return {k: lib.load_block(k) for k in lib.entries()}


BETAS = (0.9, 0.95)  # the AdamW betas of BLD's block optimizers (megapuzzle.train.block_optimizer)


def _lrs(c: dict) -> list[float]:
    """The learning rate of each BLD step under config `c`, as megapuzzle.stages.bld.train schedules it."""
    from megapuzzle.train.schedule import LRSchedule

    b = BLDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c["bld"].items()})
    sched = LRSchedule(b.lr, b.steps, min(b.warmup, b.steps - 1), b.min_lr)
    return [sched(step) for step in range(b.steps)]


# ----------------------------------------------------------------------------- decoupled library

def test_decoupled_library_has_every_variant_kind(full):
    run, res = full
    arch, _, _ = load_checkpoint(run / "parent")
    e = BlockLibrary(run / "library").entries()
    names = {(v["layer"], v["kind"], v["attention"] or v["ffn"]) for v in e.values()}
    for i in range(arch.num_layers):
        for a in ("gqa_kv2", "gqa_kv1", "linear", "no_op"):
            assert (i, "attention", a) in names
        for f in ("mlp_256", "mlp_128", "linear", "no_op"):
            assert (i, "ffn", f) in names
    assert len(e) == 8 * arch.num_layers
    init = {k.split(".", 1)[1]: v["init"] for k, v in e.items() if v["layer"] == 0}
    assert init == {"attention.gqa_kv2": "parent", "attention.gqa_kv1": "kv_mean_pool", "attention.linear": "wo_wv",
                    "attention.no_op": "no_op", "ffn.mlp_256": "parent", "ffn.mlp_128": "channel_contribution",
                    "ffn.linear": "wdown_wup", "ffn.no_op": "no_op"}
    assert sorted(res["trained"]) == sorted(k for k, v in e.items() if v["init"] != "parent")
    assert list((run / "tb" / "bld" / "dp000").glob("events.out.tfevents.*"))
    assert not list((run / "state" / "bld").glob("*/rank*"))  # finished ranks leave no state behind


def test_every_trained_block_improves(full):
    run, _ = full
    e = BlockLibrary(run / "library").entries()
    trained = {k: v for k, v in e.items() if v["tokens"] > 0}
    assert len(trained) == 4 * 4  # kv1, linear attention, mlp_128, linear FFN on 4 layers
    for k, v in trained.items():
        assert v["tokens"] == STEPS * BATCH * SEQ and v["steps"] == STEPS
        assert 0 <= v["final_nmse"] < v["init_nmse"], (k, v["init_nmse"], v["final_nmse"])
    for k, v in e.items():
        if v["init"] == "parent":
            assert v["init_nmse"] == v["final_nmse"] == 0.0 and v["tokens"] == 0
        if v["init"] == "no_op":  # nothing to train: measured once
            assert v["tokens"] == 0 and v["final_nmse"] == v["init_nmse"] > 0
    print("\nkey                          init_nmse  final_nmse")
    for k, v in e.items():
        print(f"{k:28s} {v['init_nmse']:10.5f} {v['final_nmse']:10.5f}")


def test_index_and_files_are_consistent(full):
    run, _ = full
    arch, _, _ = load_checkpoint(run / "parent")
    lib = BlockLibrary(run / "library")
    e = lib.entries()
    files = {p.name for p in (run / "library" / "blocks").iterdir()}
    assert files == {v["file"] for v in e.values()}
    for k, v in e.items():
        assert v["key"] == k and (v["layer"], v["kind"], v["attention"], v["ffn"]) == parse_key(k)
        assert v["sha256"] == sha256_file(run / "library" / "blocks" / v["file"]) and v["status"] == "done"
        assert lib.has(k, verify=True)
        t = lib.load_block(k)
        assert {n: tuple(x.shape) for n, x in t.items()} == block_shapes(arch, v["layer"], v["kind"], v["attention"],
                                                                       v["ffn"])


def test_assemble_with_the_parent_variants_is_the_parent(full):
    run, _ = full
    arch, tensors, _ = load_checkpoint(run / "parent")
    lib = BlockLibrary(run / "library")
    child_arch, child = lib.assemble(arch, tensors, list(arch.layers))
    assert child_arch == arch and set(child) == set(tensors)
    for k in tensors:
        assert torch.equal(child[k], tensors[k]), k
    # a mixed child assembles and loads into a Megatron model
    from megapuzzle.model import build_gpt_model, forward_logits, load_canonical_into_model

    mixed = [LayerArch(A("gqa", 1), Fv("mlp", 128)), LayerArch(A("linear"), Fv("no_op")),
             LayerArch(A("no_op"), Fv("linear")), arch.layers[3]]
    march, mt = lib.assemble(arch, tensors, mixed)
    assert torch.equal(mt["model.layers.0.mlp.down_proj.weight"],
                       lib.load_block("L000.ffn.mlp_128")["mlp.down_proj.weight"])
    model = build_gpt_model(march)
    load_canonical_into_model(model, mt)
    with torch.no_grad():
        assert torch.isfinite(forward_logits(model, torch.randint(0, 512, (1, 8)))).all()
    with pytest.raises(LibraryError, match="L001.attention.gqa_kv4"):
        lib.assemble(arch, tensors, [arch.layers[0], LayerArch(A("gqa", 4), Fv("mlp", 256))] + list(arch.layers[2:]))


def test_teacher_captures_the_parent_streams_exactly(full):
    """x / m / y from the BLD teacher are the parent's own residual streams."""
    from megapuzzle.stages.bld.blocks import Teacher
    from megapuzzle.model import build_gpt_model, forward_hidden_states, load_canonical_into_model

    run, _ = full
    arch, tensors, _ = load_checkpoint(run / "parent")
    model = build_gpt_model(arch)
    load_canonical_into_model(model, tensors)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    _, hs = forward_hidden_states(model, tokens)
    t = Teacher(model, {0, 1, 2, 3}, {2}).forward(tokens)
    for i in range(4):
        assert torch.equal(t.x[i].transpose(0, 1), hs[i]) and torch.equal(t.y[i].transpose(0, 1), hs[i + 1])
    assert set(t.m) == {2} and not torch.equal(t.m[2], t.x[2])


# ----------------------------------------------------------------------------- resume, corruption, extension

def test_kill_and_resume_is_bitwise_equal(full, base, tmp_path):
    run0, _ = full
    run = fresh(base, tmp_path)
    with kill_after("bld", 5):
        res = run_bld(run, CFG, **QUIET)  # like a kill after step 5 (checkpoint at 3)
    assert res["stopped_at"] == 5
    (latest,) = (run / "state" / "bld").glob("*/rank000/latest")
    assert latest.read_text().strip() == "step_00000003"
    assert all(v["init"] == "parent" for v in BlockLibrary(run / "library").entries().values())
    res = run_bld(run, CFG, **QUIET)
    assert res["resumed_from"] == 3
    a, b = _lib_tensors(run0), _lib_tensors(run)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), (k, n)
    e0, e1 = BlockLibrary(run0 / "library").entries(), BlockLibrary(run / "library").entries()
    assert {k: v["final_nmse"] for k, v in e0.items()} == {k: v["final_nmse"] for k, v in e1.items()}


def test_kill_while_writing_the_blocks_resumes_without_retraining(full, base, tmp_path, monkeypatch):
    run0, _ = full
    run = fresh(base, tmp_path)
    real, written = BlockLibrary.add_block, []

    def dies_after_three(self, key, tensors, entry):
        if entry["init"] != "parent" and len(written) == 3:
            raise KeyboardInterrupt  # killed with 3 of the rank's finished blocks written
        written.append(key) if entry["init"] != "parent" else None
        return real(self, key, tensors, entry)

    monkeypatch.setattr(BlockLibrary, "add_block", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_bld(run, CFG, **QUIET)
    monkeypatch.setattr(BlockLibrary, "add_block", real)
    res = run_bld(run, CFG, **QUIET)
    assert res["resumed_from"] == STEPS  # the final checkpoint: no step is repeated
    assert sorted(res["trained"]) == sorted(set(full[1]["trained"]) - set(written))
    a, b = _lib_tensors(run0), _lib_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_corrupted_block_is_detected_and_retrained(full, base, tmp_path):
    run0, _ = full
    run = fresh(base, tmp_path, with_library=run0)
    lib = BlockLibrary(run / "library")
    key = "L001.ffn.mlp_128"
    f = lib.file_path(key)
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the tensor payload
    f.write_bytes(bytes(data))
    assert not lib.has(key) and lib.has(key, verify=False)
    with pytest.raises(LibraryError, match="corrupted"):
        lib.load_block(key)
    res = run_bld(run, CFG, **QUIET)
    assert res["trained"] == [key] and res["corrupt"] == [key]
    assert lib.has(key)
    orig = BlockLibrary(run0 / "library").load_block(key)
    for n, x in lib.load_block(key).items():
        torch.testing.assert_close(x, orig[n], rtol=1e-6, atol=1e-7)


def test_extending_the_search_space_trains_only_new_variants(full, base, tmp_path):
    run0, _ = full
    run = fresh(base, tmp_path, with_library=run0)
    before = {k: v["sha256"] for k, v in BlockLibrary(run / "library").entries().items()}
    res = run_bld(run, cfg(space={"ffn_sizes": [192]}), **QUIET)
    assert sorted(res["trained"]) == [f"L{i:03d}.ffn.mlp_192" for i in range(4)]
    after = BlockLibrary(run / "library").entries()
    assert {k: after[k]["sha256"] for k in before} == before
    for i in range(4):
        v = after[f"L{i:03d}.ffn.mlp_192"]
        assert v["init"] == "channel_contribution" and v["final_nmse"] < v["init_nmse"]
    assert run_bld(run, cfg(space={"ffn_sizes": [192]}), **QUIET)["trained"] == []  # nothing left


# ----------------------------------------------------------------------------- coupled

def test_coupled_mode_on_two_pairs(full, base, tmp_path):
    run0, _ = full
    run = fresh(base, tmp_path)
    c = cfg(mode="coupled", coupled_pairs=["gqa_kv1+mlp_128", ["linear", "linear"]], layers=[0, 2])
    res = run_bld(run, c, **QUIET)
    want = [f"L{i:03d}.layer.{p}" for i in (0, 2) for p in ("gqa_kv1+mlp_128", "linear+linear")]
    assert sorted(res["trained"]) == sorted(want)
    lib = BlockLibrary(run / "library")
    e = lib.entries()
    for k in want:
        assert e[k]["kind"] == "layer" and e[k]["final_nmse"] < e[k]["init_nmse"]
    assert e["L000.layer.gqa_kv1+mlp_128"]["init"] == "kv_mean_pool+channel_contribution"
    # layer_tensors prefers the coupled block over decoupled ones
    la = LayerArch(A("gqa", 1), Fv("mlp", 128))
    t = lib.layer_tensors(0, la)
    blk = lib.load_block("L000.layer.gqa_kv1+mlp_128")
    assert set(t) == {f"model.layers.0.{n}" for n in blk} and all(torch.equal(t[f"model.layers.0.{n}"], x)
                                                                   for n, x in blk.items())
    with pytest.raises(UserError, match="coupled_pairs"):
        run_bld(run, cfg(mode="coupled", coupled_pairs=["gqa_kv3+mlp_128"]), **QUIET)


def test_cli_on_a_complete_library_has_nothing_to_do(full, base, tmp_path, capsys):
    import argparse

    from megapuzzle.stages.bld.bld import add_cli_args, run_cli

    run0, _ = full
    run = fresh(base, tmp_path, with_library=run0)
    p = argparse.ArgumentParser()
    add_cli_args(p)
    assert run_cli(p.parse_args(["--config", str(EXAMPLE), "--run-dir", str(run), "--no-progress"])) == 0
    assert "trained 0 block(s)" in capsys.readouterr().out
    assert STEPS == 8 and BLDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in BLD.items()}).steps == 8


def test_config_is_validated_in_one_line():
    with pytest.raises(UserError, match="mode"):
        BLDConfig(mode="hybrid")
    with pytest.raises(UserError, match="coupled_pairs"):
        BLDConfig(coupled_pairs=["nonsense"])
    with pytest.raises(UserError, match="bld.lr"):
        BLDConfig(lr="fast")
    assert BLDConfig(lr="3e-4").lr == 3e-4  # YAML reads 3e-4 as a string
    assert BLDConfig(tokens_per_block=1000, batch_size=2, seq_len=100).steps == 5


# ----------------------------------------------------------------------------- TP=2 and DP=2

def _bld_worker(info, run: str, c: dict):
    torch.set_num_threads(1)
    return run_bld(run, c, progress=False)


def test_tp2_gives_the_same_losses_as_tp1(full, base, tmp_path):
    run0, _ = full
    run = fresh(base, tmp_path)
    c = cfg(space={"kv_heads": []}, tensor_parallel=2, layers=[0, 3])  # kv1 cannot be split over 2 ranks
    res = run_distributed(_bld_worker, world=2, tp=2, args=(str(run), c))
    assert res[0]["trained"] == res[1]["trained"] and len(res[0]["trained"]) == 2 * 5
    e0, e2 = BlockLibrary(run0 / "library").entries(), BlockLibrary(run / "library").entries()
    for k in res[0]["trained"]:
        for m in ("init_nmse", "final_nmse"):
            assert abs(e2[k][m] - e0[k][m]) <= 1e-4 * abs(e0[k][m]) + 1e-9, (k, m, e2[k][m], e0[k][m])
    from megapuzzle.arch import SearchSpace
    from megapuzzle.stages.bld.bld import check_tensor_parallel, plan_blocks

    arch, _, _ = load_checkpoint(run / "parent")
    with pytest.raises(UserError, match="gqa_kv1"):
        check_tensor_parallel(arch, plan_blocks(arch, SearchSpace.from_dict(SPACE), BLDConfig(**BLD)), 2)


def test_dp2_splits_the_blocks_and_gives_the_same_library(full, base, tmp_path):
    run0, _ = full
    run = fresh(base, tmp_path)
    res = run_distributed(_bld_worker, world=2, tp=1, args=(str(run), CFG))
    k0, k1 = set(res[0]["trained"]), set(res[1]["trained"])
    assert k0 and k1 and not k0 & k1 and k0 | k1 == set(full[1]["trained"])
    a, b = _lib_tensors(run0), _lib_tensors(run)
    assert a.keys() == b.keys()
    for k in a:
        for n in a[k]:
            torch.testing.assert_close(b[k][n], a[k][n], rtol=1e-5, atol=1e-7, msg=f"{k} {n}")


def test_changed_bld_settings_retrain_the_blocks(full, tmp_path):
    """A library trained with other BLD settings is not silently reused: its blocks retrain."""
    run, res = full
    again = fresh(run, tmp_path, with_library=run)
    before = BlockLibrary(again / "library").entries()
    with captured() as lines:
        res2 = run_bld(again, cfg(lr=BLD["lr"] / 2), progress=False)
    assert sorted(res2["trained"]) == sorted(res["trained"]) and res2["trained"]
    assert any("trained with other BLD settings" in l for l in lines)
    after = BlockLibrary(again / "library").entries()
    for k in res["trained"]:
        if after[k]["init"] != "no_op":
            assert after[k]["sha256"] != before[k]["sha256"], k
    assert run_bld(again, cfg(lr=BLD["lr"] / 2), **QUIET)["trained"] == []  # now up to date


def test_keep_best_writes_the_init_of_a_block_that_got_worse(full, base, tmp_path):
    """At a learning rate far too high, blocks end worse than their init on held-out: keep_best
    writes their init weights (bitwise) and records it; keep_best false keeps the trained ones."""
    from megapuzzle.stages.bld.bld import plan_blocks
    from megapuzzle.arch import SearchSpace
    from megapuzzle.stages.bld.train import _init_tensors

    run = fresh(base, tmp_path / "a")
    run_bld(run, cfg(lr=0.5, min_lr=0.5, grad_clip=0.0), **QUIET)
    entries = BlockLibrary(run / "library").entries()
    trained = {k: e for k, e in entries.items() if e["tokens"] > 0}
    kept_init = [k for k, e in trained.items() if e["kept"] == "init"]
    assert kept_init, {k: (e["init_nmse"], e["trained_nmse"]) for k, e in trained.items()}
    for k, e in trained.items():
        assert e["final_nmse"] <= e["init_nmse"]
        assert (e["kept"] == "init") == (e["trained_nmse"] > e["init_nmse"]), k
    arch, parent, _ = load_checkpoint(run / "parent")
    specs = {b.key: b for b in plan_blocks(arch, SearchSpace.from_dict(SPACE), BLDConfig(**BLD))}
    attn = [k for k in kept_init if specs[k].kind == "attention"]  # their init needs no calibration
    assert attn
    lib = BlockLibrary(run / "library")
    for k in attn:
        want, _ = _init_tensors(arch, specs[k], parent, {})
        got = lib.load_block(k)
        assert all(torch.equal(got[n], want[n].to(got[n].dtype)) for n in want), k

    off = fresh(base, tmp_path / "b")
    run_bld(off, cfg(lr=0.5, min_lr=0.5, grad_clip=0.0, keep_best=False), **QUIET)
    e_off = BlockLibrary(off / "library").entries()
    assert all(e_off[k]["kept"] == "trained" and e_off[k]["final_nmse"] > e_off[k]["init_nmse"] for k in kept_init)
