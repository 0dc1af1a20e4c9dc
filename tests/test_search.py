"""Scoring, the MIP stage and realize on the debug parent's real library (no stand-ins):
cached + stacked scoring equals the naive loop, the stage's optimum equals brute force over
the library, infeasible budgets name the binding constraint, realizing the parent's own
variants reproduces the parent's logits."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from conftest import SEARCH_CFG, make_searched_run
from _logs import captured
from megapuzzle.train.faults import kill_after
from megapuzzle.config import RunDir, section
from megapuzzle.errors import UserError
from megapuzzle.stages.mip.mip import MIPConfig, library_candidates, run_mip, ScenarioCosts, load_scores
from megapuzzle.stages.score.score import ScoreConfig, run_score

CFG = SEARCH_CFG
QUIET: dict = {}


@pytest.fixture(scope="module")
def run(debug_parent, tmp_path_factory):
    return make_searched_run(debug_parent, tmp_path_factory.mktemp("search") / "run", CFG)


def test_scores_cover_the_library_and_parent_blocks_are_exact(run):
    scores = json.loads((run / "scores.json").read_text())
    index = json.loads((run / "library/index.json").read_text())["blocks"]
    assert set(scores["blocks"]) == set(index)
    for key, b in scores["blocks"].items():
        assert b["kl"] >= -1e-6 and 0 <= b["top1"] <= 1
        if index[key]["init"] == "parent":  # the parent's own block: the parent itself
            assert abs(b["kl"]) < 1e-5 and b["top1"] == 1.0 and b["topk"] == 1.0
            assert abs(b["lm_loss"] - scores["parent"]["lm_loss"]) < 1e-4
    # removing a whole FFN hurts more than halving it, at every layer
    for l in range(4):
        assert scores["blocks"][f"L{l:03d}.ffn.no_op"]["kl"] > scores["blocks"][f"L{l:03d}.ffn.mlp_128"]["kl"]


def test_cached_stacked_scoring_equals_the_naive_loop(run):
    """The reference, written here and not in the stage: per block and batch, the whole parent with
    that one layer swapped, from the embedding (no kept streams, no stacking), scored with the
    same metric definitions."""
    import torch

    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.library import BlockLibrary
    from megapuzzle.metrics import kl_per_token, nll_per_token, top1_matches, topk_overlap
    from megapuzzle.model.runner import StageRunner
    from megapuzzle.runtime.distributed import init_distributed
    from megapuzzle.stages.score.score import block_layer_module, build_parent_stage, heldout_batches, library_blocks

    cfg = section(CFG, "score", ScoreConfig)
    init_distributed(tp=1)
    parent, tensors, _ = load_checkpoint(run / "parent")
    runner = StageRunner(build_parent_stage(parent, tensors, torch.float32))
    library = BlockLibrary(run / "library")
    batches = heldout_batches(RunDir(run), cfg)
    fast = json.loads((run / "scores.json").read_text())
    refs = library_blocks(parent, library)
    assert len(refs) == len(fast["blocks"]) > 8
    with torch.no_grad():
        for ref in refs[::3]:  # every third block: the reference is slow on purpose
            module = block_layer_module(parent, ref, library, tensors, 1)
            tot = dict.fromkeys(("kl", "lm_loss", "top1", "topk"), 0.0)
            n = 0
            for tokens in batches:
                inp, tgt = tokens[:, :-1], tokens[:, 1:]
                p_lp, c_lp = runner.log_probs(inp), runner.log_probs(inp, replace={ref.layer: module})
                tot["kl"] += kl_per_token(p_lp, c_lp).sum().item()
                tot["lm_loss"] += nll_per_token(c_lp, tgt).sum().item()
                tot["top1"] += top1_matches(c_lp, p_lp).sum().item()
                tot["topk"] += topk_overlap(p_lp, c_lp, cfg.top_k).sum().item()
                n += tgt.numel()
            for m, v in tot.items():  # fp32 sums in another order: reduction-order noise only
                assert v / n == pytest.approx(fast["blocks"][ref.key][m], rel=1e-4, abs=1e-5), (ref.key, m)


def test_bf16_scoring_ranks_like_fp32_on_a_sharded_parent(run, tmp_path):
    """score.dtype=bfloat16 builds parent and candidates in bf16 (KL still in fp32) from a
    parent resharded into several files: close to the fp32 scores, same ranking per layer."""
    import dataclasses
    import shutil

    from megapuzzle.checkpoints.canonical import load_checkpoint, save_checkpoint

    bf = tmp_path / "bf16"
    arch, tensors, meta = load_checkpoint(run / "parent")
    save_checkpoint(bf / "parent", arch, tensors, meta=meta, max_shard_bytes=40_000)
    assert (bf / "parent" / "model.safetensors.index.json").is_file()
    shutil.copytree(run / "data", bf / "data")
    shutil.copytree(run / "library", bf / "library")
    cfg = dataclasses.replace(section(CFG, "score", ScoreConfig), dtype="bfloat16")
    res = run_score(bf, cfg, progress=False, **QUIET)["blocks"]
    ref = json.loads((run / "scores.json").read_text())["blocks"]
    assert res.keys() == ref.keys()
    for key, b in res.items():
        assert b["kl"] == pytest.approx(ref[key]["kl"], rel=0.05, abs=2e-3), key
    assert any(b["kl"] != ref[k]["kl"] for k, b in res.items())  # bf16 did run: not the fp32 numbers
    for l in range(4):
        assert res[f"L{l:03d}.ffn.no_op"]["kl"] > res[f"L{l:03d}.ffn.mlp_128"]["kl"]
    with pytest.raises(UserError, match="score.dtype"):
        ScoreConfig(dtype="fp8")


def _score_on_ranks(info, run_dir, cfg):
    return run_score(run_dir, cfg, tp=info.tp_size, progress=False, **QUIET)


def test_tp2_scoring_equals_tp1(run, tmp_path):
    """score at TP=2 (each rank reads its slices of the parent and the blocks) gives TP=1's scores."""
    import shutil

    from _dist import run_distributed

    r = tmp_path / "tp2"
    for d in ("parent", "data", "library"):
        shutil.copytree(run / d, r / d)
    index = json.loads((r / "library/index.json").read_text())  # KV 1 does not split over TP=2
    index["blocks"] = {k: v for k, v in index["blocks"].items() if "kv1" not in k}
    (r / "library/index.json").write_text(json.dumps(index))
    res = run_distributed(_score_on_ranks, world=2, tp=2, args=(r, section(CFG, "score", ScoreConfig)))[0]
    ref = json.loads((run / "scores.json").read_text())
    assert res["parent"]["lm_loss"] == pytest.approx(ref["parent"]["lm_loss"], rel=1e-5)
    for key, b in res["blocks"].items():
        assert b["kl"] == pytest.approx(ref["blocks"][key]["kl"], rel=1e-3, abs=1e-5), key


