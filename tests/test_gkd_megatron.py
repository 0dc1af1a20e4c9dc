"""GKD with the Megatron trainer (gkd.optimizer: megatron: Megatron-core DistributedDataParallel +
distributed optimizer + dist-checkpoints) on CPU over gloo, on the debug parent and the child of
tests/test_gkd.py: at DP = 2 it gives the local trainer's losses and weights (same AdamW, same
weight-decay groups, Megatron's clip); bf16 params train against fp32 main params sharded over
DP; TP = 2 and PP = 2 (tied embeddings) give its PP = TP = 1 numbers; a killed run resumes from
its dist-checkpoint to bitwise the weights of an uninterrupted one; a bad gkd.optimizer is a
one-line UserError and "auto" keeps CPU runs on the local trainer with their old signature."""

from __future__ import annotations

import argparse
import dataclasses
import pytest
import torch

from _dist import assert_adamw_parity, run_distributed
from megapuzzle.train.faults import kill_after
from megapuzzle.config import section
from megapuzzle.errors import UserError
from megapuzzle.stages.gkd.gkd import GKDConfig, run_gkd
from test_gkd import BASE, BETAS, PP_BASE, QUIET, _tie_embeddings, _weights, base, fresh  # noqa: F401 (base: fixture)

MEGATRON = dict(optimizer="megatron")


def _runs_worker(info, runs: list[tuple[str, GKDConfig, int | None]]):
    """run_gkd on each (run dir, config, stop_after) in turn, in the same processes."""
    torch.set_num_threads(1)
    return [_run_gkd(run, cfg, stop) for run, cfg, stop in runs]


def _run_gkd(run, cfg, stop):
    if stop is None:
        return run_gkd(run, cfg, **QUIET)
    with kill_after("gkd", stop):
        return run_gkd(run, cfg, **QUIET)


def _overlap_probe_worker(info, runs: list[tuple[str, GKDConfig, int | None]]):
    """_runs_worker, also counting the grad-bucket reduces launched by the backward hooks (before
    finish_grad_sync is entered) versus those finish_grad_sync has to launch itself."""
    from megatron.core.distributed import param_and_grad_buffer as pgb

    cls, counts, inside = pgb._ParamAndGradBucketGroup, {"in_backward": 0, "at_finish": 0}, [False]
    start, finish = cls.start_grad_sync, cls.finish_grad_sync

    def counting_start(self, *a, **k):
        counts["at_finish" if inside[0] else "in_backward"] += 1
        return start(self, *a, **k)

    def flagged_finish(self, *a, **k):
        inside[0] = True
        try:
            return finish(self, *a, **k)
        finally:
            inside[0] = False

    cls.start_grad_sync, cls.finish_grad_sync = counting_start, flagged_finish
    out = []
    for run in runs:
        counts.update(in_backward=0, at_finish=0)
        out.append((_runs_worker(info, [run])[0], dict(counts)))
    return out


def _optimizer_facts(trainer) -> dict:
    """What Megatron's distributed optimizer holds on this rank: the names of the module params
    with a shard here, by weight-decay multiplier, dtypes and sizes."""
    (opt,) = getattr(trainer.opt, "chained_optimizers", [trainer.opt])  # one DistributedOptimizer
    names = {p: n for n, p in trainer.module.named_parameters()}
    groups = opt.optimizer.param_groups
    model_groups = [f + s for f, s in zip(opt.model_float16_groups, opt.model_fp32_groups)]
    return {
        "no_decay": {names[p] for g, ps in zip(groups, model_groups) if g["wd_mult"] == 0.0 for p in ps},
        "decay": {names[p] for g, ps in zip(groups, model_groups) if g["wd_mult"] == 1.0 for p in ps},
        "weight_decay": sorted({g["weight_decay"] for g in groups}),
        "model_dtypes": sorted({str(p.dtype) for p in trainer.module.parameters()}),
        "model_numel": sum(p.numel() for p in trainer.module.parameters()),
        "main_dtypes": sorted({str(p.dtype) for g in groups for p in g["params"]}),
        "main_numel": sum(p.numel() for g in groups for p in g["params"]),
        "moment_dtypes": sorted({str(v.dtype) for s in opt.optimizer.state.values() for k, v in s.items()
                                 if k in ("exp_avg", "exp_avg_sq")}),
        "grad_buffer_dtypes": sorted({str(b.grad_data.dtype) for b in trainer.model.buffers}),
        "local_no_decay": {n for n, p in trainer.module.named_parameters() if p.ndim < 2},  # LocalTrainer's rule
        "names": set(names.values()),
    }


