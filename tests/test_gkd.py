"""GKD (Puzzle stage 8) on the debug parent and a child initialised from it (no stand-ins):
the loss goes down, a child equal to the parent has zero loss, a killed run resumes to
bitwise the same weights, TP=2 and DP=2 give the TP=1 losses, PP=2 (also with TP=2, with tied
embeddings) gives the PP=1 losses and weights and resumes bitwise, the vocab-parallel KL/CE
matches plain torch."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _dist import assert_adamw_parity, run_distributed
from conftest import make_run
from megapuzzle.train.faults import kill_after
from megapuzzle.arch import AttentionVariant as A, FFNVariant as Fv, LayerArch
from megapuzzle.config import section
from megapuzzle.errors import UserError
from megapuzzle.stages.gkd.gkd import GKDConfig, run_gkd
from megapuzzle.runtime import destroy_distributed

QUIET = dict(progress=False)
BETAS = (0.9, 0.95)  # the AdamW betas of both GKD trainers (megapuzzle.stages.gkd.trainers)
BASE = dict(batch_size=4, seq_len=32, lr=1e-3, min_lr=1e-4, warmup_steps=1, eval_batches=2, log_every=1,
            checkpoint_every=2)
# TP-splittable (kv heads 2, FFN 128) and covering every kind of subblock: pruned MLP, no-op
# attention, linear attention, linear FFN, the parent's own blocks
CHILD = [LayerArch(A("gqa", 2), Fv("mlp", 128)), LayerArch(A("no_op"), Fv("mlp", 256)),
         LayerArch(A("linear"), Fv("mlp", 256)), LayerArch(A("gqa", 2), Fv("linear"))]


def _init_child(parent_dir: Path, dest: Path, layers=None) -> None:
    """The child as Puzzle initialises it from the parent (stage 2 rules, no BLD)."""
    from megapuzzle.checkpoints.canonical import load_checkpoint, save_checkpoint, tokenizer_path
    from megapuzzle.init import init_attention, init_ffn, local_layer_tensors, with_layer_prefix

    arch, t, _ = load_checkpoint(parent_dir)
    if layers is None:
        save_checkpoint(dest, arch, t, tokenizer_dir=tokenizer_path(parent_dir), meta={"source": "test"})
        return
    child = arch.with_layers(layers)
    out = {k: v for k, v in t.items() if not k.startswith("model.layers.")}
    for i, (pl, cl) in enumerate(zip(arch.layers, layers)):
        local = local_layer_tensors(t, i)
        a, _ = init_attention(arch, pl.attention, cl.attention, local)
        scores = local["mlp.down_proj.weight"].norm(dim=0)  # a weight-only stand-in for C_i
        f, _ = init_ffn(pl.ffn, cl.ffn, local, scores)
        out.update(with_layer_prefix({**a, **f}, i))
    save_checkpoint(dest, child, out, tokenizer_dir=tokenizer_path(parent_dir), meta={"source": "test-init"})


@pytest.fixture(scope="module")
def base(debug_parent, tmp_path_factory):
    torch.set_num_threads(1)
    run = make_run(debug_parent, tmp_path_factory.mktemp("gkd") / "run")
    _init_child(run / "parent", run / "child", CHILD)
    yield run
    destroy_distributed()


def fresh(base: Path, tmp: Path, same_as_parent: bool = False) -> Path:
    run = tmp / "run"
    for d in ("parent", "data") if same_as_parent else ("parent", "data", "child"):
        shutil.copytree(base / d, run / d)
    if same_as_parent:
        _init_child(run / "parent", run / "child")
    return run


def _weights(run: Path, ckpt: str = "gkd/checkpoint") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / ckpt / "model.safetensors"))


def test_loss_goes_down_and_the_stage_writes_its_outputs(base, tmp_path):
    from megapuzzle.checkpoints.canonical import load_arch

    run = fresh(base, tmp_path)
    cfg = GKDConfig(steps=12, **{**BASE, "log_every": 3, "checkpoint_every": 6})
    res = run_gkd(run, cfg, **QUIET)
    losses = [r["loss"] for r in res["history"]]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    assert res["final"]["loss"] < 0.7 * res["initial"]["loss"] and res["final"]["kl"] < res["initial"]["kl"]
    assert res["initial"]["lm_loss"] > res["initial"]["parent_lm_loss"]  # the init child is worse than the parent
    assert all(set(r) >= {"step", "loss", "cosine", "kl", "lm", "lr", "grad_norm"} for r in res["history"])
    assert load_arch(run / "gkd" / "checkpoint") == load_arch(run / "child")
    assert (run / "gkd" / "checkpoint" / "tokenizer" / "tokenizer.model").is_file()
    assert json.loads((run / "gkd" / "result.json").read_text())["final"] == res["final"]
    assert list((run / "tb" / "gkd").glob("events.out.tfevents.*"))
    assert not list((run / "gkd" / "train_state").glob("rank*/step_*"))  # dropped once the result is written
    assert run_gkd(run, cfg, **QUIET) == res  # done: nothing to redo
    again = run_gkd(run, GKDConfig(steps=2, **BASE), **QUIET)  # changed config: the stage runs again
    assert again["steps"] == 2 and again["resumed_from_step"] == 0 and len(again["history"]) == 2


def test_state_of_another_config_is_not_resumed(base, tmp_path):
    run = fresh(base, tmp_path)
    with kill_after("gkd", 3):
        assert run_gkd(run, GKDConfig(steps=4, **BASE), **QUIET) == {"stopped_at": 3}
    res = run_gkd(run, GKDConfig(steps=4, **{**BASE, "lr": 5e-4}), **QUIET)
    assert res["resumed_from_step"] == 0 and res["steps"] == 4


def test_child_equal_to_the_parent_has_zero_loss(base, tmp_path):
    run = fresh(base, tmp_path, same_as_parent=True)
    res = run_gkd(run, GKDConfig(steps=1, **BASE), **QUIET)
    for r in (res["initial"], res["history"][0]):
        assert abs(r["cosine"]) < 1e-5 and abs(r["kl"]) < 1e-6 and abs(r["loss"]) < 1e-5, r
    assert res["initial"]["lm_loss"] == pytest.approx(res["initial"]["parent_lm_loss"], abs=1e-6)


def test_kill_and_resume_gives_bitwise_the_same_weights(base, tmp_path):
    a = fresh(base, tmp_path / "a")
    b = fresh(base, tmp_path / "b")
    cfg = GKDConfig(steps=6, **{**BASE, "log_every": 2})
    ra = run_gkd(a, cfg, **QUIET)
    with kill_after("gkd", 3):
        assert run_gkd(b, cfg, **QUIET) == {"stopped_at": 3}  # killed after step 3, saved at 2
    assert not (b / "gkd" / "result.json").exists()
    rb = run_gkd(b, cfg, **QUIET)
    assert rb["resumed_from_step"] == 2 and ra["resumed_from_step"] == 0
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ra["history"] == rb["history"] and ra["final"] == rb["final"]


def _gkd_worker(info, run: str, cfg: GKDConfig):
    torch.set_num_threads(1)
    return run_gkd(run, cfg, **QUIET)


@pytest.mark.parametrize("tp,world", [(2, 2), (1, 2)], ids=["tp2", "dp2"])
def test_parallel_runs_give_the_single_process_losses(base, tmp_path, tp, world):
    cfg = GKDConfig(steps=4, **{**BASE, "log_every": 1, "checkpoint_every": 4})
    ref = run_gkd(fresh(base, tmp_path / "ref"), cfg, **QUIET)
    run = fresh(base, tmp_path / "par")
    res = run_distributed(_gkd_worker, world=world, tp=tp,
                          args=(str(run), GKDConfig(steps=4, tensor_parallel=tp, **{**BASE, "checkpoint_every": 4})))
    assert res[1] == {} and res[0]["world"] == {"tp": tp, "dp": world // tp}
    for r0, r1 in zip(ref["history"], res[0]["history"]):
        for k in ("loss", "cosine", "kl", "lm", "grad_norm"):
            assert r1[k] == pytest.approx(r0[k], rel=1e-4, abs=1e-7), (r1["step"], k)
    for k in ("loss", "kl", "lm_loss"):
        assert res[0]["final"][k] == pytest.approx(ref["final"][k], rel=1e-4, abs=1e-7)
    # the weights after 4 AdamW steps: within what fp32 rounding can become through AdamW (bounds
    # derived in tests/_dist.py), and those bounds well under the training's own updates
    lrs = [r["lr"] for r in ref["history"]]
    assert_adamw_parity(_weights(tmp_path / "ref" / "run"), _weights(run), lrs, BETAS, init=_weights(run, "child"))


# PP: 2 micro-batches per rank, so Megatron's 1F1B schedule has a warmup and a steady phase
PP_BASE = {**BASE, "micro_batch_size": 2, "log_every": 1, "checkpoint_every": 4}


def _tie_embeddings(run: Path) -> None:
    """Parent and child with tied input / output embeddings (lm_head dropped): under PP the
    first and the last stage each hold a copy, whose grads must be summed."""
    from megapuzzle.checkpoints.canonical import load_checkpoint, save_checkpoint, tokenizer_path

    for d in ("parent", "child"):
        arch, t, _ = load_checkpoint(run / d)
        t = {k: v for k, v in t.items() if k != "lm_head.weight"}
        save_checkpoint(run / f"{d}_tied", dataclasses.replace(arch, tie_word_embeddings=True), t,
                        tokenizer_dir=tokenizer_path(run / d), meta={"source": "test-tied"})
        shutil.rmtree(run / d)
        (run / f"{d}_tied").rename(run / d)


# Loss tolerances: PP alone only reorders a few fp32 sums (observed: <= 4e-6 relative); TP = 2
# adds its own reduction order, so TP = 2 x PP = 2 gets the TP = 2 test's tolerance (observed:
# 9e-6). The weights: assert_adamw_parity (fp32 noise through AdamW).
@pytest.mark.parametrize("tp,pp,tied,rel", [(1, 2, False, 1e-5), (1, 2, True, 1e-5), (2, 2, False, 1e-4)],
                         ids=["pp2", "pp2-tied", "tp2xpp2"])
def test_pipeline_parallel_gives_the_single_process_losses_and_weights(base, tmp_path, tp, pp, tied, rel):
    """PP = 2 (the child's forward + backward through Megatron's 1F1B schedule, the parent
    forward-only through the pipeline): the PP = 1 loss curve, grad norms, held-out metrics and
    final child weights (gathered from both stages)."""
    ref_run, run = fresh(base, tmp_path / "ref"), fresh(base, tmp_path / "par")
    if tied:
        _tie_embeddings(ref_run)
        _tie_embeddings(run)
    ref = run_gkd(ref_run, GKDConfig(steps=4, **PP_BASE), **QUIET)
    cfg = GKDConfig(steps=4, tensor_parallel=tp, pipeline_parallel=pp, **PP_BASE)
    res = run_distributed(_gkd_worker, world=tp * pp, tp=tp, pp=pp, args=(str(run), cfg))
    assert all(r == {} for r in res[1:]) and res[0]["world"] == {"tp": tp, "pp": pp, "dp": 1}
    assert len(res[0]["history"]) == len(ref["history"]) == 4
    for r0, r1 in zip(ref["history"], res[0]["history"]):
        for k in ("loss", "cosine", "kl", "lm", "grad_norm"):
            assert r1[k] == pytest.approx(r0[k], rel=rel, abs=1e-7), (r1["step"], k)
    for when in ("initial", "final"):
        for k in ("loss", "cosine", "kl", "lm_loss", "parent_lm_loss"):
            assert res[0][when][k] == pytest.approx(ref[when][k], rel=rel, abs=1e-7), (when, k)
        assert res[0][when]["tokens"] == ref[when]["tokens"]
    wa, wb, w0 = _weights(ref_run), _weights(run), _weights(run, "child")
    assert wa.keys() == wb.keys() == w0.keys()
    assert all(not wa[k].equal(w0[k]) for k in wa if "layers." in k)  # every layer was trained
    assert_adamw_parity(wa, wb, [r["lr"] for r in ref["history"]], BETAS, init=w0)  # tests/_dist.py


def _gkd_resume_worker(info, run_a: str, run_b: str, cfg: GKDConfig):
    torch.set_num_threads(1)
    ra = run_gkd(run_a, cfg, **QUIET)
    with kill_after("gkd", 3):
        stopped = run_gkd(run_b, cfg, **QUIET)  # killed after step 3, saved at 2
    state = Path(run_b) / "gkd" / "train_state"
    saved = sorted(str(d.relative_to(state)) for d in state.glob("rank*/step_*"))
    if (Path(run_b) / "gkd" / "result.json").exists():
        saved.append("result.json")
    return ra, stopped, saved, run_gkd(run_b, cfg, **QUIET)


def test_pipeline_parallel_kill_and_resume_gives_bitwise_the_same_weights(base, tmp_path):
    a, b = fresh(base, tmp_path / "a"), fresh(base, tmp_path / "b")
    cfg = GKDConfig(steps=6, pipeline_parallel=2, **{**PP_BASE, "log_every": 2, "checkpoint_every": 2})
    res = run_distributed(_gkd_resume_worker, world=2, pp=2, args=(str(a), str(b), cfg))
    ra, stopped, saved, rb = res[0]
    assert stopped == {"stopped_at": 3} and res[1][1] == {"stopped_at": 3}
    assert saved == ["rank000/step_00000002", "rank001/step_00000002"]  # each stage its own shard
    assert rb["resumed_from_step"] == 2 and ra["resumed_from_step"] == 0
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ra["history"] == rb["history"] and ra["final"] == rb["final"]


def test_vocab_parallel_kl_and_ce_match_torch(base):
    from megapuzzle.train.distill import VocabParallelKD as _VocabParallelKD
    from megapuzzle.runtime import init_distributed

    init_distributed(tp=1, pp=1)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    t, y = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    for T in (1.0, 2.0):
        kl, ce = _VocabParallelKD.apply(s, t, y, T)
        (0.7 * kl.sum() + 0.3 * ce.sum()).backward()
        ours, s.grad = s.grad, None
        lp, lq = F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
        kl2 = T * T * (lp.exp() * (lp - lq)).sum(-1)
        ce2 = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1), reduction="none").reshape(2, 5)
        (0.7 * kl2.sum() + 0.3 * ce2.sum()).backward()
        torch.testing.assert_close(kl, kl2.detach())
        torch.testing.assert_close(ce, ce2.detach())
        torch.testing.assert_close(ours, s.grad)
        s.grad = None


def test_config_is_validated():
    with pytest.raises(UserError, match="alternatives"):
        GKDConfig(steps=10, tokens=1000)
    with pytest.raises(UserError, match="unknown key"):
        section({"gkd": {"stepz": 3}}, "gkd", GKDConfig)
    with pytest.raises(UserError, match="every loss weight is 0"):
        GKDConfig(cosine_weight=0, kl_weight=0)
    with pytest.raises(UserError, match="pipeline_parallel must be an integer >= 1"):
        GKDConfig(pipeline_parallel=0)
    c = section({"gkd": {"tokens": 1000, "batch_size": 2, "seq_len": 64, "lr": "3e-4"}}, "gkd", GKDConfig)
    assert c.total_steps == 8 and c.lr == 3e-4
    assert GKDConfig().total_steps == 200
