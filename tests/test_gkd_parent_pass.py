"""GKD's frozen parent runs layer by layer through model/runner.py (megapuzzle.train.parent_pass), on the
trained debug parent: bitwise the tensors of the path it replaced, `GPTModel.forward` with forward hooks
on the decoder layers and the output layer off, at PP = 1 (a plain forward per micro-batch) and at PP = 2
and TP = 2 x PP = 2 (Megatron's forward-only pipeline schedule), stage by stage: every stage's layer
outputs per micro-batch, the last stage's final hidden state (after the final norm) per micro-batch.

Bitwise, no tolerance: both paths run the same modules' ops on the same inputs and shapes (the
embedding, the RoPE table, each TransformerLayer, the final norm), and the stream crosses stages
byte for byte. So at TP = 1 the PP = 2 stages also give the PP = 1 tensors bitwise."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from _dist import run_distributed

MICRO, ROWS, SEQ = 2, 6, 24  # 3 micro-batches: a pipeline fill, a steady micro-batch and a drain


def _parent(ckpt: Path, dtype: torch.dtype):
    """The parent as GKD builds it: this rank's TP / PP share, weights read lazily, eval, frozen."""
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.model.config import ModelOptions
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import load_canonical_into_model

    arch, tensors, _ = load_checkpoint(ckpt)
    model = build_gpt_model(arch, params_dtype=dtype, options=ModelOptions(perform_initialization=False))
    load_canonical_into_model(model, tensors, arch)
    return arch, model.eval().requires_grad_(False)


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _hooked(model):
    """The replaced path's recording: {global layer index: that layer's output per forward call}, and
    the model's output layer off (GPTModel returns the decoder's output, after its final norm)."""
    from megapuzzle.model.gpt import unwrap_model

    m = unwrap_model(model)
    store: dict[int, list[torch.Tensor]] = {}
    handles = [layer.register_forward_hook(
        lambda mod, args, out, i=layer.layer_number - 1: store.setdefault(i, []).append(out[0]))
        for layer in m.decoder.layers]
    was, m.post_process = m.post_process, False
    try:
        yield store
    finally:
        m.post_process = was
        for h in handles:
            h.remove()


@torch.no_grad()
def _forward_with_hooks(model, tokens: torch.Tensor):
    """GPTModel.forward per micro-batch: directly at PP = 1, else Megatron's forward-only schedule."""
    from megatron.core import parallel_state as ps

    from megapuzzle.model.forward import _run_pipeline
    from megapuzzle.model.runner import position_ids

    with _hooked(model) as hidden:
        if ps.get_pipeline_model_parallel_world_size() == 1:
            final = [model(t, position_ids(t), None) for t in tokens.split(MICRO)]
        else:
            final = _run_pipeline(model, tokens, MICRO)
    return hidden, final


def _assert_bitwise(new, old) -> None:
    (h_new, f_new), (h_old, f_old) = new, old
    assert h_new.keys() == h_old.keys() and len(f_new) == len(f_old), (sorted(h_new), sorted(h_old))
    for i in h_old:
        assert len(h_new[i]) == len(h_old[i]) == ROWS // MICRO, i
        for k, (a, b) in enumerate(zip(h_new[i], h_old[i])):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), (i, k, (a - b).abs().max())
    for k, (a, b) in enumerate(zip(f_new, f_old)):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), (k, (a - b).abs().max())


def _stage_pass(ckpt: str, dtype: torch.dtype):
    from megapuzzle.train.parent_pass import parent_pass

    arch, parent = _parent(Path(ckpt), dtype)
    tokens = _tokens(arch.vocab_size)
    new = parent_pass(parent, tokens, MICRO)
    _assert_bitwise(new, _forward_with_hooks(parent, tokens))
    return arch, new


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_parent_pass_is_the_hooked_forward_bitwise(debug_parent, dtype):
    from megapuzzle.runtime import init_distributed

    torch.set_num_threads(1)
    init_distributed(tp=1, pp=1)
    arch, (hidden, final) = _stage_pass(str(debug_parent / "checkpoint"), dtype)
    assert sorted(hidden) == list(range(arch.num_layers))
    assert [tuple(f.shape) for f in final] == [(SEQ, MICRO, arch.hidden_size)] * (ROWS // MICRO)
    assert all(f.dtype == dtype for f in final)


def _pp_worker(info, ckpt: str):
    torch.set_num_threads(1)
    _, (hidden, final) = _stage_pass(ckpt, torch.float32)  # asserts the bitwise match on this rank
    return {"stage": info.pp_rank, "hidden": hidden, "final": final}


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2xpp2"])
def test_the_pipelined_parent_pass_is_the_scheduled_forward_bitwise(debug_parent, tp):
    """Each stage: its own layers' outputs and (the last) the final hidden state, bitwise Megatron's
    forward-only schedule's; at TP = 1 also bitwise the one-process pass (TP = 2 reduces in another order)."""
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.runtime import init_distributed
    from megapuzzle.train.parent_pass import parent_pass

    ckpt = str(debug_parent / "checkpoint")
    layers = load_arch(Path(ckpt)).num_layers
    res = run_distributed(_pp_worker, world=2 * tp, tp=tp, pp=2, args=(ckpt,))
    first, last = res[0], res[-1]
    assert (first["stage"], last["stage"]) == (0, 1) and first["final"] == [] and len(last["final"]) == ROWS // MICRO
    assert first["hidden"].keys() | last["hidden"].keys() == set(range(layers))
    assert not first["hidden"].keys() & last["hidden"].keys()
    if tp == 1:
        init_distributed(tp=1, pp=1)
        arch, parent = _parent(Path(ckpt), torch.float32)
        ref = parent_pass(parent, _tokens(arch.vocab_size), MICRO)
        _assert_bitwise(({**first["hidden"], **last["hidden"]}, last["final"]), ref)
