"""gkd.recompute (Megatron activation recompute of the child): the same GKD as without it, and what it
saves. On the debug parent and the child of tests/test_gkd.py:

- full / selective recompute give the losses of a run without it (the first step's bitwise: the forward
  is the same computation) and its weights after 4 AdamW steps within fp32 noise through AdamW;
- the same at PP = 2 (local trainer, tied embeddings, 1F1B) and TP = 2 (Megatron trainer);
- the hidden-state hooks record only the original forward, not the re-run inside the backward, even
  when the capture stays open across the backward;
- full recompute keeps, per layer, exactly the layer's input and the parent's hidden state there (what
  megapuzzle.memory_model assumes), counted over every tensor autograd saves.

The peak-RSS measurement is benchmarks/results/gkd_recompute.md (bench_memory.py --gkd-recompute)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from _dist import assert_adamw_parity, run_distributed
from megapuzzle.config import section
from megapuzzle.errors import UserError
from megapuzzle.stages.gkd.gkd import GKDConfig, run_gkd
from test_gkd import BETAS, PP_BASE, QUIET, _tie_embeddings, _weights, base, fresh  # noqa: F401

TERMS = ("loss", "cosine", "kl", "lm", "grad_norm")


# Tolerances. Recompute runs the same forward, so the first step's losses (and the held-out metrics
# before training) are bitwise equal. Its gradients are not: the re-run layer's backward adds the
# cosine term's gradient and the next layer's into the layer output in another order, fp32 rounding
# noise (observed <= 1e-7 relative). Through AdamW that noise becomes the weight differences
# assert_adamw_parity bounds (tests/_dist.py), and the later steps' losses move by the same relative
# amount as under PP = 2 against one process (another summation order too): rel 1e-5.
REL = 1e-5


def _same_run(ref: dict, out: dict, rel: float, first_exact: bool = True) -> None:
    assert len(ref["history"]) == len(out["history"])
    for i, (r0, r1) in enumerate(zip(ref["history"], out["history"])):
        for k in TERMS:
            if i == 0 and first_exact and k != "grad_norm":
                assert r1[k] == r0[k], (k, r0[k], r1[k])
            else:
                assert r1[k] == pytest.approx(r0[k], rel=rel, abs=1e-7), (r1["step"], k, r0[k], r1[k])
    if first_exact:
        assert out["initial"] == ref["initial"]
    for k in ("loss", "cosine", "kl", "lm_loss"):
        assert out["final"][k] == pytest.approx(ref["final"][k], rel=rel, abs=1e-7), k


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_the_losses_and_weights_of_a_run_without(base, tmp_path, mode):
    ref_run, run = fresh(base, tmp_path / "ref"), fresh(base, tmp_path / "rc")
    cfg = GKDConfig(steps=4, **PP_BASE)  # 2 micro-batches: recompute with gradient accumulation
    ref = run_gkd(ref_run, cfg, **QUIET)
    out = run_gkd(run, dataclasses.replace(cfg, recompute=mode), **QUIET)
    assert out["signature"] == ref["signature"]  # a memory knob, like overlap_grad_reduce
    _same_run(ref, out, REL)
    wa, wb, w0 = _weights(ref_run), _weights(run), _weights(run, "child")
    assert all(not wb[k].equal(w0[k]) for k in w0 if "layers." in k)  # every layer was trained
    assert_adamw_parity(wa, wb, [r["lr"] for r in ref["history"]], BETAS, init=w0)


def _counting_worker(info, run: str, cfg: GKDConfig):
    """run_gkd, counting the layer checkpoints Megatron's full recompute makes (proof that it ran)."""
    from megatron.core import tensor_parallel

    torch.set_num_threads(1)
    real, calls = tensor_parallel.checkpoint, [0]

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    tensor_parallel.checkpoint = counting
    try:
        return run_gkd(run, cfg, **QUIET), calls[0]
    finally:
        tensor_parallel.checkpoint = real


# Against one process without recompute: PP = 2 / TP = 2 reorder sums themselves, so these are the
# tolerances of tests/test_gkd.py's PP test (rel 1e-5) and of the TP = 2 tests (rel 1e-4); no step
# is bitwise.
@pytest.mark.parametrize("trainer,tp,pp,tied,rel", [("local", 1, 2, True, 1e-5), ("megatron", 2, 1, False, 1e-4)],
                         ids=["local-pp2-tied", "megatron-tp2"])
