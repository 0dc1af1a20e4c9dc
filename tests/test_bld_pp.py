"""BLD under pipeline parallelism (and BLD's fp8 switch): PP=2 and TP=2 x PP=2 give the single
process's library, a PP=2 kill + resume restarts every stage from one step (or all from
scratch when the stages disagree), a stage without blocks relays (or, beyond the deepest stage
with work, skips), and bad pipeline_parallel / fp8 settings fail at start in one line."""

from __future__ import annotations

import argparse

import pytest
import torch

from _dist import assert_adamw_parity, run_distributed
from megapuzzle.train.faults import kill_after
from megapuzzle.stages.bld.bld import BLDConfig, add_cli_args, run_bld, run_cli
from megapuzzle.errors import UserError
from megapuzzle.library import BlockLibrary
import test_bld
from test_bld import BETAS, BLD, EXAMPLE, QUIET, _lib_tensors, _lrs, cfg, fresh

base, full = test_bld.base, test_bld.full  # its fixtures (the one-process library), built again for this module

# PP=2 on the 4-layer debug parent: stage 0 holds layers 0-1, stage 1 layers 2-3.
PP2 = {"pipeline_parallel": 2}


def _worker(info, run: str, c: dict, stop_after: int | None = None):
    torch.set_num_threads(1)
    if stop_after is None:
        return run_bld(run, c, progress=False)
    with kill_after("bld", stop_after):
        return run_bld(run, c, progress=False)


def _diff(a: dict, b: dict, keys=None) -> tuple[float, float]:
    """(max abs, max relative-to-max|a|) difference over the blocks' tensors; asserts same keys."""
    keys = sorted(a) if keys is None else keys
    mabs = mrel = 0.0
    for k in keys:
        assert a[k].keys() == b[k].keys(), k
        for n in a[k]:
            d = (a[k][n].double() - b[k][n].double()).abs().max().item()
            mabs = max(mabs, d)
            mrel = max(mrel, d / max(a[k][n].double().abs().max().item(), 1e-30))
    return mabs, mrel


def _same_nmse(run0, run, keys, rel: float) -> None:
    e0, e1 = BlockLibrary(run0 / "library").entries(), BlockLibrary(run / "library").entries()
    for k in keys:
        for m in ("init_nmse", "final_nmse"):
            assert abs(e1[k][m] - e0[k][m]) <= rel * abs(e0[k][m]) + 1e-12, (k, m, e1[k][m], e0[k][m])


def test_pp2_gives_the_same_library_as_one_process(full, base, tmp_path):
    run0, res0 = full
    run = fresh(base, tmp_path)
    res = run_distributed(_worker, world=2, pp=2, args=(str(run), cfg(**PP2)))
    assert [r["pp_rank"] for r in res] == [0, 1]
    assert {int(k[1:4]) for k in res[0]["trained"]} == {0, 1} and {int(k[1:4]) for k in res[1]["trained"]} == {2, 3}
    assert sorted(res[0]["trained"] + res[1]["trained"]) == sorted(res0["trained"])
    a, b = _lib_tensors(run0), _lib_tensors(run)
    assert a.keys() == b.keys()
    mabs, mrel = _diff(a, b)
    print(f"\nPP=2 vs one process: max abs diff {mabs:.3g}, max rel diff {mrel:.3g}")
    assert mrel <= 1e-5, (mabs, mrel)  # fp32; the same ops in the same order: 0 observed
    _same_nmse(run0, run, res0["trained"], 1e-6)
    assert {p.name for p in (run / "tb" / "bld").iterdir()} == {"dp000_pp000", "dp000_pp001"}
    assert not list((run / "state" / "bld").glob("*/rank*"))


def test_tp2_pp2_gives_the_same_library(full, base, tmp_path):
    """TP=2 x PP=2 (world 4) is TP=2 x PP=1 exactly, and the single process up to TP's rounding."""
    run0, _ = full
    run, run_tp = fresh(base, tmp_path / "pp"), fresh(base, tmp_path / "tp")
    c = cfg(space={"kv_heads": []}, tensor_parallel=2, layers=[1, 2], **PP2)  # kv1 cannot be split over 2 ranks
    res = run_distributed(_worker, world=4, tp=2, pp=2, args=(str(run), c))
    assert [(r["pp_rank"], r["dp_rank"]) for r in res] == [(0, 0), (0, 0), (1, 0), (1, 0)]
    assert res[0]["trained"] == res[1]["trained"] and res[2]["trained"] == res[3]["trained"]
    keys = res[0]["trained"] + res[2]["trained"]
    assert len(keys) == 2 * 5 and all(k.startswith("L001") for k in res[0]["trained"])
    run_distributed(_worker, world=2, tp=2, args=(str(run_tp), {**c, "bld": {**c["bld"], "pipeline_parallel": 1}}))
    mabs, mrel = _diff(_lib_tensors(run_tp), _lib_tensors(run), keys)
    print(f"\nTP=2 x PP=2 vs TP=2: max abs diff {mabs:.3g}, max rel diff {mrel:.3g}")
    assert mrel <= 1e-5, (mabs, mrel)  # the same TP ops in the same order: 0 observed
    _same_nmse(run_tp, run, keys, 1e-6)
    # TP=2 reduces in another order: the blocks after 8 AdamW steps within what that fp32 noise can
    # become through AdamW (bounds derived in tests/_dist.py)
    ref, par = _lib_tensors(run0), _lib_tensors(run)
    flat = lambda lib: {f"{k}/{n}": t for k in keys for n, t in lib[k].items()}  # noqa: E731
    worst = assert_adamw_parity(flat(ref), flat(par), _lrs(c), BETAS)
    print(f"TP=2 x PP=2 vs one process: weights vs their AdamW bounds {worst}")
    _same_nmse(run0, run, keys, 1e-4)  # as test_tp2_gives_the_same_losses_as_tp1


