"""GKD keeps the parent's final hidden state, not its logits, and computes the KL / LM loss in token chunks
(gkd.loss_chunk_tokens; megapuzzle.train.vocab_kd). On the debug parent and the child of tests/test_gkd.py:

- the parent's logits from its kept final hidden state are bitwise those its forward returns, and the
  parent pass under PP keeps [s, mb, h] per micro-batch on the last stage, no [mb, s, V] logits;
- the chunked loss gives the whole micro-batch's per-token KL / CE and gradient (only the shapes of
  the kernels change, not any value's inputs), and saves nothing for its backward but its inputs;
- GKD runs with chunks give the losses and weights of runs without, at PP = 1 and PP = 2.

(The default, gkd.loss_chunk_tokens 0, gives bitwise the runs of before this change: checked against
the previous commit by hand, see the branch's report; tests/test_gkd*.py keep their exact assertions.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _dist import assert_adamw_parity, run_distributed
from megapuzzle.stages.gkd.gkd import GKDConfig, run_gkd
from test_gkd import BETAS, PP_BASE, QUIET, _weights, base, fresh  # noqa: F401
from test_gkd_recompute import _debug_arch, _models, _same_run

# Tolerances. Every loss term is per token (softmax and sums along the vocabulary), so a chunk of tokens
# gives each token's value from the same inputs; only the kernels' shapes change (the head's matmul over
# fewer rows, the row reductions over as many elements), which may reorder fp32 sums: per value a few
# ulps (rel ~1e-7 at V = 256 entries and h = 64). Over a run that noise goes through AdamW like PP's
# reordering (tests/test_gkd.py's PP tolerance rel 1e-5, weights by assert_adamw_parity).
REL = 1e-5
CHUNKED = {"loss_chunk_tokens": 12, "lm_weight": 0.5, "temperature": 2.0}  # 32-token rows: chunks 12, 12, 8


def _inputs(base, dtype=torch.float32):
    from megapuzzle.train.vocab_kd import head_off

    arch = _debug_arch(base)
    parent, child = _models(arch, None, dtype)
    tokens = torch.randint(0, arch.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
    with torch.no_grad():
        logits = parent(x, pos, None)
        with head_off(parent):
            hidden = parent(x, pos, None)
        s = child(x, pos, None)
    return parent, logits, hidden, s.detach().requires_grad_(True), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_parent_logits_from_its_final_hidden_state_are_its_forward_logits_bitwise(base, dtype):
    from megapuzzle.train.vocab_kd import logits_from_hidden

    parent, logits, hidden, _, _ = _inputs(base, dtype)
    assert hidden.shape == (32, 2, parent.config.hidden_size) and hidden.dtype == dtype  # [s, b, h]
    assert torch.equal(logits_from_hidden(parent, hidden), logits)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [5, 16, 32])
def test_chunked_loss_gives_the_whole_micro_batch_values_and_gradient(base, chunk, T):
    from megapuzzle.train.vocab_kd import VocabParallelKD, kd_from_parent_hidden

    parent, logits, hidden, s, y = _inputs(base)
    kl0, ce0 = VocabParallelKD.apply(s, logits, y, T)
    (0.7 * kl0.sum() + 0.3 * ce0.sum()).backward()
    g0, s.grad = s.grad, None
    kl, ce = kd_from_parent_hidden(s, parent, hidden, y, T, chunk)
    (0.7 * kl.sum() + 0.3 * ce.sum()).backward()
    bound = _bounds(parent, hidden, logits, s.detach(), T, grad_scale=0.7)
    print(f"chunk {chunk} T {T}: |dkl| {(kl - kl0).abs().max():.2e} (bound {bound['kl'].min():.2e}..), "
          f"|dce| {(ce - ce0).abs().max():.2e}, |dgrad| {(s.grad - g0).abs().max():.2e} "
          f"(bound {bound['grad'].min():.2e}..)")
    assert ((kl - kl0).abs() <= bound["kl"]).all()
    assert ((ce - ce0).abs() <= 8 * U * (ce0.abs() + s.detach().abs().amax(-1))).all()  # no parent: the rows' rounding
    assert ((s.grad - g0).abs() <= bound["grad"] + 0.3 * 8 * U * g0.abs()).all()  # + CE's rows' rounding
    for only in ("kl", "ce"):  # one output unused (lm_weight 0 / kl_weight 0): its gradient is None
        s.grad = None
        kl, ce = kd_from_parent_hidden(s, parent, hidden, y, T, chunk)
        (kl if only == "kl" else ce).sum().backward()
        assert s.grad is not None and torch.isfinite(s.grad).all()


U = 2.0 ** -24  # fp32 unit roundoff


def _bounds(parent, hidden, logits, s, T: float, grad_scale: float) -> dict[str, torch.Tensor]:
    """What the chunking may change, in fp64. The parent's logits of a chunk come from the same rows
    through a matmul of another shape: per logit at most the matmul error bound h u sum_k |x_k w_kv|
    (Higham's gamma_h, dt). The rest is per token as before. T^2 KL moves by at most dt times its
    sensitivity T sum_v p_v |log p_v - log q_v - KL|, plus a few ulps of its terms' magnitude
    T^2 sum_v p_v (|log p_v| + |log q_v|); its gradient T (q - p) x grad_scale by dt x 2 p_v."""
    from megapuzzle.model.gpt import unwrap_model

    m = unwrap_model(parent)
    w = (m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else m.output_layer.weight)
    x = hidden.double().abs().transpose(0, 1)  # [b, s, h]
    dt = hidden.shape[-1] * U * (x @ w.double().abs().t()).amax(-1, keepdim=True)  # [b, s, 1]
    logp, logq = torch.log_softmax(logits.double() / T, -1), torch.log_softmax(s.double() / T, -1)
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1, keepdim=True)
    sens = T * (p * (logp - logq - kl).abs()).sum(-1)
    terms = T * T * (p * (logp.abs() + logq.abs())).sum(-1)
    return {"kl": 2 * dt[..., 0] * sens + 8 * U * terms,
            "grad": grad_scale * (2 * dt * 2 * p + 8 * U * T * (p + logq.exp()))}


def _saved(fn) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def pack(t):
        out.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return out


def test_chunked_loss_saves_nothing_but_its_inputs(base):
    """The whole micro-batch's loss saves fp32 [b, s, V] tensors (p, log q) for its backward; the
    chunked one saves only the child's logits (which the schedule holds anyway), the parent's hidden
    state and the labels: its fp32 temporaries live only within one chunk."""
    from megapuzzle.train.vocab_kd import kd_from_parent_hidden

    parent, _, hidden, s, y = _inputs(base)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    whole = _saved(lambda: kd_from_parent_hidden(s, parent, hidden, y, 1.0, 0))
    vocab_sized = [t for t in whole if t.dtype == torch.float32 and t.shape == s.shape and ptr(t) != ptr(s)]
    assert len({ptr(t) for t in vocab_sized}) == 2, [tuple(t.shape) for t in whole]  # p, log q (T = 1: q_1 = q)
    chunked = _saved(lambda: kd_from_parent_hidden(s, parent, hidden, y, 1.0, 8))
    assert {ptr(t) for t in chunked} == {ptr(s), ptr(hidden), ptr(y)}, [tuple(t.shape) for t in chunked]


def test_chunked_run_gives_the_losses_and_weights_of_the_whole_micro_batch(base, tmp_path):
    ref_run, run = fresh(base, tmp_path / "ref"), fresh(base, tmp_path / "chunked")
    cfg = GKDConfig(steps=4, **{**PP_BASE, **CHUNKED, "loss_chunk_tokens": 0})
    ref = run_gkd(ref_run, cfg, **QUIET)
    out = run_gkd(run, dataclasses.replace(cfg, loss_chunk_tokens=CHUNKED["loss_chunk_tokens"]), **QUIET)
    assert out["signature"] == ref["signature"]  # a memory knob, like parent_pass_micro_batches
    _same_run(ref, out, REL, first_exact=False)
    wa, wb, w0 = _weights(ref_run), _weights(run), _weights(run, "child")
    assert all(not wb[k].equal(w0[k]) for k in w0 if "layers." in k)  # every layer was trained
    assert_adamw_parity(wa, wb, [r["lr"] for r in ref["history"]], BETAS, init=w0)


def _recording_worker(info, run: str, cfg: GKDConfig):
    """run_gkd, recording per stage the shapes of what each parent pass keeps for the child's schedule
    (megapuzzle.stages.gkd.pipeline.forward_pass; the held-out passes run it for the child too)."""
    from megapuzzle.stages.gkd import pipeline

    torch.set_num_threads(1)
    real, kept = pipeline.forward_pass, []

    def recording(model, tokens, micro):
        hidden, final = real(model, tokens, micro)
        kept.append([tuple(t.shape) for t in final])
        return hidden, final

    pipeline.forward_pass = recording
    try:
        return run_gkd(run, cfg, **QUIET), kept
    finally:
        pipeline.forward_pass = real


# Against one process without chunks: PP = 2 / TP = 2 reorder sums themselves, so the tolerances of
# tests/test_gkd.py's PP test (rel 1e-5) and of its TP = 2 tests (rel 1e-4).
@pytest.mark.parametrize("tp,pp,rel", [(1, 2, 1e-5), (2, 1, 1e-4)], ids=["pp2", "tp2"])
def test_parallel_chunked_run_keeps_hidden_states_and_gives_the_one_process_losses(base, tmp_path, tp, pp, rel):
    """Chunks under PP = 2 / TP = 2 (the chunked loss's TP reductions) against one process without;
    under PP the last stage's parent passes kept [s, mb, h] per micro-batch, never [mb, s, V] logits."""
    ref_run, run = fresh(base, tmp_path / "ref"), fresh(base, tmp_path / "par")
    cfg = GKDConfig(steps=4, **{**PP_BASE, **CHUNKED, "loss_chunk_tokens": 0})
    ref = run_gkd(ref_run, cfg, **QUIET)
    par = dataclasses.replace(cfg, tensor_parallel=tp, pipeline_parallel=pp,
                              loss_chunk_tokens=CHUNKED["loss_chunk_tokens"])
    res = run_distributed(_recording_worker, world=tp * pp, tp=tp, pp=pp, args=(str(run), par))
    out = res[0][0]
    assert all(r == {} for r, _ in res[1:])
    if pp == 2:
        first, last = res[0][1], res[1][1]
        hidden_size = _debug_arch(base).hidden_size
        assert first and all(k == [] for k in first)  # only the last stage returns anything
        micro, seq = PP_BASE["micro_batch_size"], PP_BASE["seq_len"]
        assert last and all(k and all(s == (seq, micro, hidden_size) for s in k) for k in last), last
    _same_run(ref, out, rel, first_exact=False)
    wa, wb, w0 = _weights(ref_run), _weights(run), _weights(run, "child")
    assert_adamw_parity(wa, wb, [r["lr"] for r in ref["history"]], BETAS, init=w0)