def test_full_recompute_under_tp_and_pp_matches_one_process_without(base, tmp_path, trainer, tp, pp, tied, rel):
    ref_run, run = fresh(base, tmp_path / "ref"), fresh(base, tmp_path / "par")
    if tied:
        _tie_embeddings(ref_run)
        _tie_embeddings(run)
    cfg = GKDConfig(steps=4, optimizer=trainer, **PP_BASE)
    ref = run_gkd(ref_run, cfg, **QUIET)
    par = dataclasses.replace(cfg, tensor_parallel=tp, pipeline_parallel=pp, recompute="full")
    res = run_distributed(_counting_worker, world=tp * pp, tp=tp, pp=pp, args=(str(run), par))
    out = res[0][0]
    assert all(r == {} for r, _ in res[1:]) and out["trainer"] == trainer
    micro_batches = 4 * PP_BASE["batch_size"] // PP_BASE["micro_batch_size"]  # 4 steps
    assert all(n == micro_batches * 4 // pp for _, n in res), res  # one checkpoint per layer of the rank's stage
    _same_run(ref, out, rel, first_exact=False)
    wa, wb, w0 = _weights(ref_run), _weights(run), _weights(run, "child")
    assert all(not wb[k].equal(w0[k]) for k in w0 if "layers." in k)
    assert_adamw_parity(wa, wb, [r["lr"] for r in ref["history"]], BETAS, init=w0)


def _models(arch, recompute: str | None, dtype=torch.float32):
    from megapuzzle.model.config import ModelOptions
    from megapuzzle.model.gpt import build_gpt_model

    torch.manual_seed(0)
    parent = build_gpt_model(arch, params_dtype=dtype).eval().requires_grad_(False)
    child = build_gpt_model(arch, params_dtype=dtype, options=ModelOptions(recompute_granularity=recompute)).train()
    return parent, child


def _debug_arch(base):
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.runtime import init_distributed

    init_distributed(tp=1, pp=1)
    return load_arch(base / "child")


def test_hooks_record_the_forward_not_the_recompute_in_the_backward(base):
    from megapuzzle.train.distill import capture_layer_outputs, distill_terms

    arch = _debug_arch(base)
    tokens = torch.randint(0, arch.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in (None, "full"):
        parent, child = _models(arch, mode)
        with capture_layer_outputs(child) as kept:  # open across the backward, where full recompute re-runs layers
            t = distill_terms(child, parent, tokens[:, :-1], tokens[:, 1:], 1.0)
            first = {i: list(v) for i, v in kept.items()}
            (t["cosine"].mean(dim=(1, 2)).sum() + t["kl"].mean()).backward()
        assert sorted(kept) == list(range(arch.num_layers)), mode
        # one forward call per layer, and nothing added by the re-run in the backward
        assert all(len(v) == 1 and v[0] is first[i][0] for i, v in kept.items()), mode
        assert all(v[0].requires_grad for v in first.values())  # full: torch attaches the graph to the checkpoint's output
        grads[mode] = {n: p.grad for n, p in child.named_parameters()}
    for n, g in grads[None].items():  # fp32 reorder noise only (observed <= 6e-8 absolute)
        torch.testing.assert_close(grads["full"][n], g, rtol=1e-5, atol=1e-6)


def _saved_bytes(parent, child, tokens) -> int:
    """Bytes of the distinct storages autograd saves for the backward in GKD's forward (weights excluded)."""
    from megapuzzle.train.distill import distill_terms

    weights = {p.untyped_storage().data_ptr() for p in [*child.parameters(), *parent.parameters()]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        distill_terms(child, parent, tokens[:, :-1], tokens[:, 1:], 1.0)
    return sum(seen.values())


def test_full_recompute_keeps_one_layer_input_and_the_parent_stream_per_layer(base):
    """The bytes saved per layer: the difference between the 4-layer child and its first 2 layers, / 2.
    bf16, where autograd of the plain cosine expression would also keep fp32 copies of both hidden
    states (megapuzzle.train.distill.CosineDistance keeps the bf16 inputs only)."""
    arch = _debug_arch(base)
    tokens = torch.randint(0, arch.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    unit = 2 * 64 * arch.hidden_size * 2  # one [s, b, h] bf16 tensor
    per_layer = {}
    for mode in (None, "selective", "full"):
        short, long_ = (_saved_bytes(*_models(a, mode, torch.bfloat16), tokens)
                        for a in (arch.with_layers(arch.layers[:2]), arch))
        per_layer[mode] = (long_ - short) / 2 / unit
    print(f"saved per layer, in [s, b, h] bf16 tensors: {per_layer}")
    assert per_layer["full"] == 2.0, per_layer  # the layer's input (the checkpoint's) + the parent's hidden state
    assert per_layer["selective"] < per_layer[None] and per_layer[None] > 10, per_layer


def test_cosine_distance_is_the_plain_expression_bitwise():
    from megapuzzle.train.distill import cosine_distance

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        c = torch.randn(5, 3, 16, generator=g).to(dtype).requires_grad_(True)
        p = torch.randn(5, 3, 16, generator=g).to(dtype)
        w = torch.randn(5, 3, generator=g)
        ours = cosine_distance(c, p)
        (ours * w).sum().backward()
        mine, c.grad = c.grad, None
        plain = 1.0 - F.cosine_similarity(c.float(), p.float(), dim=-1, eps=1e-8)
        (plain * w).sum().backward()
        assert torch.equal(ours, plain) and torch.equal(mine, c.grad) and mine.dtype == dtype


def test_recompute_is_validated():
    assert GKDConfig().recompute == "none"
    assert section({"gkd": {"recompute": "full"}}, "gkd", GKDConfig).recompute == "full"
    with pytest.raises(UserError, match="recompute 'block' unknown; use none, selective or full"):
        section({"gkd": {"recompute": "block"}}, "gkd", GKDConfig)


def test_parent_pass_in_groups_gives_bitwise_the_whole_batch_run(base, tmp_path):
    """gkd.parent_pass_micro_batches under PP = 2 x DP = 2, Megatron trainer with overlapped grad
    reduce: 4 micro-batches per rank in 2 groups (parent pass + child 1F1B each) give bitwise the
    one-schedule run: the same micro-batch forwards and the same gradient sums in the same order (the
    loss x 2/4 then / 2 by the schedule is exact); and the grad buckets are reduced as often as there,
    once per step (inside the last backward from the second step on). (Earlier groups run under the
    DDP's no_sync; Megatron's per-bucket ready counts, learned in the first step, would also hold an
    early reduce back, so this test cannot tell that part apart.)"""
    from test_gkd_megatron import _overlap_probe_worker

    a, b = fresh(base, tmp_path / "a"), fresh(base, tmp_path / "b")
    cfg = GKDConfig(steps=3, pipeline_parallel=2, optimizer="megatron", recompute="full",
                    **{**PP_BASE, "batch_size": 8, "micro_batch_size": 1})
    grouped = dataclasses.replace(cfg, parent_pass_micro_batches=2)
    res = run_distributed(_overlap_probe_worker, world=4, pp=2, args=([(str(a), cfg, None), (str(b), grouped, None)],))
    (ra, ca), (rb, cb) = res[0]
    assert ra["world"] == {"tp": 1, "pp": 2, "dp": 2} and ra["signature"] == rb["signature"]
    print(f"grad-bucket reduces started, whole batch {ca}, in groups {cb}")
    assert ca == cb and ca["in_backward"] == (cfg.steps - 1) * ca["at_finish"] > 0, (ca, cb)
    assert ra["history"] == rb["history"] and ra["final"] == rb["final"]
    wa, wb, w0 = _weights(a), _weights(b), _weights(b, "child")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and not all(torch.equal(wa[k], w0[k]) for k in wa)


def test_parent_pass_micro_batches_must_divide_the_rank_micro_batches(base, tmp_path):
    cfg = GKDConfig(steps=1, parent_pass_micro_batches=3, **PP_BASE)  # 4 / 2 = 2 micro-batches per rank
    with pytest.raises(UserError, match="parent_pass_micro_batches 3 does not divide the 2 micro-batches per rank"):
        run_gkd(fresh(base, tmp_path), cfg, **QUIET)