def test_a_small_activation_cache_scores_in_groups_with_the_same_result(run, tmp_path):
    """score.cache_gb below one batch's parent pass: one batch per group, identical scores."""
    import dataclasses
    import shutil

    from megapuzzle.stages.score.score import cache_plan

    small = tmp_path / "small"
    for d in ("parent", "data", "library"):
        shutil.copytree(run / d, small / d)
    cfg = dataclasses.replace(section(CFG, "score", ScoreConfig), cache_gb=1e-6)
    from megapuzzle.checkpoints.canonical import load_arch

    per_batch, per_group = cache_plan(load_arch(run / "parent"), cfg, torch.float32, cfg.num_batches)
    assert per_group == 1 < cfg.num_batches and per_batch > 1e-6 * (1 << 30)
    with captured() as lines:
        res = run_score(small, cfg, progress=False)["blocks"]
    ref = json.loads((run / "scores.json").read_text())["blocks"]
    assert any("in groups of 1" in ln for ln in lines)
    assert res == ref  # same sums in the same order: bitwise the same scores


def test_scoring_resumes_after_a_kill(run, tmp_path):
    import shutil

    r = tmp_path / "r"
    for d in ("parent", "data", "library"):
        shutil.copytree(run / d, r / d)
    cfg = section(CFG, "score", ScoreConfig)
    with kill_after("score", 5):
        assert run_score(r, cfg, progress=False, **QUIET) == {"stopped_after": 5}
    assert not (r / "scores.json").exists()
    res = run_score(r, cfg, progress=False, **QUIET)
    assert res["blocks"] == json.loads((run / "scores.json").read_text())["blocks"]


def _brute_force(run, cfg: MIPConfig, batch: int):
    """Best summed score over every combination of library candidates meeting the budgets."""
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.costs.table import load_costs
    from megapuzzle.library import BlockLibrary

    parent = load_arch(run / "parent")
    cands = library_candidates(parent, BlockLibrary(run / "library"), load_scores(run / "scores.json"), cfg.metric)
    sc = ScenarioCosts(load_costs(run / "costs.json"), parent, cfg)
    limit = batch * cfg.gen_len / (cfg.throughput_x * sc.tokens_per_s(parent, batch))
    best, best_choice = np.inf, None
    for choice in itertools.product(*[range(len(c)) for c in cands.layers]):
        child = parent.with_layers([cands.layers[l][v] for l, v in enumerate(choice)])
        if sc.generation_time(child, batch) <= limit * (1 + 1e-9):
            s = sum(cands.scores[l][v] for l, v in enumerate(choice))
            if s < best - 1e-12:
                best, best_choice = s, choice
    return best, best_choice


