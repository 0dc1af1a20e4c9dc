"""TP / PP / DP over gloo on CPU: the same canonical weights give the same logits, hidden states
and gradients as TP=1, and canonical -> model -> gather is exact. Workers run in separate
processes (tests/_dist.py); the TP=1 reference runs in this process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _dist import run_distributed
from megapuzzle.arch import Architecture
from megapuzzle.model import (
    build_gpt_model,
    forward_hidden_states,
    forward_logits,
    gather_canonical_from_model,
    init_random_canonical,
    load_canonical_into_model,
    stage_layer_ranges,
)
from megapuzzle.runtime import DistributedError, destroy_distributed, init_distributed
from megapuzzle.runtime.distributed import _launch_env
from test_model import LLAMA3, tiny

RTOL = 1e-5


def _tokens(seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def _canonical_grads(model, arch):
    """Gradients in canonical layout: put each .grad where its parameter was, then gather."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    return gather_canonical_from_model(model, arch, all_ranks=True)


def run_case(info, arch: Architecture, seed: int, tokens: torch.Tensor, micro_batch_size: int | None,
             with_grads: bool):
    """One rank: load the canonical weights, forward (and backward at PP=1), gather back."""
    sd = init_random_canonical(arch, seed=seed, std=0.1, norm_std=0.1)
    model = build_gpt_model(arch)
    load_canonical_into_model(model, sd)
    out = {"info": info, "layer_numbers": [l.layer_number - 1 for l in model.decoder.layers]}
    gathered = gather_canonical_from_model(model, all_ranks=True)
    out["roundtrip_all"] = set(gathered) == set(sd) and all(torch.equal(gathered[k], sd[k]) for k in sd)
    to0 = gather_canonical_from_model(model)
    out["roundtrip_rank0"] = (set(to0) == set(sd) and all(torch.equal(to0[k], sd[k]) for k in sd)
                              if info.rank == 0 else to0 == {})
    with torch.no_grad():
        out["logits"], out["hidden"] = forward_hidden_states(model, tokens, micro_batch_size=micro_batch_size)
    if with_grads:  # PP=1: plain autograd through the TP layers
        logits = forward_logits(model, tokens)
        F.cross_entropy(logits[:, :-1].reshape(-1, 128), tokens[:, 1:].reshape(-1)).backward()
        out["grads"] = _canonical_grads(model, arch)
    return out


@pytest.fixture(scope="module")
def dist1():
    torch.set_num_threads(1)
    yield init_distributed(tp=1, pp=1)
    destroy_distributed()


def _reference(arch, seed, tokens, with_grads):
    return run_case(init_distributed(1, 1), arch, seed, tokens, None, with_grads)


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _check(results, ref, arch):
    errs = []
    for r in results:
        assert r["roundtrip_all"] and r["roundtrip_rank0"], f"rank {r['info'].rank}: canonical round trip not exact"
        errs.append(_rel(r["logits"], ref["logits"]))
        assert errs[-1] < RTOL, f"rank {r['info'].rank}: logits rel err {errs[-1]:.2e}"
        assert sorted(r["hidden"]) == list(range(arch.num_layers + 1))
        for i, h in r["hidden"].items():
            assert _rel(h, ref["hidden"][i]) < RTOL, f"rank {r['info'].rank}: hidden state {i} differs"
        if "grads" in r:
            for k, g in ref["grads"].items():
                assert _rel(r["grads"][k], g) < 1e-4, f"rank {r['info'].rank}: grad of {k} differs"
    return max(errs)


def test_tp2_matches_tp1(dist1):
    arch, tokens = tiny(), _tokens()
    ref = _reference(arch, 11, tokens, with_grads=True)
    res = run_distributed(run_case, world=2, tp=2, args=(arch, 11, tokens, None, True))
    assert [r["info"].tp_rank for r in res] == [0, 1] and res[0]["info"].dp_size == 1
    _check(res, ref, arch)


