"""`megapuzzle evaluate` on a real tiny run (debug parent -> bld -> score -> measure -> mip with a
Pareto sweep -> realize -> gkd): eval.json / report.md / pareto.png carry the right fields, the
predicted speedup is the MIP's own, and the parent against itself has KL 0 and 100% retention."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import SEARCH_CFG, make_searched_run
from megapuzzle.config import section
from megapuzzle.errors import UserError
from megapuzzle.stages.evaluate.evaluate import EvaluateConfig, run_evaluate
from megapuzzle.runtime import destroy_distributed

QUIET: dict = {}
CFG = {
    **SEARCH_CFG,
    "mip": {"throughput_x": 1.3, "batch_sizes": [1, 2], "prefill_len": 8, "gen_len": 4, "sweep_points": 4,
            "sweep_max_x": 3.0},
    "gkd": {"steps": 2, "batch_size": 4, "seq_len": 32, "eval_batches": 1, "log_every": 1, "checkpoint_every": 2},
    "evaluate": {"repeats": 1, "warmup": 0, "rounds": 1, "quality_batch_size": 4, "seq_len": 32, "eval_batches": 2},
}
MODEL_FIELDS = {"lm_loss", "accuracy", "kl_to_parent", "top1_agreement", "tokens", "params", "param_bytes",
                "kv_bytes_per_token", "kv_cache_bytes", "memory_bytes", "tokens_per_s", "total_s",
                "predicted_tokens_per_s"}


@pytest.fixture(scope="module")
def run(debug_parent, tmp_path_factory):
    from megapuzzle.stages.gkd.gkd import GKDConfig, run_gkd
    from megapuzzle.stages.mip.mip import MIPConfig, run_mip
    from megapuzzle.stages.realize.realize import realize

    r = make_searched_run(debug_parent, tmp_path_factory.mktemp("evaluate") / "run", CFG)
    run_mip(r, section(CFG, "mip", MIPConfig), **QUIET)
    realize(r, 0, **QUIET)
    run_gkd(r, section(CFG, "gkd", GKDConfig), progress=False, **QUIET)
    torch.set_num_threads(1)
    yield r
    destroy_distributed()


def test_evaluate_writes_eval_report_and_pareto(run):
    from megapuzzle.checkpoints.canonical import load_arch

    res = run_evaluate(run, section(CFG, "evaluate", EvaluateConfig), **QUIET)
    assert torch.get_num_threads() == 1  # timing pinned costs.json's threads, then restored them
    ev = json.loads((run / "eval.json").read_text())
    assert ev["speedup"] == res["speedup"]
    assert ev["child_dir"] == str(run / "gkd" / "checkpoint")  # the healed child wins over RUN/child
    assert ev["scenario"] == {"batch_size": ev["speedup"]["mip_batch_size"], "prefill_len": 8, "gen_len": 4,
                              "source": {"batch_size": "mip", "prefill_len": "mip", "gen_len": "mip"}}
    for who in ("parent", "child"):
        assert MODEL_FIELDS <= set(ev[who]), MODEL_FIELDS - set(ev[who])
        arch = load_arch(run / ("parent" if who == "parent" else "gkd/checkpoint"))
        m, b = ev[who], ev["bytes_per_param"]
        assert b == 4 and m["params"] == arch.num_params() and m["param_bytes"] == 4 * arch.num_params()
        batch = ev["scenario"]["batch_size"]  # the MIP's pick from measured (noisy) costs: 1 or 2
        assert m["kv_cache_bytes"] == batch * (8 + 4) * arch.kv_cache_bytes_per_token(4)
        assert m["memory_bytes"] == m["param_bytes"] + m["kv_cache_bytes"] and m["tokens_per_s"] > 0
        assert 0 <= m["accuracy"] <= 1 and m["lm_loss"] > 0
    assert ev["parent"]["kl_to_parent"] == 0.0 and ev["parent"]["top1_agreement"] == 1.0
    assert ev["child"]["kl_to_parent"] > 0 and ev["child"]["params"] < ev["parent"]["params"]
    assert {"lm_loss", "accuracy", "kl_to_parent"} <= set(ev["child_realized"])
    s = ev["speedup"]
    sol = json.loads((run / "mip" / "solutions.json").read_text())["solutions"][0]
    assert s["mip_solution"] == 0 and s["mip_predicted"] == sol["predicted_speedup"]
    assert s["predicted"] == pytest.approx(sol["predicted_speedup"], rel=1e-9)  # same scenario, same costs
    assert s["measured"] == pytest.approx(ev["child"]["tokens_per_s"] / ev["parent"]["tokens_per_s"])
    assert ev["quality_retention_pct"] == pytest.approx(100 * ev["child"]["accuracy"] / ev["parent"]["accuracy"])
    assert ev["gkd"]["steps"] == 2 and {"kl", "lm_loss"} <= set(ev["gkd"]["final"])

    report = (run / "report.md").read_text()
    for text in ("Quality retention", "measured speedup", "| MIP (mip/solutions.json, solution 0) |",
                 "| layer | attention | ffn | params |", "Global knowledge distillation", "![pareto](pareto.png)"):
        assert text in report, text
    arch = load_arch(run / "gkd" / "checkpoint")
    for i, layer in enumerate(arch.layers):
        assert f"| {i} | {layer.attention.name} | {layer.ffn.name} | {arch.layer_params(i):,} |" in report
    png = (run / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000 and ev["pareto_png"] == str(run / "pareto.png")


def test_the_parent_against_itself_has_zero_kl_and_full_retention(run, tmp_path):
    r = tmp_path / "self"
    for d in ("parent", "data"):
        shutil.copytree(run / d, r / d)
    shutil.copy(run / "costs.json", r / "costs.json")  # no mip/: the scenario comes from the config
    cfg = EvaluateConfig(**{**CFG["evaluate"], "batch_size": 1, "prefill_len": 6, "gen_len": 3})
    ev = run_evaluate(r, cfg, child=r / "parent", **QUIET)
    for who in ("parent", "child"):
        assert ev[who]["kl_to_parent"] == 0.0 and ev[who]["top1_agreement"] == 1.0
    assert ev["child"]["lm_loss"] == ev["parent"]["lm_loss"] and ev["quality_retention_pct"] == 100.0
    assert ev["speedup"]["predicted"] == pytest.approx(1.0) and ev["speedup"]["mip_predicted"] is None
    assert ev["scenario"]["source"] == {"batch_size": "config", "prefill_len": "config", "gen_len": "config"}
    assert ev["pareto_png"] is None and not (r / "pareto.png").exists() and ev["gkd"] is None
    assert "Quality retention: 100.0%" in (r / "report.md").read_text()


def test_bf16_quality_from_a_sharded_parent(run, tmp_path):
    """evaluate.quality_dtype=bfloat16 on a parent resharded into several files: the parent
    against itself still has KL 0, and its loss is the fp32 one up to bf16 rounding."""
    from megapuzzle.checkpoints.canonical import load_checkpoint, save_checkpoint

    r = tmp_path / "bf16"
    arch, tensors, meta = load_checkpoint(run / "parent")
    save_checkpoint(r / "parent", arch, tensors, meta=meta, max_shard_bytes=40_000)
    shutil.copytree(run / "data", r / "data")
    shutil.copy(run / "costs.json", r / "costs.json")
    base = {**CFG["evaluate"], "batch_size": 1, "prefill_len": 6, "gen_len": 3}
    ev = run_evaluate(r, EvaluateConfig(**base, quality_dtype="bfloat16"), child=r / "parent", **QUIET)
    ref = run_evaluate(r, EvaluateConfig(**base), child=r / "parent", **QUIET)
    assert ev["child"]["kl_to_parent"] == 0.0 and ev["child"]["top1_agreement"] == 1.0
    assert ev["parent"]["lm_loss"] == pytest.approx(ref["parent"]["lm_loss"], rel=0.02)
    assert ev["parent"]["lm_loss"] != ref["parent"]["lm_loss"]  # bf16 did run
    with pytest.raises(UserError, match="quality_dtype"):
        EvaluateConfig(quality_dtype="fp16")


def test_evaluate_needs_a_child_and_validates_its_config(run, tmp_path):
    r = tmp_path / "nochild"
    for d in ("parent", "data"):
        shutil.copytree(run / d, r / d)
    with pytest.raises(UserError, match="no child checkpoint"):
        run_evaluate(r, EvaluateConfig(), **QUIET)
    with pytest.raises(UserError, match="unknown key"):
        section({"evaluate": {"batch": 2}}, "evaluate", EvaluateConfig)
    with pytest.raises(UserError, match="dtype"):
        EvaluateConfig(dtype="fp16")


def _evaluate_tp(info, run_dir: str, child: str, cfg: dict) -> dict:
    res = run_evaluate(run_dir, section(cfg, "evaluate", EvaluateConfig), child=child, tp=info.tp_size, **QUIET)
    return {w: {k: res[w][k] for k in ("lm_loss", "accuracy", "kl_to_parent", "top1_agreement", "tokens")}
            for w in ("parent", "child")}


def test_evaluate_tp2_quality_equals_tp1(run, tmp_path):
    """`evaluate --tp 2`: each rank builds half of every model; the quality metrics equal TP=1's."""
    from _dist import run_distributed
    from megapuzzle.checkpoints.canonical import load_checkpoint, write_checkpoint

    rd = tmp_path / "run"
    shutil.copytree(run, rd)
    # a child TP=2 can split (the run's own may hold kv-1 layers): the parent's weights, perturbed
    arch, t, _ = load_checkpoint(rd / "parent", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    write_checkpoint(rd / "child_tp", arch, ((n, t[n] + 0.02 * torch.randn(t[n].shape, generator=g)) for n in t))
    (one,) = run_distributed(_evaluate_tp, world=1, args=(str(rd), str(rd / "child_tp"), CFG), timeout=600)
    two = run_distributed(_evaluate_tp, world=2, tp=2, args=(str(rd), str(rd / "child_tp"), CFG), timeout=600)
    assert one["child"]["kl_to_parent"] > 1e-4  # a real comparison, not the parent against itself
    for r in two:
        for who in ("parent", "child"):
            for k, v in one[who].items():
                assert r[who][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (who, k)
    assert json.loads((rd / "eval.json").read_text())["tensor_parallel"] == 2


def _evaluate_pp(info, run_dir: str, child: str, cfg: dict) -> dict:
    res = run_evaluate(run_dir, section(cfg, "evaluate", EvaluateConfig), child=child, **QUIET)
    return {"quality": {w: {k: res[w][k] for k in ("lm_loss", "accuracy", "kl_to_parent", "top1_agreement", "tokens")}
                        for w in ("parent", "child")},
            "tokens_per_s": {w: res[w]["tokens_per_s"] for w in ("parent", "child")}}


def _child_with_noise(rd):
    """A child every layout can split (the run's own may hold kv-1 layers): the parent, perturbed."""
    from megapuzzle.checkpoints.canonical import load_checkpoint, write_checkpoint

    arch, t, _ = load_checkpoint(rd / "parent", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    write_checkpoint(rd / "child_tp", arch, ((n, t[n] + 0.02 * torch.randn(t[n].shape, generator=g)) for n in t))
    return rd / "child_tp"


def test_evaluate_pp2_quality_equals_pp1(run, tmp_path):
    """evaluate.pipeline_parallel = 2: each rank builds one stage of parent and child, the quality
    metrics equal PP=1's, and the timed generation passes through both stages."""
    from _dist import run_distributed

    rd = tmp_path / "run"
    shutil.copytree(run, rd)
    child = _child_with_noise(rd)
    (one,) = run_distributed(_evaluate_pp, world=1, args=(str(rd), str(child), CFG), timeout=600)
    pp_cfg = {**CFG, "evaluate": {**CFG["evaluate"], "pipeline_parallel": 2}}
    two = run_distributed(_evaluate_pp, world=2, pp=2, args=(str(rd), str(child), pp_cfg), timeout=600)
    assert one["quality"]["child"]["kl_to_parent"] > 1e-4  # a real comparison, not the parent against itself
    # Tolerance: the same fp32 GEMMs on other batch shapes (one sequence per micro-batch at PP=2)
    # may sum in another order: |error| ~ eps32 * sqrt(K) per logit (K <= 4 x hidden = 256 here:
    # 1.2e-7 * 16 ~ 2e-6 relative), averaged over tokens in fp64; no top-1 flip expected at 256
    # tokens unless a logit margin is under ~1e-5 (then accuracy would move by 1/256 and fail).
    for r in two:
        for who in ("parent", "child"):
            for k, v in one["quality"][who].items():
                assert r["quality"][who][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (who, k)
        assert min(r["tokens_per_s"].values()) > 0
    ev = json.loads((rd / "eval.json").read_text())
    assert (ev["tensor_parallel"], ev["pipeline_parallel"]) == (1, 2)
    assert ev["config"]["pipeline_parallel"] == 2


def _stage_params(info, run_dir: str) -> dict:
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.stages.evaluate.evaluate import build_model
    from megapuzzle.model import count_parameters

    arch, tensors, _ = load_checkpoint(f"{run_dir}/parent", dtype=torch.float32)
    m = build_model(arch, tensors)
    return {"params": count_parameters(m), "layers": [l.layer_number - 1 for l in m.decoder.layers],
            "stage": info.pp_rank}


def test_evaluate_pp2_rank_holds_only_its_stage(run):
    """At PP=2 a rank's model (built the way evaluate builds it, from the lazy reader) holds its
    stage's layers and, on the first / last stage, the embedding / final norm + output layer:
    counted, not assumed."""
    from _dist import run_distributed
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.model import stage_layer_ranges

    arch = load_arch(run / "parent")
    res = run_distributed(_stage_params, world=2, pp=2, args=(str(run),), timeout=600)
    emb = arch.vocab_size * arch.hidden_size
    for r, layers in zip(sorted(res, key=lambda r: r["stage"]), stage_layer_ranges(arch.num_layers, 2)):
        assert r["layers"] == list(layers)
        want = sum(arch.layer_params(i) for i in layers)
        want += emb if r["stage"] == 0 else arch.hidden_size + emb  # last: final norm + output layer
        assert r["params"] == want, r
        assert r["params"] < 0.75 * arch.num_params()
    # together the stages hold the whole model once (a tied head is the last stage's copy)
    assert sum(r["params"] for r in res) == arch.num_params() + (emb if arch.tie_word_embeddings else 0)
