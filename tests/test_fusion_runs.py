"""Fused-run blocks through BLD's and score's scaled paths (debug parent, windows of 2 layers):
BLD improves on the exact fold; PP=2 gives the one-process blocks and each stage reads only its
own layers; TP=2 agrees within what fp32 noise can do through AdamW; kill + resume is bitwise;
the cached-pass replace-the-run score equals a whole-model reference."""

from __future__ import annotations

import shutil

import pytest
import torch

from _dist import assert_adamw_parity, run_distributed
from conftest import make_run
from test_bld import BETAS, BLD, _lrs

C = {"bld": {**BLD, "checkpoint_every": 3}}  # 8 steps of 4 x 32 tokens (examples/bld_debug.yaml)
KEYS = ["R000-001.mlp_512", "R001-002.mlp_512", "R002-003.mlp_512"]


def _bld_cfg(c: dict):
    from megapuzzle.stages.bld.bld import BLDConfig
    from megapuzzle.config import section

    return section(c, "bld", BLDConfig)


def _blocks(run) -> dict[str, dict[str, torch.Tensor]]:
    from megapuzzle.stages.fusion_runs import load_run_index, run_block_ffn

    return {k: run_block_ffn(run, k) for k in load_run_index(run)["blocks"]}


def _fresh(base, tmp):
    run = tmp / "run"
    for n in ("parent", "data"):
        shutil.copytree(base / n, run / n)
    return run


@pytest.fixture(scope="module")
def base(debug_parent, tmp_path_factory):
    return make_run(debug_parent, tmp_path_factory.mktemp("fb") / "base")


@pytest.fixture(scope="module")
def one(base, tmp_path_factory):
    """Run blocks trained in one process (TP = PP = 1): the reference."""
    from megapuzzle.stages.fusion_runs import run_bld

    torch.set_num_threads(1)
    run = _fresh(base, tmp_path_factory.mktemp("one"))
    idx = run_bld(run, _bld_cfg(C), 2)
    return run, idx


def test_run_blocks_train_from_the_fold_through_bld(one):
    from megapuzzle.stages.fusion_runs import run_bld

    run, idx = one
    assert sorted(idx["blocks"]) == KEYS  # no library: only the folds of the parent's FFNs
    for e in idx["blocks"].values():
        assert e["start"] == "parent" and e["init"] == "fold of parent" and e["steps"] == 8
        assert 0 < e["nmse_final"] < e["nmse_init"]  # BLD across the run improves on the exact fold
    assert not list((run / "state" / "bld_runs").glob("*/rank*"))  # states removed once written
    assert run_bld(run, _bld_cfg(C), 2)["rank_result"]["trained"] == []  # up to date: nothing retrained


def _record_reads():
    """Record every tensor name the real lazy reader reads in this process (and its dtype)."""
    from megapuzzle.checkpoints import shards

    reads, orig = [], shards.SafetensorsReader.read

    def read(self, name, rows=None, cols=None):
        out = orig(self, name, rows, cols)
        reads.append((name, str(out.dtype)))
        return out

    shards.SafetensorsReader.read = read
    return reads


def _worker(info, run: str, c: dict, max_run: int = 2):
    from megapuzzle.stages.fusion_runs import run_bld

    torch.set_num_threads(1)
    reads = _record_reads()
    idx = run_bld(run, _bld_cfg(c), max_run)
    return {"pp_rank": info.pp_rank, "trained": idx["rank_result"]["trained"], "reads": reads}


def test_pp2_gives_the_one_process_blocks_and_each_stage_reads_only_its_layers(one, base, tmp_path):
    """Stage 0 holds layers 0-1, stage 1 layers 2-3: run 1-2 trains on stage 1 from x_1 / m_1 carried
    with the boundary state."""
    from megapuzzle.fusion import FFN_NAMES

    run0, _ = one
    run = _fresh(base, tmp_path)
    res = run_distributed(_worker, world=2, pp=2, args=(str(run), {"bld": {**C["bld"], "pipeline_parallel": 2}}))
    assert [r["trained"] for r in res] == [KEYS[:1], KEYS[1:]]  # a run trains on its last layer's stage
    a, b = _blocks(run0), _blocks(run)
    assert sorted(b) == KEYS
    for k in b:
        for n in a[k]:  # the same ops in the same order: exact (0 observed)
            assert torch.equal(a[k][n], b[k][n]), (k, n)
    for r in res:  # a rank reads its stage's layers (teacher + fold), and of layer 1 only the fold's FFN
        layers = {}
        for n, _ in r["reads"]:
            if n.startswith("model.layers."):
                layers.setdefault(int(n.split(".")[2]), set()).add(n.split(".", 3)[3])
        if r["pp_rank"] == 0:
            assert set(layers) == {0, 1}, layers
        else:
            assert set(layers) == {1, 2, 3} and layers[1] == set(FFN_NAMES), layers
        assert {d for _, d in r["reads"]} == {"torch.float32"}  # the run's dtype, no upcast copy
    print(f"\nPP=2 reads per rank: {[len(r['reads']) for r in res]} tensors")