def test_pp2_matches_tp1_tied_llama3(dist1):
    """Uneven split (5 layers -> 3 + 2), two microbatches, tied embeddings across stages."""
    arch, tokens = tiny(tie_word_embeddings=True, rope_scaling=LLAMA3), _tokens(8)
    ref = _reference(arch, 12, tokens, with_grads=False)
    res = run_distributed(run_case, world=2, pp=2, args=(arch, 12, tokens, 1, False))
    ranges = stage_layer_ranges(arch.num_layers, 2)
    for r in res:
        assert r["layer_numbers"] == list(ranges[r["info"].pp_rank])
    assert [r["info"].is_last_stage for r in res] == [False, True]
    _check(res, ref, arch)


def test_tp2_pp2_matches_tp1(dist1):
    arch, tokens = tiny(), _tokens(9)
    ref = _reference(arch, 13, tokens, with_grads=False)
    res = run_distributed(run_case, world=4, tp=2, pp=2, args=(arch, 13, tokens, 1, False))
    assert sorted((r["info"].pp_rank, r["info"].tp_rank) for r in res) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _check(res, ref, arch)


def dp_case(info):
    return info


def test_dp_is_world_over_tp_pp(dist1):
    infos = run_distributed(dp_case, world=2)
    assert [(i.dp_size, i.dp_rank, i.tp_size, i.pp_size) for i in infos] == [(2, 0, 1, 1), (2, 1, 1, 1)]
    assert all(i.backend == "gloo" and i.device.type == "cpu" for i in infos)


def test_world_not_divisible_is_one_line_error(dist1):
    with pytest.raises(DistributedError) as e:
        init_distributed(tp=2, pp=1)
    assert "not divisible" in str(e.value) and "\n" not in str(e.value)
    init_distributed(1, 1)  # state untouched and still usable


def test_launch_env_from_torchrun_and_slurm(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    assert _launch_env() == (0, 1, 0, None)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node07")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert _launch_env() == (3, 4, 1, "slurm")
    import os

    assert os.environ["MASTER_ADDR"] == "node07" and os.environ["MASTER_PORT"] == str(15000 + 4242)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _launch_env() == (1, 2, 1, "torchrun")


def _json_collectives_worker(info):
    from megapuzzle.errors import UserError
    from megapuzzle.runtime.distributed import all_gather_json, broadcast_json, rank0_decides

    got = broadcast_json({"assign": [[["L000.ffn.mlp_128"]], []], "é": 1.5} if info.rank == 0 else None)
    gathered = all_gather_json([list(range(info.rank * 3)), None if info.rank else "sig"])
    ok = rank0_decides(lambda: {"rank": info.rank}, "plan")

    def fail():
        raise ValueError("library index damaged")

    try:
        rank0_decides(fail, "plan BLD", (ValueError,))
        err = None
    except (ValueError, UserError) as e:
        err = f"{type(e).__name__}: {e}"
    return got, gathered, ok, err


def test_json_collectives_carry_decisions_without_pickle():
    res = run_distributed(_json_collectives_worker, world=2)
    for got, gathered, ok, _ in res:
        assert got == {"assign": [[["L000.ffn.mlp_128"]], []], "é": 1.5}
        assert gathered == [[[], "sig"], [[0, 1, 2], None]]  # rank order, different sizes
        assert ok == {"rank": 0}  # rank 0's answer on every rank
    # rank 0 raises its own error; the others a one-line UserError naming it (nobody waits forever)
    assert res[0][3] == "ValueError: library index damaged"
    assert res[1][3] == "UserError: rank 0 could not plan BLD: ValueError: library index damaged"


def test_no_process_boundary_unpickles():
    # torch's *_object collectives pickle on one rank and unpickle on the others
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "megapuzzle"
    bad = [f"{p}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"\b(broadcast_object_list|all_gather_object|gather_object|scatter_object_list)\(|"
                        r"\bpickle\.loads?\(|torch\.load\(", line)]
    assert bad == []
