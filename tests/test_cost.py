"""Cost stage: exact sizes vs the built Megatron model, costs.json shape, resume, roofline, predictions,
the FP8 preflight and end-to-end generation. Tiny shapes, tiny grid, 1-2 repeats: numbers are
asserted, timings only for being finite and positive."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch
import yaml

from megapuzzle.train.faults import Killed, kill_after, recording
from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as Fv, LayerArch, SearchSpace
from megapuzzle.stages.measure.measure import (MeasureConfig, add_cli_args, fixed_runtime, format_check, format_costs, load_costs,
                             measure_costs, predict_generation_time, predict_runtime, run_cli,
                             search_space_variants, variant_cost, variant_key, variant_memory)
from megapuzzle.errors import UserError
from megapuzzle.runtime import destroy_distributed, init_distributed

V, H, NQ, KV, FFN = 128, 64, 4, 2, 128
SPACE = {"kv_heads": [1], "ffn_fractions": [0.5], "ffn_granularity": 32}
GRID = {"batch_sizes": [1, 2], "seq_lens": [8, 16]}
FAST = dict(stack_layers=2, warmup=1, repeats=2, min_sample_s=0.0, threads=1, roofline_gpus=("h100", "a100"))


def tiny(layers=None, n=2) -> Architecture:
    return Architecture(vocab_size=V, hidden_size=H, num_attention_heads=NQ, max_position_embeddings=64,
                        layers=layers or (LayerArch(A("gqa", KV), Fv("mlp", FFN)),) * n)


def fast_cfg(**kw) -> MeasureConfig:
    return MeasureConfig(batch_sizes=tuple(GRID["batch_sizes"]), seq_lens=tuple(GRID["seq_lens"]), **(FAST | kw))


@pytest.fixture(scope="module", autouse=True)
def dist1():
    torch.set_num_threads(1)
    info = init_distributed(tp=1, pp=1, seed=1234)
    yield info
    destroy_distributed()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One `megapuzzle measure` run through the CLI on a tiny parent checkpoint."""
    from megapuzzle.checkpoints.canonical import save_checkpoint
    from megapuzzle.model import init_random_canonical

    run = tmp_path_factory.mktemp("run")
    parent = tiny()
    save_checkpoint(run / "parent", parent, init_random_canonical(parent))
    cfg = run / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"search_space": SPACE, "measure": {**GRID, **{k: list(v) if isinstance(v, tuple)
                                                                               else v for k, v in FAST.items()}}}))
    p = argparse.ArgumentParser()
    add_cli_args(p)
    assert run_cli(p.parse_args(["--run-dir", str(run), "--config", str(cfg)])) == 0
    return parent, load_costs(run / "costs.json"), run


# ----------------------------------------------------------------------------- exact sizes

@pytest.mark.parametrize("sub,v", [("attention", A("gqa", 4)), ("attention", A("gqa", 2)), ("attention", A("gqa", 1)),
                                   ("attention", A("linear")), ("ffn", Fv("mlp", 128)), ("ffn", Fv("mlp", 32)),
                                   ("ffn", Fv("linear"))])