def test_dp2_pp2_splits_each_stage_over_its_data_parallel_ranks(full, base, tmp_path):
    run0, res0 = full
    run = fresh(base, tmp_path)
    res = run_distributed(_worker, world=4, pp=2, args=(str(run), cfg(**PP2)))
    assert [(r["pp_rank"], r["dp_rank"]) for r in res] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for stage in (0, 1):
        k0, k1 = (set(r["trained"]) for r in res if r["pp_rank"] == stage)
        assert k0 and k1 and not k0 & k1 and {int(k[1:4]) // 2 for k in k0 | k1} == {stage}
    assert sorted(k for r in res for k in r["trained"]) == sorted(res0["trained"])
    a, b = _lib_tensors(run0), _lib_tensors(run)
    assert a.keys() == b.keys() and _diff(a, b)[1] <= 1e-5  # 0 observed
    _same_nmse(run0, run, res0["trained"], 1e-6)


def test_pp2_kill_and_resume_gives_the_same_library(full, base, tmp_path):
    run0, _ = full
    run = fresh(base, tmp_path)
    res = run_distributed(_worker, world=2, pp=2, args=(str(run), cfg(**PP2), 5))  # checkpoint at 3
    assert [r["stopped_at"] for r in res] == [5, 5]
    latest = sorted((run / "state" / "bld").glob("*/rank*/latest"))
    assert [p.parent.name for p in latest] == ["rank000", "rank001"]
    assert all(p.read_text().strip() == "step_00000003" for p in latest)
    res = run_distributed(_worker, world=2, pp=2, args=(str(run), cfg(**PP2)))
    assert [r["resumed_from"] for r in res] == [3, 3]
    a, b = _lib_tensors(run0), _lib_tensors(run)
    assert a.keys() == b.keys() and _diff(a, b)[1] <= 1e-5
    _same_nmse(run0, run, a.keys(), 1e-6)


def test_pp2_stages_at_different_steps_restart_together(full, base, tmp_path):
    run0, _ = full
    run = fresh(base, tmp_path)
    run_distributed(_worker, world=2, pp=2, args=(str(run), cfg(**PP2), 7))  # checkpoints at 3 and 6
    (l1,) = (run / "state" / "bld").glob("*/rank001/latest")
    l1.write_text("step_00000003\n")  # as if stage 1 was killed while saving step 6
    res = run_distributed(_worker, world=2, pp=2, args=(str(run), cfg(**PP2)))
    assert [r["resumed_from"] for r in res] == [None, None]  # stage 0 alone could resume: both restart
    assert _diff(_lib_tensors(run0), _lib_tensors(run))[1] <= 1e-5


def test_pp2_stage_with_only_no_op_blocks_follows_the_pipeline(full, base, tmp_path):
    """Stage 1 retrains only a no-op block (nothing to optimise) while stage 0 trains: stage 1
    still takes every pass, checkpoints its (empty) state and resumes from the common step."""
    run0, _ = full
    run = fresh(base, tmp_path, with_library=run0)
    lib = BlockLibrary(run / "library")
    for k in ("L000.ffn.linear", "L003.attention.no_op"):
        lib.file_path(k).unlink()
    res = run_distributed(_worker, world=2, pp=2, args=(str(run), cfg(**PP2), 5))
    assert [r["trained"] for r in res] == [["L000.ffn.linear"], ["L003.attention.no_op"]]
    assert [r["stopped_at"] for r in res] == [5, 5]
    res = run_distributed(_worker, world=2, pp=2, args=(str(run), cfg(**PP2)))
    assert [r["resumed_from"] for r in res] == [3, 3]
    a, b = _lib_tensors(run0), _lib_tensors(run)
    assert a.keys() == b.keys() and _diff(a, b)[1] <= 1e-5
    _same_nmse(run0, run, a.keys(), 1e-6)
    e = BlockLibrary(run / "library").entries()["L003.attention.no_op"]
    assert e["tokens"] == 0 and e["final_nmse"] == e["init_nmse"] > 0


def _tie_embeddings(run) -> None:
    """Make RUN/parent a tied-embedding parent (same layers: the same blocks train)."""
    import dataclasses

    from megapuzzle.checkpoints.canonical import load_checkpoint, save_checkpoint

    arch, tensors, meta = load_checkpoint(run / "parent")
    tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    save_checkpoint(run / "parent", dataclasses.replace(arch, tie_word_embeddings=True), tensors, meta=meta, force=True)


@pytest.mark.parametrize("layer,tied", [(3, False), (0, False), (0, True)])
def test_pp2_stage_without_blocks_relays_or_skips(full, base, tmp_path, layer, tied):
    """layers [3]: stage 0 trains nothing and relays to stage 1; layers [0]: stage 1 skips (but
    still builds its shard: with tied embeddings Megatron syncs first and last stage at build)."""
    run0, _ = full
    run = fresh(base, tmp_path)
    if tied:
        _tie_embeddings(run)
    res = run_distributed(_worker, world=2, pp=2, args=(str(run), cfg(layers=[layer], **PP2)))
    owner = 0 if layer < 2 else 1
    assert res[1 - owner]["trained"] == [] and len(res[owner]["trained"]) == 6  # 3 attention + 3 FFN variants
    assert all(k.startswith(f"L{layer:03d}") for k in res[owner]["trained"])
    keys = res[owner]["trained"]
    assert _diff(_lib_tensors(run0), _lib_tensors(run), keys)[1] <= 1e-5
    _same_nmse(run0, run, keys, 1e-6)
    if owner == 1:  # the relay ran every teacher pass, so its timings show teacher time
        assert res[0]["timings"]["teacher_s"] > 0 and res[0]["resumed_from"] is None
    else:  # beyond the deepest stage with work: no teacher pass at all
        assert res[1]["timings"].get("teacher_s", 0.0) == 0.0


def test_fp8_without_te_or_gpu_fails_at_start(base, tmp_path, monkeypatch):
    import megapuzzle.checkpoints.canonical as canonical

    run = fresh(base, tmp_path)

    def no_load(*a, **k):
        raise AssertionError("the parent was loaded before the fp8 check")

    monkeypatch.setattr(canonical, "load_checkpoint", no_load)
    monkeypatch.setattr(canonical, "load_arch", no_load)
    with pytest.raises(UserError, match=r"bld\.fp8: .*(drop fp8|\[gpu\] extra)") as e:
        run_bld(run, cfg(fp8=True, fp8_recipe="current"), **QUIET)
    assert "\n" not in str(e.value)
    assert not (run / "library").exists() and not (run / "state").exists()
    with pytest.raises(UserError, match="fp8_recipe"):
        BLDConfig(fp8=True, fp8_recipe="mxfp8")
    with pytest.raises(UserError, match="bld.fp8 must be"):
        BLDConfig(fp8="yes")


def test_bad_pipeline_parallel_is_one_line(base, tmp_path):
    run = fresh(base, tmp_path)
    for bad in (0, -1, 1.5):
        with pytest.raises(UserError, match="bld.pipeline_parallel must be an integer >= 1"):
            BLDConfig(pipeline_parallel=bad)
    with pytest.raises(UserError, match=r"pipeline_parallel=5: 4 layers cannot fill 5 pipeline stages") as e:
        run_bld(run, cfg(pipeline_parallel=5), **QUIET)
    assert "\n" not in str(e.value)
    p = argparse.ArgumentParser()
    add_cli_args(p)
    with pytest.raises(UserError, match="pipeline_parallel=2.*world size 1 is not divisible"):
        run_cli(p.parse_args(["--config", str(EXAMPLE), "--run-dir", str(run), "--no-progress", "--pp", "2"]))
    assert not (run / "library").exists()


def test_layout_settings_keep_the_training_signature():
    """pipeline_parallel / tensor_parallel never change trained weights; fp8, keep_best and a
    non-fp32 dtype do (dtype float32, auto on CPU, keeps the old signature).
    Libraries trained before keep_best existed (no init fallback) retrain."""
    import hashlib
    import json

    from megapuzzle.config import section_dict

    c = {k: tuple(v) if isinstance(v, list) else v for k, v in BLD.items()}
    sig = BLDConfig(**c).training_signature()
    before = {k: v for k, v in section_dict(BLDConfig(**c)).items()  # the fields before PP / fp8 / dtype
              if k not in ("checkpoint_every", "log_every", "layers", "mode", "coupled_pairs", "tensor_parallel",
                           "pipeline_parallel", "fp8", "fp8_recipe", "dtype")}
    assert sig == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    before.pop("keep_best")
    assert sig != hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert BLDConfig(**c, keep_best=False).training_signature() != sig
    assert BLDConfig(**c, pipeline_parallel=2, tensor_parallel=2).training_signature() == sig
    assert BLDConfig(**c, dtype="float32").training_signature() == sig
    assert BLDConfig(**c, dtype="bfloat16").training_signature() != sig
    assert BLDConfig(**c, fp8_recipe="current").training_signature() == sig  # recipe without fp8: unused
    fp8 = BLDConfig(**c, fp8=True).training_signature()
    assert fp8 != sig and fp8 != BLDConfig(**c, fp8=True, fp8_recipe="current").training_signature()