def _inspecting_worker(info, run: str, cfg: GKDConfig):
    """run_gkd, then the facts of the trainer it made."""
    import megapuzzle.stages.gkd.gkd as gkd

    torch.set_num_threads(1)
    made, make = [], gkd.make_trainer
    gkd.make_trainer = lambda *a: made.append(make(*a)) or made[-1]
    try:
        res = run_gkd(run, cfg, **QUIET)
    finally:
        gkd.make_trainer = make
    return res, _optimizer_facts(made[0])


def _close(a: dict, b: dict, rel: float) -> dict[str, float]:
    """Asserts b's loss curve, grad norms and held-out metrics within `rel` of a's; returns the
    largest relative difference of the training losses and of the grad norms."""
    worst = {"loss terms": 0.0, "grad_norm": 0.0}
    for r0, r1 in zip(a["history"], b["history"], strict=True):
        for k in ("loss", "cosine", "kl", "lm", "grad_norm"):
            assert r1[k] == pytest.approx(r0[k], rel=rel, abs=1e-7), (r1["step"], k, r0[k], r1[k])
            w = "grad_norm" if k == "grad_norm" else "loss terms"
            worst[w] = max(worst[w], abs(r1[k] - r0[k]) / max(abs(r0[k]), 1e-7))
    for k in ("loss", "cosine", "kl", "lm_loss"):
        assert b["final"][k] == pytest.approx(a["final"][k], rel=rel, abs=1e-7), k
    return worst


def _max_weight_diff(wa: dict, wb: dict) -> float:
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


# Tolerances, Megatron trainer vs local trainer (DP = 2, fp32, weight decay 0.1, every step
# clipped): the same torch AdamW (Megatron's fallback without Apex / TE) with the same groups on
# the same grads (the DP average: Megatron scales by 1/2 before its reduce-scatter, local divides
# the all-reduced sum by 2, equal in fp32); what differs is the grad norm (Megatron sums squares
# in fp32, local in fp64) and through it the clip coefficient. Observed: loss terms <= 5e-7
# relative, grad norms <= 6e-8, weights <= 6e-8 absolute after 4 steps that move them by ~3e-3.
# An absolute weight tolerance is sound here (unlike TP / PP vs one process, tests/_dist.py): for
# the same weights the grads are the same bits (same ops in the same order), and a clip
# coefficient that differs by ~1e-8 rescales a whole step's grads uniformly, which AdamW's
# m / sqrt(v) cannot amplify (no per-element noise to flip the sign of a near-zero step-1
# gradient); the ulp-level weight differences it leaves only reach later steps' grads, when each
# element already has a gradient history in v.
def test_megatron_trainer_at_dp2_matches_the_local_trainer(base, tmp_path):
    cfg = GKDConfig(steps=4, **{**BASE, "weight_decay": 0.1, "checkpoint_every": 4})
    local, meg = fresh(base, tmp_path / "local"), fresh(base, tmp_path / "meg")
    res = run_distributed(_runs_worker, world=2, args=([(str(local), cfg, None)],))
    rl = res[0][0]
    res = run_distributed(_inspecting_worker, world=2, args=(str(meg), dataclasses.replace(cfg, **MEGATRON)))
    (rm, facts0), (_, facts1) = res
    assert rl["trainer"] == "local" and rm["trainer"] == "megatron" and rm["world"] == {"tp": 1, "dp": 2}
    assert all(r["grad_norm"] > cfg.grad_clip for r in rm["history"])  # the clip acts on every step
    # Megatron's groups (over the DP shards): no decay on 1-d params and biases = the local
    # trainer's ndim < 2 rule, decay on every other param
    no_decay, decay = facts0["no_decay"] | facts1["no_decay"], facts0["decay"] | facts1["decay"]
    assert no_decay == facts0["local_no_decay"] and decay == facts0["names"] - no_decay and not no_decay & decay
    assert any("layernorm" in n for n in no_decay) and any("linear_fc1" in n for n in decay)
    assert facts0["weight_decay"] == [0.0, 0.1]
    # the distributed optimizer shards the fp32 main params over the two DP ranks
    assert facts0["main_numel"] + facts1["main_numel"] >= facts0["model_numel"] > facts0["main_numel"]
    worst = _close(rl, rm, rel=2e-6)
    diff = _max_weight_diff(_weights(local), _weights(meg))
    assert diff <= 1e-6, diff
    print(f"megatron vs local, DP=2: max rel diff {worst}, weights max abs diff {diff:.2e}")


