"""Fused-run candidates through the stages: bld + score of run blocks, measured fused widths, the
tiling MIP in the mip stage, realize with a run (debug parent, search_space.fusion_max_run 2)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import SEARCH_CFG, make_searched_run


@pytest.fixture(scope="module")
def fusion_run(debug_parent, tmp_path_factory):
    from megapuzzle.stages.bld.bld import BLDConfig
    from megapuzzle.config import section
    from megapuzzle.stages.fusion_runs import run_bld, score_runs
    from megapuzzle.stages.score.score import ScoreConfig

    cfg = copy.deepcopy(SEARCH_CFG)
    cfg["search_space"]["fusion_max_run"] = 2
    run = make_searched_run(debug_parent, tmp_path_factory.mktemp("fusion") / "run", cfg)
    run_bld(run, section(cfg, "bld", BLDConfig), 2)
    score_runs(run, section(cfg, "score", ScoreConfig))
    return run


def test_run_blocks_are_trained_scored_and_measured(fusion_run):
    from megapuzzle.stages.fusion_runs import load_run_index

    idx = load_run_index(fusion_run)["blocks"]
    # per window: the fold of the parent's FFNs (256 + 256) and of the library's mlp_128 blocks (128 + 128)
    assert sorted(idx) == [f"R00{i}-00{i + 1}.mlp_{w}" for i in range(3) for w in (256, 512)]
    for key, e in idx.items():
        assert e["nmse_final"] < e["nmse_init"] and e["kl"] > 0 and 0 < e["top1"] <= 1
        assert e["start"] == ("parent" if key.endswith("mlp_512") else "mlp_128")
    costs = json.loads((fusion_run / "costs.json").read_text())
    assert "ffn.mlp_512" in costs["variants"]  # the fused width is measured like any variant


def test_mip_with_runs_and_realize(fusion_run):
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.stages.fusion_runs import run_block_ffn
    from megapuzzle.library import BlockLibrary
    from megapuzzle.stages.mip.mip import MIPConfig, run_mip
    from megapuzzle.stages.realize.realize import realize

    cfg = MIPConfig(throughput_x=1.1, batch_sizes=(2,), prefill_len=8, gen_len=4, solver="highs")
    out = run_mip(fusion_run, cfg, fusion_max_run=2)
    sol = out["solutions"][0]
    assert len(sol["layers"]) == 4 and sol["predicted_speedup"] >= 1.1 - 1e-9
    single = run_mip(fusion_run, cfg, fusion_max_run=1)["solutions"][0]
    assert sol["objective"] <= single["objective"] + 1e-9  # a superset of candidates never does worse

    # realize a solution with a run (written by hand: whether the MIP picks one depends on measured costs)
    sols = json.loads((fusion_run / "mip" / "solutions.json").read_text())
    sols["solutions"] = [{"layers": [{"attention": "gqa_kv2", "ffn": "mlp_512"}, {"attention": "no_op", "ffn": "no_op"},
                                     {"attention": "gqa_kv1", "ffn": "mlp_128"}, {"attention": "gqa_kv2", "ffn": "mlp_256"}],
                          "runs": [[0, 1]], "objective": 0.0}]
    (fusion_run / "mip" / "solutions.json").write_text(json.dumps(sols))
    child = realize(fusion_run, 0, out=fusion_run / "child_runs")
    arch, t, meta = load_checkpoint(child)
    assert meta["runs"] == [[0, 1]] and arch.layers[0].name == "gqa_kv2+mlp_512"
    ffn = run_block_ffn(fusion_run, "R000-001.mlp_512")
    for n, x in ffn.items():
        assert torch.equal(t[f"model.layers.0.{n}"], x)
    lib = BlockLibrary(fusion_run / "library")
    from megapuzzle.arch import LayerArch, AttentionVariant, FFNVariant
    own = lib.layer_tensors(2, LayerArch(AttentionVariant("gqa", 1), FFNVariant("mlp", 128)))
    assert own and all(torch.equal(t[n], x) for n, x in own.items())


def test_puzzle_fusion_child_selects_with_runs_and_refuses_a_base_without_them(fusion_run, tmp_path):
    from megapuzzle.bench.baselines import run_child
    from megapuzzle.errors import UserError
    cfg = copy.deepcopy(SEARCH_CFG)
    cfg["search_space"]["fusion_max_run"] = 2
    cfg["mip"] = {"throughput_x": 1.1, "batch_sizes": [2], "prefill_len": 8, "gen_len": 4, "solver": "highs"}
    res = run_child(fusion_run, cfg, "puzzle_fusion", 1.1, tmp_path / "c", until="select")
    rec = res["record"]
    assert len(rec["layers"]) == 4 and rec["predicted_speedup"] >= 1.1 - 1e-9 and "runs" in rec
    assert (tmp_path / "c" / "library_runs").resolve() == (fusion_run / "library_runs").resolve()
    info = json.loads((tmp_path / "c" / "baseline.json").read_text())
    assert info["method"] == "puzzle_fusion" and info["fusion_max_run"] == 2 and info["runs"] == rec["runs"]

    # the same base without its run blocks, and a config without fusion: one-line refusals
    bare = tmp_path / "bare"
    bare.mkdir()
    for n in ("parent", "data", "library", "scores.json", "costs.json"):
        (bare / n).symlink_to((fusion_run / n).resolve())
    with pytest.raises(UserError, match="no run blocks"):
        run_child(bare, cfg, "puzzle_fusion", 1.1, tmp_path / "c2", until="select")
    cfg["search_space"]["fusion_max_run"] = 1
    with pytest.raises(UserError, match="fusion_max_run >= 2"):
        run_child(fusion_run, cfg, "puzzle_fusion", 1.1, tmp_path / "c3", until="select")


def test_bench_fusion_section_pairs_targets_counts_runs_and_compares_speed_at_equal_quality():
    from megapuzzle.bench.search_quality import fusion_markdown, speed_at_quality

    L = ["gqa_kv4+mlp_1024"] * 2
    rows = [{"method": "puzzle", "target": 1.2, "layers": L, "measured_x": 1.25, "retention_pct": 99.0, "objective": 0.1},
            {"method": "puzzle_fusion", "target": 1.2, "layers": L, "measured_x": 1.3, "retention_pct": 99.0,
             "objective": 0.1, "runs": []},
            {"method": "puzzle", "target": 2.0, "layers": ["a", "b"], "measured_x": 2.0, "retention_pct": 97.0},
            {"method": "puzzle_fusion", "target": 2.0, "layers": ["c", "d"], "measured_x": 2.5, "retention_pct": 97.5,
             "runs": [[0, 1]]}]
    md = fusion_markdown(rows)
    assert "1 of 2 trained puzzle_fusion children use a fused run (2x: layers 0-1)" in md
    assert "| 1.2 | 1.25 | 1.30 | 99.0 | 99.0 | none | yes |" in md and "| 0-1 | no |" in md
    assert "| 97.00 | 2.00 | 2.50 | 1.250 |" in md and "| 99.00 | 1.25 | 1.30 | 1.040 |" in md
    assert speed_at_quality([(1.5, 98.0), (2.0, 97.0)], 97.5) == 1.5 and speed_at_quality([], 90) is None
    assert fusion_markdown([r for r in rows if r["method"] == "puzzle"]) == ""