@pytest.mark.parametrize("x", [1.2, 1.6])
def test_mip_stage_optimum_equals_brute_force_over_the_library(run, x):
    cfg = MIPConfig(throughput_x=x, batch_sizes=(2,), prefill_len=8, gen_len=4, solver="highs")
    out = run_mip(run, cfg, **QUIET)
    best, _ = _brute_force(run, cfg, 2)
    assert out["solutions"][0]["objective"] == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert out["solutions"][0]["predicted_speedup"] >= x * (1 - 1e-9)


def test_mip_stage_unreachable_target_says_what_is_reachable(run):
    import re

    scenario = dict(batch_sizes=(1, 2), prefill_len=8, gen_len=4)
    with pytest.raises(UserError) as e:
        run_mip(run, MIPConfig(throughput_x=1000.0, **scenario), **QUIET)
    msg = str(e.value)
    m = re.match(r"mip\.throughput_x 1000 is unreachable: the fastest child of this search space runs ([0-9.]+)x "
                 r"the parent .*; ask for at most \1x, or ", msg)
    assert m and "\n" not in msg, msg
    assert "attention_no_op" not in msg  # the debug search space already has no-op blocks
    x = float(m.group(1))
    assert x > 1.3
    # that figure is the true limit: a little under it is feasible, a little over it is not
    out = run_mip(run, MIPConfig(throughput_x=x * 0.995, num_solutions=1, **scenario), **QUIET)
    assert out["solutions"][0]["predicted_speedup"] >= x * 0.995 * (1 - 1e-9)
    with pytest.raises(UserError, match="is unreachable"):
        run_mip(run, MIPConfig(throughput_x=x * 1.01, **scenario), **QUIET)


def test_mip_stage_infeasible_memory_names_the_constraint(run):
    with pytest.raises(UserError, match="memory_bytes") as e:  # reachable speed, impossible memory
        run_mip(run, MIPConfig(throughput_x=1.1, memory_gb=1e-6, batch_sizes=(1,), prefill_len=8, gen_len=4), **QUIET)
    assert "least achievable" in str(e.value) and "\n" not in str(e.value)


def test_realizing_the_parent_variants_reproduces_the_parent(run, tmp_path):
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.model.forward import forward_logits
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import load_canonical_into_model
    from megapuzzle.stages.realize.realize import realize

    parent, pt, _ = load_checkpoint(run / "parent")
    dest = realize(run, layers=list(parent.layers), out=tmp_path / "child", **QUIET)
    child, ct, _ = load_checkpoint(dest)
    assert child == parent
    tokens = torch.randint(0, parent.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for arch, t in ((parent, pt), (child, ct)):
        m = build_gpt_model(arch)
        load_canonical_into_model(m, t, arch)
        with torch.no_grad():
            logits.append(forward_logits(m, tokens))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_realize_a_mip_solution_and_export_loads(run, tmp_path):
    from transformers import AutoModelForCausalLM

    from megapuzzle.checkpoints.export_hf import export_hf
    from megapuzzle.stages.realize.realize import realize

    out = run_mip(run, MIPConfig(throughput_x=1.3, batch_sizes=(1, 2), prefill_len=8, gen_len=4, num_solutions=2),
                  **QUIET)
    dest = realize(run, 1, out=tmp_path / "child", **QUIET)
    from megapuzzle.checkpoints.canonical import load_arch

    arch = load_arch(dest)
    assert [{"attention": l.attention.name, "ffn": l.ffn.name} for l in arch.layers] == out["solutions"][1]["layers"]
    export_hf(dest, tmp_path / "export", dtype="fp32")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert sum(p.numel() for p in m.parameters()) == arch.num_params()


def test_a_retrained_block_is_rescored_and_the_rest_reused(run, tmp_path):
    import shutil

    from megapuzzle.library import BlockLibrary

    r = tmp_path / "r"
    for d in ("parent", "data", "library", "state"):
        shutil.copytree(run / d, r / d)
    lib = BlockLibrary(r / "library")
    key = "L001.ffn.mlp_128"
    t = {k: v * 0.5 for k, v in lib.load_block(key).items()}  # as if retrained: other weights
    lib.add_block(key, t, {k: v for k, v in lib.entry(key).items() if k not in ("sha256", "file", "key")})
    res = run_score(r, section(CFG, "score", ScoreConfig), progress=False, **QUIET)
    old = json.loads((run / "scores.json").read_text())["blocks"]
    assert res["blocks"][key]["kl"] != pytest.approx(old[key]["kl"], rel=1e-6)
    for k in old:
        if k != key:
            assert res["blocks"][k]["kl"] == old[k]["kl"], k