def test_megatron_trainer_bf16_params_train_against_fp32_main_params(base, tmp_path):
    run = fresh(base, tmp_path)
    cfg = GKDConfig(steps=8, dtype="bfloat16", **{**BASE, **MEGATRON, "log_every": 4, "checkpoint_every": 8})
    (res, f0), (_, f1) = run_distributed(_inspecting_worker, world=2, args=(str(run), cfg))
    assert f0["model_dtypes"] == ["torch.bfloat16"]
    assert f0["main_dtypes"] == f0["moment_dtypes"] == f0["grad_buffer_dtypes"] == ["torch.float32"]
    assert f0["main_numel"] + f1["main_numel"] >= f0["model_numel"] > f0["main_numel"]  # sharded over DP
    losses = [r["loss"] for r in res["history"]]
    assert len(losses) == 2 and losses[1] < 0.8 * losses[0], losses
    assert res["final"]["loss"] < 0.8 * res["initial"]["loss"], (res["initial"], res["final"])
    print(f"megatron bf16, DP=2: train loss {losses}, held-out loss {res['initial']['loss']:.4f} -> "
          f"{res['final']['loss']:.4f}")
    w, w0 = _weights(run), _weights(run, "child")
    assert all(not w[k].equal(w0[k]) for k in w if "layers." in k)  # every layer was trained


# Tolerances vs the PP = TP = 1 Megatron run: those of the local trainer's TP / PP tests
# (test_gkd.py; reductions in another order). Observed: TP = 2 loss terms <= 9e-6 relative;
# PP = 2 (tied) <= 1e-6. The weights: assert_adamw_parity (fp32 noise through AdamW).
@pytest.mark.parametrize("tp,pp,tied,rel", [(2, 1, False, 1e-4), (1, 2, True, 1e-5)], ids=["tp2", "pp2-tied"])
def test_megatron_trainer_tp2_and_pp2_match_one_process(base, tmp_path, tp, pp, tied, rel):
    ref_run, run = fresh(base, tmp_path / "ref"), fresh(base, tmp_path / "par")
    if tied:
        _tie_embeddings(ref_run)
        _tie_embeddings(run)
    cfg = GKDConfig(steps=4, **{**PP_BASE, **MEGATRON})
    ref = run_gkd(ref_run, cfg, **QUIET)
    par = dataclasses.replace(cfg, tensor_parallel=tp, pipeline_parallel=pp)
    res = run_distributed(_runs_worker, world=tp * pp, tp=tp, pp=pp, args=([(str(run), par, None)],))
    out = res[0][0]
    assert res[1] == [{}] and out["trainer"] == ref["trainer"] == "megatron"
    assert out["world"] == {"tp": tp, "dp": 1, **({"pp": pp} if pp > 1 else {})}
    worst = _close(ref, out, rel)
    wa, wb, w0 = _weights(ref_run), _weights(run), _weights(run, "child")
    assert all(not wb[k].equal(w0[k]) for k in w0 if "layers." in k)  # every layer was trained
    bounds = assert_adamw_parity(wa, wb, [r["lr"] for r in ref["history"]], BETAS, init=w0)
    print(f"megatron TP={tp} PP={pp} vs 1 process: max rel diff {worst}, weights vs their AdamW bounds {bounds}")


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)], ids=["dp2", "dp2-pp2"])
def test_overlapped_grad_reduce_with_micro_batches_matches_the_synchronous_one(base, tmp_path, tp, pp):
    """overlap_grad_reduce (the default): buckets reduce-scatter while the last micro-batch's
    backward runs, earlier micro-batches only accumulate (no_sync; under PP through Megatron's
    schedule and config.no_sync_func): the same sums as reducing after the backward."""
    on, off = fresh(base, tmp_path / "on"), fresh(base, tmp_path / "off")
    cfg = GKDConfig(steps=3, **{**PP_BASE, **MEGATRON, "batch_size": 8, "micro_batch_size": 2,
                                "pipeline_parallel": pp})
    assert cfg.overlap_grad_reduce
    runs = [(str(on), cfg, None), (str(off), dataclasses.replace(cfg, overlap_grad_reduce=False), None)]
    ((r_on, c_on), (r_off, c_off)) = run_distributed(_overlap_probe_worker, world=2 * pp, pp=pp, args=(runs,))[0]
    assert r_on["world"]["dp"] == 2
    # With overlap, from the second step on every bucket's reduce starts inside the last
    # micro-batch's backward (one per bucket per step; the first step, which counts each bucket's
    # grads, starts them in finish_grad_sync); without it finish_grad_sync starts them all.
    buckets = c_on["at_finish"]
    assert buckets >= 1 and c_on["in_backward"] == (cfg.steps - 1) * buckets, c_on
    assert c_off == {"in_backward": 0, "at_finish": cfg.steps * buckets}, (c_on, c_off)
    worst = _close(r_off, r_on, rel=1e-6)
    # the same sums (so far the same bits here), but not promised to be reduced in the same order:
    # the weights within what fp32 noise can become through AdamW (tests/_dist.py)
    bounds = assert_adamw_parity(_weights(off), _weights(on), [r["lr"] for r in r_off["history"]], BETAS,
                                 init=_weights(on, "child"))
    print(f"overlapped vs synchronous grad reduce (PP={pp}, 2 micro-batches per rank): {worst}, weights vs their "
          f"AdamW bounds {bounds}")