def test_param_and_kv_bytes_match_built_model(sub, v):
    from megapuzzle.stages.measure.measure import stack_arch
    from megapuzzle.costs.timing import GPTRunner

    parent = tiny()
    empty = GPTRunner(tiny((LayerArch(A("no_op"), Fv("no_op")),)))
    runner = GPTRunner(stack_arch(parent, sub, v, 1))
    params = parent.attention_params(v) if sub == "attention" else parent.ffn_params(v)
    assert runner.param_count() - empty.param_count() == params
    ctx = runner.context(2, 8)
    with torch.inference_mode():
        runner.prefill(ctx, runner.tokens(2, 5))
    kv_arch = runner.arch.kv_cache_bytes_per_token(bytes_per_elem=4)  # fp32 on CPU
    want = 2 * v.num_kv_heads * (H // NQ) * 4 if v.kind == "gqa" else 0
    assert runner.kv_cache_bytes_per_token(ctx) == kv_arch == want


def test_costs_json_sizes_equal_arch(measured):
    parent, costs, _ = measured
    attn, ffn = search_space_variants(parent, SearchSpace.from_dict(SPACE))
    for sub, variants in (("attention", attn), ("ffn", ffn)):
        for v in variants:
            mem = variant_memory(costs, v)
            params = parent.attention_params(v) if sub == "attention" else parent.ffn_params(v)
            kv = 2 * v.num_kv_heads * parent.kv_channels if getattr(v, "num_kv_heads", None) else 0
            assert mem == {"param_count": params, "param_bytes": 4 * params, "kv_bytes_per_token": 4 * kv}


# ----------------------------------------------------------------------------- costs.json

def test_costs_json_has_every_variant_and_grid_point(measured):
    parent, costs, _ = measured
    attn, ffn = search_space_variants(parent, SearchSpace.from_dict(SPACE))
    assert [v.name for v in attn] == ["gqa_kv2", "gqa_kv1", "linear", "no_op"]
    assert [v.name for v in ffn] == ["mlp_128", "mlp_64", "linear", "no_op"]
    want = {f"attention.{v.name}" for v in attn} | {f"ffn.{v.name}" for v in ffn}
    assert set(costs["variants"]) == want
    assert costs["grid"] == GRID and costs["phases"] == ["prefill", "decode"]
    nb, ns = len(GRID["batch_sizes"]), len(GRID["seq_lens"])
    tables = [costs] + [costs["roofline"][g] for g in ("h100", "a100")]
    for t in tables:
        assert set(t["variants"]) == want and t["grid"] == GRID
        for e in [t["baseline"], t["empty_layer"]] + [x["runtime"] for x in t["variants"].values()]:
            for ph in ("prefill", "decode"):
                for stat in ("median", "iqr"):
                    m = e[ph][stat]
                    assert len(m) == nb and all(len(r) == ns for r in m)
                    assert all(math.isfinite(x) for r in m for x in r)
    for key, e in costs["variants"].items():
        meds = [x for ph in ("prefill", "decode") for r in e["runtime"][ph]["median"] for x in r]
        assert e["measured"] == (not key.endswith("no_op")), key  # timings: only finite (above); no-op: 0
        if key.endswith("no_op"):
            assert all(x == 0 for x in meds)
    for k in ("device", "versions", "threads", "dtype", "precision", "runtime", "repeats", "warmup"):
        assert costs[k] not in (None, "")
    assert costs["threads"] == 1 and costs["dtype"] == "float32" and costs["precision"] == "fp32"
    assert costs["versions"]["torch"] == torch.__version__ and "megatron_core" in costs["versions"]
    assert "megatron" in costs["runtime"].lower()
    assert len(costs["check"]["rows"]) == 2 * nb * ns
    assert "gqa_kv2" in format_costs(costs) and "gqa_kv2" in format_costs(costs, "h100")
    assert format_check(costs).count("\n") == 1 + 2 * nb * ns


def test_predict_runtime_is_the_sum_of_its_parts(measured):
    parent, costs, _ = measured
    child = parent.with_layers([LayerArch(A("gqa", 1), Fv("linear")), LayerArch(A("no_op"), Fv("mlp", 64))])
    for src in (None, "h100"):
        for ph in ("prefill", "decode"):
            for b in GRID["batch_sizes"]:
                for s in GRID["seq_lens"]:
                    parts = fixed_runtime(costs, 2, ph, b, s, source=src) + sum(
                        variant_cost(costs, v, ph, b, s, source=src)
                        for v in ("attention.gqa_kv1", "ffn.linear", "attention.no_op", "ffn.mlp_64"))
                    assert predict_runtime(costs, child, b, s, ph, source=src) == pytest.approx(parts, rel=1e-12)
    rows = costs["check"]["rows"]
    for r in rows:
        assert r["predicted"] == pytest.approx(predict_runtime(costs, parent, r["batch"], r["seq"], r["phase"]))
        assert r["rel_error"] == pytest.approx((r["predicted"] - r["measured"]) / r["measured"])
    # the fixed part is exactly baseline + L * empty layer at a grid point
    t = costs
    assert fixed_runtime(costs, 3, "prefill", 2, 16) == pytest.approx(
        max(0, t["baseline"]["prefill"]["median"][1][1]) + 3 * max(0, t["empty_layer"]["prefill"]["median"][1][1]))
    gen = predict_generation_time(costs, parent, 2, 8, 4)
    assert gen["prefill_s"] == pytest.approx(predict_runtime(costs, parent, 2, 8, "prefill"))
    assert gen["decode_s"] == pytest.approx(sum(predict_runtime(costs, parent, 2, 8 + t, "decode") for t in range(3)))


def test_variant_cost_grid_points_interpolation_and_names(measured):
    _, costs, _ = measured
    e = costs["variants"]["attention.gqa_kv2"]["runtime"]["decode"]["median"]
    assert variant_cost(costs, "attention.gqa_kv2", "decode", 2, 8) == max(0.0, e[1][0])
    mid = variant_cost(costs, A("gqa", 2), "decode", 2, 12)
    assert mid == pytest.approx(max(0.0, (e[1][0] + e[1][1]) / 2))
    assert variant_cost(costs, "gqa_kv2", "decode", 2, 8) == variant_cost(costs, "attention.gqa_kv2", "decode", 2, 8)
    assert variant_cost(costs, "ffn.no_op", "prefill", 1, 8) == 0.0
    assert variant_key("linear", "ffn") == "ffn.linear"
    with pytest.raises(ValueError, match="ambiguous"):
        variant_key("linear")
    with pytest.raises(KeyError, match="mlp_999"):
        variant_cost(costs, "ffn.mlp_999", "prefill", 1, 8)
    with pytest.raises(UserError, match="roofline"):
        variant_cost(costs, "ffn.linear", "prefill", 1, 8, source="b200")


# ----------------------------------------------------------------------------- resume

def test_resume_skips_measured_entries(tmp_path):
    parent, space = tiny(), SearchSpace.from_dict(SPACE)
    state = tmp_path / "state" / "measure_partial.json"
    cfg = fast_cfg(repeats=1, decode=False, check_parent=False, roofline_gpus=())
    with recording("measure") as log1, kill_after("measure", 3), pytest.raises(Killed):
        measure_costs(parent, cfg, space=space, state_path=state)
    first = [n for n, _ in log1]
    assert json.loads(state.read_text())["entries"].keys() == set(first)
    with recording("measure") as log2:
        costs = measure_costs(parent, cfg, space=space, state_path=state)
    second = [n for n, _ in log2]
    # no-op variants are zero by definition: nothing to measure
    everything = {"baseline"} | {f"attention.{n}" for n in ("gqa_kv2", "gqa_kv1", "linear")} | {
        f"ffn.{n}" for n in ("mlp_128", "mlp_64", "linear")}
    assert first == ["baseline", "attention.gqa_kv2", "attention.gqa_kv1"]
    assert not set(first) & set(second) and set(first) | set(second) == everything
    assert set(costs["variants"]) == everything - {"baseline"} | {"attention.no_op", "ffn.no_op"}
    assert "check" not in costs
    # same settings again: nothing is measured; other settings: everything is
    with recording("measure") as third:
        measure_costs(parent, cfg, space=space, state_path=state)
    assert third == []
    with recording("measure") as third:
        more = measure_costs(parent, replace(cfg, passes=2), space=space, state_path=state)
    assert sorted(third) == sorted((n, 1) for n in everything)  # a second pass adds to the first
    assert more["passes"] == 2
    with recording("measure") as log3:
        measure_costs(parent, replace(cfg, repeats=2), space=space, state_path=state)
    third = [n for n, _ in log3]
    assert set(third) == everything  # other settings: measured afresh


# ----------------------------------------------------------------------------- roofline

def test_roofline_matches_hand_computation():
    from megapuzzle.roofline import GPUS, roofline_table, subblock_work

    parent = tiny()  # h 64, 4 heads of 16
    kv2, mlp = A("gqa", 2), Fv("mlp", 128)
    h100 = GPUS["h100"]
    # GQA kv2 decode, b=2, s=10, bf16: GEMM params q,o = 2*64*64, k,v = 2*64*32
    mp = 2 * 64 * 64 + 2 * 64 * 32
    flops = 2 * 2 * mp + 4 * 2 * 4 * 16 * 11
    nbytes = mp * 2 + 64 * 2 + 2 * 2 * 64 * 2 + 2 * 11 * (2 * 2 * 16 * 2)
    assert subblock_work(parent, "attention", kv2, "decode", 2, 10) == (flops, nbytes)
    # MLP prefill, b=1, s=4096: compute bound on an H100 at fp8
    f2, b2 = subblock_work(parent, "ffn", mlp, "prefill", 1, 4096, "fp8")
    assert f2 == 2 * 4096 * 3 * 64 * 128 and b2 == 3 * 64 * 128 + 64 * 2 + 2 * 4096 * 64 * 2
    t = roofline_table(parent, [kv2, A("no_op")], [mlp], [2], [10], "H100_SXM", "bf16", 0.5, 0.8)
    got = t["variants"]["attention.gqa_kv2"]["runtime"]["decode"]["median"][0][0]
    assert got == pytest.approx(max(flops / (989.4e12 * 0.5), nbytes / (3.35e12 * 0.8)), rel=1e-12)
    assert t["variants"]["attention.no_op"]["runtime"]["prefill"]["median"] == [[0.0]]
    assert t["variants"]["attention.gqa_kv2"]["kv_bytes_per_token"] == 2 * 2 * 16 * 2
    assert t["variants"]["ffn.mlp_128"]["param_bytes"] == 3 * 64 * 128 * 2 + 64 * 2
    a100 = roofline_table(parent, [kv2], [mlp], [1], [8], "a100", "fp8")
    assert a100["precision"] == "bf16" and a100["peak_flops"] == GPUS["a100"].bf16_flops  # A100: no FP8
    fp8 = roofline_table(parent, [kv2], [mlp], [1], [4096], "h100", "fp8")
    assert fp8["variants"]["ffn.mlp_128"]["runtime"]["prefill"]["median"][0][0] == pytest.approx(
        max(f2 / (h100.fp8_flops * 0.6), b2 / (h100.bandwidth * 0.8)))
    with pytest.raises(ValueError, match="unknown GPU"):
        roofline_table(parent, [kv2], [mlp], [1], [8], "v100")


# ----------------------------------------------------------------------------- config and errors

def test_fp8_on_cpu_fails_at_once_in_one_line(tmp_path):
    import time

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        measure_costs(tiny(), fast_cfg(fp8=True), state_path=tmp_path / "s.json")
    msg = str(e.value)
    assert time.perf_counter() - t0 < 2 and "\n" not in msg and "fp8" in msg
    assert "TransformerEngine" in msg or "GPU" in msg
    assert not (tmp_path / "s.json").exists()


def test_measure_config_validation():
    from megapuzzle.config import section

    cfg = section({"measure": {"batch_sizes": [4, 1, 4], "roofline_gpus": ["H100-SXM", "b200"]}}, "measure",
                  MeasureConfig)
    assert cfg.batch_sizes == (1, 4) and cfg.roofline_gpus == ("h100", "b200")
    for bad in ({"stack_layers": 1}, {"dtype": "fp64"}, {"fp8_recipe": "mxfp8"}, {"roofline_gpus": ["v100"]},
                {"batch_sizes": []}, {"repeats": 0}, {"fp8": True, "dtype": "float32"}, {"bogus": 1}):
        with pytest.raises(UserError) as e:
            section({"measure": bad}, "measure", MeasureConfig)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- runtime

def test_kv_cached_decode_matches_full_forward():
    from megapuzzle.costs.timing import GPTRunner
    from megapuzzle.model import forward_logits

    arch = tiny((LayerArch(A("gqa", 2), Fv("mlp", 96)), LayerArch(A("no_op"), Fv("linear")),
                 LayerArch(A("linear"), Fv("no_op")), LayerArch(A("gqa", 1), Fv("mlp", 64))))
    r = GPTRunner(arch)
    ids = r.tokens(2, 12)
    with torch.inference_mode():
        full = forward_logits(r.model, ids)
        ctx = r.context(2, 12)
        out = [r.prefill(ctx, ids[:, :8])] + [r.decode(ctx, ids[:, i:i + 1]) for i in range(8, 12)]
    torch.testing.assert_close(torch.stack(out, 1), full[:, 7:], rtol=1e-4, atol=1e-4)


def test_measure_model_throughput_generates_gen_len_tokens():
    from megapuzzle.costs.timing import GPTRunner, measure_model_throughput
    from megapuzzle.model import forward_logits, init_random_canonical

    arch = tiny()
    tensors = init_random_canonical(arch, seed=3, std=0.5)
    res = measure_model_throughput(arch, tensors, batch=2, prefill_len=6, gen_len=5, repeats=2, threads=1)
    assert res.tokens.shape == (2, 5) and res.tokens.dtype == torch.long
    assert res.tokens_per_s > 0 and res.prefill_s > 0 and res.decode_s > 0
    assert res.tokens_per_s == pytest.approx(2 * 5 / res.total_s)
    # greedy tokens equal a no-cache greedy loop with the same weights and prompt
    r = GPTRunner(arch, tensors=tensors)
    seq = r.tokens(2, 6, seed=1)
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, forward_logits(r.model, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(res.tokens, seq[:, 6:])
    rnd = measure_model_throughput(arch, "random", batch=1, prefill_len=4, gen_len=1, repeats=1, warmup=0)
    assert rnd.tokens.shape == (1, 1) and rnd.decode_s >= 0 and rnd.tokens_per_s > 0


def test_throughput_with_the_settings_costs_were_measured_with(measured):
    from megapuzzle.stages.measure.measure import throughput_settings
    from megapuzzle.costs.timing import measure_model_throughput

    parent, costs, _ = measured
    kw = throughput_settings(costs)
    assert kw == {"threads": 1, "clock": "wall", "dtype": "float32", "fp8": False, "fp8_recipe": "delayed"}
    res = measure_model_throughput(parent, None, 1, 8, 3, repeats=1, **kw)
    pred = predict_generation_time(costs, parent, 1, 8, 3)
    assert res.tokens.shape == (1, 3) and res.clock == "wall" and pred["tokens_per_s"] > 0
