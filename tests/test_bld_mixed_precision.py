"""BLD in bf16 (what `bld.dtype: auto` trains on a GPU), run here on CPU through the same
Megatron-core optimizers: bf16 teacher and students, fp32 master weights and main grads.

Asserted: the master weights carry updates too small for bf16 (a pure-bf16 AdamW stalls),
the fp32 master trajectory equals fp32 AdamW bitwise, clipping stays per block, every bf16
block improves on its init and lands near the fp32 library, the library keeps the parent's
dtype and records the training dtype, the signature separates bf16 from fp32 libraries, and
a kill + resume in bf16 (master weights restored from the checkpoint) is bitwise equal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_bld
from _dist import run_distributed
from megapuzzle.train.faults import kill_after
from megapuzzle.stages.bld.bld import BLDConfig, run_bld
from megapuzzle.config import load_config
from megapuzzle.library import BlockLibrary
from megapuzzle.runtime import destroy_distributed, init_distributed
from test_bld import _bld_worker, _lib_tensors, fresh

base = test_bld.base  # its fixture: RUN with the debug parent and data, built again for this module

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bld_debug.yaml"
CFG = load_config(EXAMPLE)
BF16 = {"search_space": CFG["search_space"], "bld": {**CFG["bld"], "dtype": "bfloat16"}}
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def fp32_and_bf16(base, tmp_path_factory):
    """(fp32 run, bf16 run), each uninterrupted, on the same parent and data."""
    runs = []
    for c in (CFG, BF16):
        run = fresh(base, tmp_path_factory.mktemp("r"))
        run_bld(run, c, **QUIET)
        runs.append(run)
    return tuple(runs)


# ----------------------------------------------------------------------------- the optimizer itself

@pytest.fixture
def world1():
    torch.set_num_threads(1)
    init_distributed(tp=1, pp=1, seed=1)
    yield
    destroy_distributed()


def _bf16_param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.bfloat16))


def test_master_weights_keep_updates_bf16_cannot_hold(world1):
    """lr 1e-3 from 1.0: each AdamW step (~1e-3) is under half a bf16 ulp at 1.0 and above, so
    AdamW on the bf16 tensor itself never moves it; the fp32 master accumulates the steps and
    equals fp32 AdamW on the same (bf16-exact) gradients bitwise."""
    from megapuzzle.train.block_optimizer import BlockOptimizers

    p = _bf16_param([[1.0, -1.0], [1.5, 2.0]])
    plain = _bf16_param([[1.0, -1.0], [1.5, 2.0]])
    ref = torch.nn.Parameter(p.detach().float().clone())
    opt = BlockOptimizers({"b": {"b/w": p}}, lr=1e-3, weight_decay=0.0, grad_clip=0.0)
    bf16_adam = torch.optim.AdamW([plain], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    ref_adam = torch.optim.AdamW([ref], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    grad = torch.tensor([[0.25, -0.5], [1.0, 0.125]])  # bf16-exact
    for _ in range(20):
        p.grad, plain.grad, ref.grad = grad.bfloat16(), grad.bfloat16(), grad.clone()
        opt.step()
        opt.zero_grad()
        bf16_adam.step()
        ref_adam.step()
    (main,) = opt._mains("b").values()
    assert main.dtype == torch.float32 and p.dtype == torch.bfloat16
    assert torch.equal(main, ref.detach())  # the master follows fp32 AdamW exactly
    assert torch.equal(p.detach(), main.bfloat16())  # and the model param is its bf16 copy
    assert torch.equal(plain.detach(), torch.tensor([[1.0, -1.0], [1.5, 2.0]], dtype=torch.bfloat16))  # stalled
    assert (p.detach().float() - torch.tensor([[1.0, -1.0], [1.5, 2.0]])).abs().min() > 0.01  # ~20 x 1e-3


def test_clipping_is_per_block(world1):
    """A block with a huge gradient is clipped on its own norm and leaves its neighbour's step
    exactly as if the neighbour trained alone."""
    from megapuzzle.train.block_optimizer import BlockOptimizers

    def run(blocks):
        params = {k: _bf16_param(v) for k, v in blocks.items()}
        opt = BlockOptimizers({k: {f"{k}/w": p} for k, p in params.items()}, lr=1e-2, weight_decay=0.0,
                              grad_clip=1.0)
        grads = {"small": torch.tensor([0.25, 0.5]), "huge": torch.tensor([300.0, -400.0])}
        norms = []
        for step in range(3):  # the huge norm grows (500, 1000, 1500): a joint clip would rescale
            for k, p in params.items():  # the small block's grads by a varying factor, which AdamW feels
                p.grad = (grads[k] * (step + 1 if k == "huge" else 1)).bfloat16()
            norms.append(opt.step())
            opt.zero_grad()
        return {k: p.detach() for k, p in params.items()}, norms

    both, norms = run({"small": [1.0, 2.0], "huge": [1.0, 2.0]})
    alone, _ = run({"small": [1.0, 2.0]})
    assert torch.equal(both["small"], alone["small"])
    assert [n[1] for n in norms] == pytest.approx([500.0, 1000.0, 1500.0], rel=1e-6)  # each block its own norm
    assert all(n[0] == pytest.approx(0.5590169943749475, rel=1e-6) for n in norms)


# ----------------------------------------------------------------------------- BLD in bf16

def test_bf16_blocks_improve_and_stay_close_to_fp32(fp32_and_bf16):
    r32, r16 = fp32_and_bf16
    e32, e16 = BlockLibrary(r32 / "library").entries(), BlockLibrary(r16 / "library").entries()
    assert e32.keys() == e16.keys()
    trained = [k for k, e in e16.items() if e["tokens"] > 0]
    assert trained and trained == [k for k, e in e32.items() if e["tokens"] > 0]
    for k in trained:
        e = e16[k]
        assert e["trained_dtype"] == "bfloat16" and e32[k]["trained_dtype"] == "float32"
        assert e["final_nmse"] <= e["init_nmse"], k
        assert e["trained_nmse"] < e["init_nmse"] or e["kept"] == "init", k
        # bf16 activations and weights move the NMSE by at most a few percent of its fp32 value
        assert abs(e["final_nmse"] - e32[k]["final_nmse"]) <= 0.05 * e32[k]["final_nmse"] + 2e-4, \
            (k, e["final_nmse"], e32[k]["final_nmse"])
    assert {e16[k]["bld_signature"] for k in trained}.isdisjoint({e32[k]["bld_signature"] for k in trained})
    lib = BlockLibrary(r16 / "library")
    for k in trained:
        for n, t in lib.load_block(k).items():
            assert t.dtype == torch.float32, (k, n)  # the parent checkpoint's dtype
            assert torch.equal(t, t.bfloat16().float()), (k, n)  # written from the trained bf16 params


def test_bf16_signature_differs_and_fp32_signature_is_unchanged():
    fp32, bf16 = BLDConfig(dtype="float32"), BLDConfig(dtype="bfloat16")
    assert BLDConfig().training_signature() == fp32.training_signature()  # CPU: auto = float32
    assert bf16.training_signature() != fp32.training_signature()
    assert bf16.params_dtype == torch.bfloat16


def test_bf16_kill_and_resume_is_bitwise_equal(fp32_and_bf16, base, tmp_path):
    _, r16 = fp32_and_bf16
    run = fresh(base, tmp_path)
    with kill_after("bld", 5):
        assert run_bld(run, BF16, **QUIET)["stopped_at"] == 5  # checkpoint at step 3
    (state,) = (run / "state" / "bld").glob("*/rank000")
    step = state / (state / "latest").read_text().strip()
    params, optim = load_file(str(step / "params.safetensors")), load_file(str(step / "optim.safetensors"))
    assert params and all(t.dtype == torch.bfloat16 for t in params.values())
    masters = {k[: -len("/main_param")]: t for k, t in optim.items() if k.endswith("/main_param")}
    assert masters.keys() == params.keys() and all(t.dtype == torch.float32 for t in masters.values())
    assert any(not torch.equal(masters[k].bfloat16().float(), masters[k]) for k in masters)  # not bf16-rounded
    assert run_bld(run, BF16, **QUIET)["resumed_from"] == 3
    _assert_same_library(r16, run)


def _assert_same_library(run_a: Path, run_b: Path) -> None:
    a, b = _lib_tensors(run_a), _lib_tensors(run_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])
    ea, eb = BlockLibrary(run_a / "library").entries(), BlockLibrary(run_b / "library").entries()
    assert {k: v["final_nmse"] for k, v in ea.items()} == {k: v["final_nmse"] for k, v in eb.items()}


def test_bf16_pp2_gives_the_one_process_bf16_library(fp32_and_bf16, base, tmp_path):
    """PP=2 relays the bf16 boundary state: the library equals the one-process bf16 run bitwise."""
    _, r16 = fp32_and_bf16
    run = fresh(base, tmp_path)
    c = {**BF16, "bld": {**BF16["bld"], "pipeline_parallel": 2}}
    res = run_distributed(_bld_worker, world=2, pp=2, args=(str(run), c))
    assert res[0]["trained"] and res[1]["trained"]
    _assert_same_library(r16, run)
