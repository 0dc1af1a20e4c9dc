"""GKD under Megatron's sequence parallelism (gkd.sequence_parallel) on the debug parent and the child of
tests/test_gkd.py (every subblock kind, the linear replacements' SP reduce-scatter included): against the
same TP (x PP) layout without it, the held-out metrics before training are equal up to rounding and, after
a few AdamW steps, the loss curve, grad norms and weights are within fp32 noise (tests/_dist.py's AdamW
bound), for both trainers and with the chunked loss; the norms' weights, which see only a rank's tokens,
get the whole batch's grads (a run without their TP all-reduce fails the weight bound); the config needs
TP > 1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _dist import assert_adamw_parity, run_distributed
from megapuzzle.errors import UserError
from megapuzzle.stages.gkd.gkd import GKDConfig
from test_gkd import BASE, BETAS, PP_BASE, _weights, base, fresh  # noqa: F401 (base: fixture)
from test_gkd_megatron import _runs_worker

# Tolerances. SP replaces each TP all-reduce of a layer's output by a reduce-scatter (+ an all-gather
# before the next column-parallel GEMM): at TP = 2 the same two partial sums, added once, so only the
# order of a few fp32 sums changes (the reported cosine means, now per rank then summed over TP; the
# norms' grads, summed per rank then over TP). Observed: held-out metrics before training bitwise equal,
# losses / grad norms after <= 7e-8 relative and weights after 4 steps bitwise equal at TP 2; at
# TP 2 x PP 2 with full recompute <= 5.4e-7 and the weights at 2.4e-4 of their AdamW bound. 1e-5 leaves
# room for other reduction orders and still catches a lost TP sum: without the norms' grad all-reduce
# the final held-out loss moves by 2e-5 and the norm weights by 13 x their AdamW bound.
REL = 1e-5


def _compare(ref: dict, sp: dict) -> dict[str, float]:
    """Asserts sp's held-out metrics before / after and its loss curve within REL of ref's; returns the
    largest relative differences seen."""
    worst = {"heldout": 0.0, "history": 0.0}
    for when in ("initial", "final"):
        for k in ("loss", "cosine", "kl", "lm_loss", "parent_lm_loss"):
            assert sp[when][k] == pytest.approx(ref[when][k], rel=REL, abs=1e-7), (when, k, ref[when][k], sp[when][k])
            worst["heldout"] = max(worst["heldout"], abs(sp[when][k] - ref[when][k]) / max(abs(ref[when][k]), 1e-7))
        assert sp[when]["tokens"] == ref[when]["tokens"]
    assert len(sp["history"]) == len(ref["history"])
    for r0, r1 in zip(ref["history"], sp["history"]):
        for k in ("loss", "cosine", "kl", "lm", "grad_norm"):
            assert r1[k] == pytest.approx(r0[k], rel=REL, abs=1e-7), (r1["step"], k, r0[k], r1[k])
            worst["history"] = max(worst["history"], abs(r1[k] - r0[k]) / max(abs(r0[k]), 1e-7))
    return worst


@pytest.mark.parametrize("tp,pp,extra", [
    (2, 1, {}),
    (2, 1, {"loss_chunk_tokens": 24}),  # chunks that straddle the TP ranks' sequence shards (32 / 2)
    (2, 1, {"optimizer": "megatron"}),  # finalize_model_grads sums the norms' grads over TP
    (2, 2, {"recompute": "full"}),       # the p2p stream [s / tp, b, h], the parent's pass too; the 405B recipe
], ids=["tp2", "tp2-chunked", "tp2-megatron", "tp2xpp2"])
def test_sequence_parallel_gives_the_same_training(base, tmp_path, tp, pp, extra):
    ref_run, sp_run = fresh(base, tmp_path / "ref"), fresh(base, tmp_path / "sp")
    cfg = GKDConfig(steps=4, tensor_parallel=tp, pipeline_parallel=pp, **{**PP_BASE, **extra})
    runs = [(str(ref_run), cfg, None), (str(sp_run), dataclasses.replace(cfg, sequence_parallel=True), None)]
    res = run_distributed(_runs_worker, world=tp * pp, tp=tp, pp=pp, args=(runs,))
    ref, sp = res[0]
    assert all(r == [{}, {}] for r in res[1:])
    assert sp["signature"] == ref["signature"]  # not part of the training signature (like recompute)
    worst = _compare(ref, sp)
    wa, wb, w0 = _weights(ref_run), _weights(sp_run), _weights(sp_run, "child")
    assert all(not wb[k].equal(w0[k]) for k in w0 if "layers." in k)  # every layer was trained
    bounds = assert_adamw_parity(wa, wb, [r["lr"] for r in ref["history"]], BETAS, init=w0)
    print(f"SP vs no SP at TP={tp} PP={pp} {extra}: max rel diff {worst}, weights vs their AdamW bounds {bounds}")


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(UserError, match=r"gkd.sequence_parallel needs gkd.tensor_parallel > 1"):
        GKDConfig(sequence_parallel=True)
    with pytest.raises(UserError, match=r"gkd.sequence_parallel splits gkd.seq_len 30 over 4"):
        GKDConfig(sequence_parallel=True, tensor_parallel=4, seq_len=30)
    assert GKDConfig(sequence_parallel=True, tensor_parallel=2).sequence_parallel
    assert not GKDConfig(tensor_parallel=2).sequence_parallel  # off by default


def _runner_worker(info, parent_dir: str):
    """The parent's log-probs through model/runner.py's StageRunner (GKD's parent pass, BLD's teacher,
    score), built without and with sequence parallelism; the last stage's, and the shape it received."""
    import torch

    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.model.config import ModelOptions
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.runner import StageRunner
    from megapuzzle.model.weights import load_canonical_into_model

    torch.set_num_threads(1)
    arch, tensors, _ = load_checkpoint(parent_dir)
    tokens = torch.randint(0, arch.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for sp in (False, True):
        model = build_gpt_model(arch, options=ModelOptions(perform_initialization=False, sequence_parallel=sp))
        load_canonical_into_model(model, tensors, arch)
        run = StageRunner(model)
        h = run.stage_input(tokens)
        out[sp] = (run.stage_output(run.layers_from(h, run.rotary(h))), tuple(h.shape))
    return out


def test_stage_runner_sends_the_sequence_shards(base):
    """PP = 2 x TP = 2: under SP each stage's stream is its TP rank's [s / tp, b, h] (the embedding
    scatters it; StageRunner.recv expects that shape); the last stage's log-probs equal the non-SP ones
    up to fp32 rounding (the same sums; at TP = 2 in the same order: observed bitwise)."""
    res = run_distributed(_runner_worker, world=4, tp=2, pp=2, args=(str(base / "parent"),))
    for r in res:
        assert r[False][1] == (32, 2, 64) and r[True][1] == (16, 2, 64), (r[False][1], r[True][1])
    last = [r for r in res if r[False][0] is not None]
    assert len(last) == 2
    for r in last:
        torch.testing.assert_close(r[True][0], r[False][0], rtol=0, atol=1e-5)