def test_dp2_splits_the_run_blocks_and_gives_the_one_process_blocks(one, base, tmp_path):
    run0, _ = one
    run = _fresh(base, tmp_path)
    res = run_distributed(_worker, world=2, args=(str(run), C))
    k0, k1 = (set(r["trained"]) for r in res)
    assert k0 and k1 and not k0 & k1 and sorted(k0 | k1) == KEYS  # bld's split: disjoint, complete
    a, b = _blocks(run0), _blocks(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_tp2_trains_the_same_blocks_within_adamw_noise(one, base, tmp_path):
    run0, idx0 = one
    run = _fresh(base, tmp_path)
    c = {"bld": {**C["bld"], "tensor_parallel": 2}}
    res = run_distributed(_worker, world=2, tp=2, args=(str(run), c))
    assert res[0]["trained"] == res[1]["trained"] == KEYS  # TP ranks train the same blocks
    ref, par = _blocks(run0), _blocks(run)
    flat = lambda lib: {f"{k}/{n}": t for k in KEYS for n, t in lib[k].items()}  # noqa: E731
    # TP=2 reduces in another order: the blocks after 8 AdamW steps within what that fp32 noise can
    # become through AdamW (bounds derived in tests/_dist.py)
    worst = assert_adamw_parity(flat(ref), flat(par), _lrs({"bld": c["bld"]}), BETAS)
    print(f"\nTP=2 run blocks vs one process: weights vs their AdamW bounds {worst}")
    from megapuzzle.stages.fusion_runs import load_run_index

    idx = load_run_index(run)["blocks"]
    for k in KEYS:
        for m in ("nmse_init", "nmse_final"):
            assert abs(idx[k][m] - idx0["blocks"][k][m]) <= 1e-4 * idx0["blocks"][k][m], (k, m)


def test_kill_and_resume_gives_the_same_blocks(one, base, tmp_path):
    from megapuzzle.stages.fusion_runs import run_bld
    from megapuzzle.train.faults import kill_after

    run0, _ = one
    run = _fresh(base, tmp_path)
    with kill_after("bld", 5):  # checkpoint at step 3
        assert run_bld(run, _bld_cfg(C), 2)["rank_result"]["stopped_at"] == 5
    assert run_bld(run, _bld_cfg(C), 2)["rank_result"]["resumed_from"] == 3
    a, b = _blocks(run0), _blocks(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_cached_pass_run_score_equals_a_whole_model_reference(one, tmp_path):
    """score_runs (score's cached parent pass, candidates stacked through the shared suffix) against
    the whole tiny model with the run replaced, run from the embedding (evaluate.quality_metrics)."""
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes, load_checkpoint
    from megapuzzle.config import section
    from megapuzzle.config import RunDir
    from megapuzzle.stages.evaluate.evaluate import build_model, quality_metrics
    from megapuzzle.fusion import run_arch
    from megapuzzle.stages.fusion_runs import run_block_ffn, score_runs
    from megapuzzle.stages.score.score import ScoreConfig, heldout_batches

    run0, _ = one
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    sc = section({"score": {"batch_size": 2, "seq_len": 32, "num_batches": 2, "candidates_per_pass": 2}},
                 "score", ScoreConfig)
    idx = score_runs(run, sc)["blocks"]
    parent, tensors, _ = load_checkpoint(run / "parent", dtype=torch.float32)
    sd = {n: tensors[n] for n in tensors.keys()}  # the whole tiny parent: a test reference only
    pm, batches = build_model(parent, sd), heldout_batches(RunDir(run), sc)
    for key, e in idx.items():
        i, j = e["first"], e["last"]
        from megapuzzle.arch import FFNVariant, LayerArch

        arch = run_arch(parent, i, j, LayerArch(parent.layers[i].attention, FFNVariant.from_name(e["ffn"])))
        ffn = run_block_ffn(run, key)
        p = f"model.layers.{i}."
        child = {n: (ffn[n[len(p):]] if n.startswith(p) and n[len(p):] in ffn else sd[n])
                 for n in expected_canonical_shapes(arch)}
        q = quality_metrics(pm, {"parent": pm, "run": build_model(arch, child)}, batches)
        ref = {"kl": q["run"]["kl_to_parent"], "top1": q["run"]["top1_agreement"],
               "lm_loss_delta": q["run"]["lm_loss"] - q["parent"]["lm_loss"]}
        print(f"\n{key}: cached {[e[m] for m in ref]} vs whole model {list(ref.values())}")
        # fp32 forwards of the same layers on the same tokens (batched differently): per-token
        # log-probs agree to ~1e-6 relative, so KL (~1e-2) and the LM-loss delta to ~1e-5 absolute
        assert e["kl"] > 0 and abs(e["kl"] - ref["kl"]) <= 1e-5 + 1e-4 * ref["kl"], (e["kl"], ref["kl"])
        assert abs(e["lm_loss_delta"] - ref["lm_loss_delta"]) <= 1e-5, (e["lm_loss_delta"], ref["lm_loss_delta"])
        assert e["top1"] == pytest.approx(ref["top1"], abs=1.0 / 64)  # at most one near-tie flips


def test_run_scoring_resumes_after_a_kill_and_splits_over_dp(one, tmp_path):
    from megapuzzle.config import section
    from megapuzzle.stages.fusion_runs import score_runs
    from megapuzzle.stages.score.score import ScoreConfig
    from megapuzzle.train.faults import kill_after

    run0, _ = one
    sc = section({"score": {"batch_size": 2, "seq_len": 32, "num_batches": 2}}, "score", ScoreConfig)
    ref = tmp_path / "ref"
    shutil.copytree(run0, ref)
    want = score_runs(ref, sc)["blocks"]
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    with kill_after("score_runs", 1):
        assert score_runs(run, sc)["stopped_after"] == 1
    saved = (run / "state" / "score_runs" / "rank000.json").read_text()
    assert saved.count('"kl"') == 1  # one block finished and kept
    got = score_runs(run, sc)["blocks"]
    assert {k: (e["kl"], e["top1"], e["lm_loss_delta"]) for k, e in got.items()} == \
           {k: (e["kl"], e["top1"], e["lm_loss_delta"]) for k, e in want.items()}
    dp = tmp_path / "dp"
    shutil.copytree(run0, dp)
    res = run_distributed(_score_worker, world=2, args=(str(dp), {"batch_size": 2, "seq_len": 32, "num_batches": 2}))
    assert res[0] == {k: (e["kl"], e["top1"], e["lm_loss_delta"]) for k, e in want.items()}


def test_run_scoring_at_pp2_gives_the_one_process_scores(one, tmp_path):
    """Run blocks are scored on score's layout: at score.pipeline_parallel=2 each stage holds only its
    layers, the stacked stream travels stage to stage and the last stage scores: bitwise PP=1's."""
    from megapuzzle.config import section
    from megapuzzle.stages.fusion_runs import score_runs
    from megapuzzle.stages.score.score import ScoreConfig

    run0, _ = one
    score = {"batch_size": 2, "seq_len": 32, "num_batches": 2}
    ref = tmp_path / "ref"
    shutil.copytree(run0, ref)
    want = score_runs(ref, section({"score": score}, "score", ScoreConfig))["blocks"]
    pp = tmp_path / "pp"
    shutil.copytree(run0, pp)
    res = run_distributed(_score_worker, world=2, pp=2, args=(str(pp), {**score, "pipeline_parallel": 2}))
    assert res[0] == {k: (e["kl"], e["top1"], e["lm_loss_delta"]) for k, e in want.items()}
    assert {f.name for f in (pp / "state" / "score_runs").glob("*.json")} == {"rank001.json"}  # the last stage


def _score_worker(info, run: str, score: dict):
    from megapuzzle.config import section
    from megapuzzle.stages.fusion_runs import score_runs
    from megapuzzle.stages.score.score import ScoreConfig

    idx = score_runs(run, section({"score": score}, "score", ScoreConfig))
    return {k: (e["kl"], e["top1"], e["lm_loss_delta"]) for k, e in idx["blocks"].items()} if info.rank == 0 else None