def test_megatron_trainer_kill_and_resume_gives_bitwise_the_same_weights(base, tmp_path):
    a, b = fresh(base, tmp_path / "a"), fresh(base, tmp_path / "b")
    cfg = GKDConfig(steps=6, **{**BASE, **MEGATRON, "log_every": 2, "checkpoint_every": 2})
    # b is killed after step 3 (saved at 2) and run again; the rank processes are reused
    runs = [(str(a), cfg, None), (str(b), cfg, 3)]
    (ra, stopped), (_, stopped1) = run_distributed(_runs_worker, world=2, args=(runs,))
    assert stopped == stopped1 == {"stopped_at": 3}
    state = b / "gkd" / "train_state"
    assert sorted(p.name for p in (state / "dist").iterdir()) == ["latest", "step_00000002"]
    assert not list(state.glob("rank*")) and (state / "dist" / "latest").read_text() == "step_00000002\n"
    rb = run_distributed(_runs_worker, world=2, args=([(str(b), cfg, None)],))[0][0]
    assert rb["resumed_from_step"] == 2 and ra["resumed_from_step"] == 0
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ra["history"] == rb["history"] and ra["final"] == rb["final"]
    assert not (state / "dist").exists()  # dropped once the result is written


def test_optimizer_is_validated_and_auto_keeps_the_cpu_signature(base):
    from megapuzzle.stages.gkd.gkd import _signature, add_cli_args
    from megapuzzle.stages.gkd.trainers import resolve_trainer
    from megapuzzle.runtime import init_distributed

    for bad in ("adam", "Megatron", ""):
        with pytest.raises(UserError) as e:
            GKDConfig(optimizer=bad)
        assert str(e.value) == f"gkd.optimizer {bad!r} unknown; use auto, megatron or local"  # one line
    with pytest.raises(UserError, match="gkd.optimizer 'torch' unknown"):
        section({"gkd": {"optimizer": "torch"}}, "gkd", GKDConfig)
    assert section({"gkd": {"optimizer": "megatron"}}, "gkd", GKDConfig).optimizer == "megatron"
    p = argparse.ArgumentParser()
    add_cli_args(p)
    assert p.parse_args(["--run-dir", "r", "--optimizer", "megatron"]).optimizer == "megatron"
    cuda = torch.cuda.is_available()
    assert resolve_trainer("auto") == ("megatron" if cuda else "local") and resolve_trainer("local") == "local"
    info = init_distributed(tp=1, pp=1)

    def sig(**kw):
        cfg = GKDConfig(**kw)
        return _signature(cfg, info, base / "parent", base / "child", resolve_trainer(cfg.optimizer))

    # the trainer this machine always used is signed as before gkd.optimizer existed (results and
    # train states of existing runs stay valid); the other one changes the signature
    legacy, other = ("megatron", "local") if cuda else ("local", "megatron")
    assert sig() == sig(optimizer=legacy) != sig(optimizer=other)
