"""`megapuzzle score` under pipeline parallelism (gloo processes, tests/_dist.py): PP=2, PP=4 and
PP=2 x DP=2 give the single process's scores.json, TP=2 x PP=2 gives TP=1's within TP's rounding,
a PP=2 run killed after some blocks resumes to the same scores without redoing them, and a PP=2
rank builds only its stage's share of the parent.

Why the PP scores are compared for EXACT equality: a pipeline moves the residual stream between
stages byte for byte (send / recv copy it), and every stage runs the same kernels on the same
shapes in the same order as the single process does (the same layers, the same stacked candidate
batch, the same fp32 metric sums, added up in the same batch order; the parent's metrics travel
as float64, which holds the python floats exactly). Every process runs torch on one thread, as
the reference run does (conftest), so no GEMM changes its blocking either: there is no rounding
difference to allow for. TP splits the GEMMs' reductions, hence TP=2's tolerance (that of
tests/test_search.py::test_tp2_scoring_equals_tp1)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import SEARCH_CFG, make_searched_run
from _dist import run_distributed
from megapuzzle.config import section
from megapuzzle.stages.score.score import ScoreConfig, run_score
from megapuzzle.train.faults import kill_after

CFG = SEARCH_CFG


@pytest.fixture(scope="module")
def run(debug_parent, tmp_path_factory):
    return make_searched_run(debug_parent, tmp_path_factory.mktemp("score_pp") / "run", CFG)


def _copy(run, dest, drop_kv1: bool = False):
    for d in ("parent", "data", "library"):
        shutil.copytree(run / d, dest / d)
    if drop_kv1:  # KV 1 does not split over TP=2
        index = json.loads((dest / "library/index.json").read_text())
        index["blocks"] = {k: v for k, v in index["blocks"].items() if "kv1" not in k}
        (dest / "library/index.json").write_text(json.dumps(index))
    return dest


def _score(info, run_dir, cfg, stop_after=None):
    torch.set_num_threads(1)
    if stop_after is None:
        return run_score(run_dir, cfg, tp=info.tp_size, pp=info.pp_size, progress=False)
    with kill_after("score", stop_after):
        return run_score(run_dir, cfg, tp=info.tp_size, pp=info.pp_size, progress=False)


def _score_and_count(info, run_dir, cfg):
    """Score, then what this rank's parent share holds, built as score builds it."""
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.model.gpt import count_parameters
    from megapuzzle.stages.score.score import build_parent_stage

    res = _score(info, run_dir, cfg)
    parent, tensors, _ = load_checkpoint(run_dir / "parent")
    model = build_parent_stage(parent, tensors, torch.float32)
    layers = sorted(layer.layer_number - 1 for layer in model.decoder.layers)
    return {"result": res, "params": count_parameters(model), "layers": layers, "pp_rank": info.pp_rank}


def _ref(run):
    return json.loads((run / "scores.json").read_text())


@pytest.mark.parametrize("world,pp", [(2, 2), (4, 4), (4, 2)], ids=["pp2", "pp4", "pp2xdp2"])
def test_pipeline_scores_equal_one_process(run, tmp_path, world, pp):
    r = _copy(run, tmp_path / "r")
    out = run_distributed(_score_and_count, world=world, pp=pp, args=(r, section(CFG, "score", ScoreConfig)))
    res, ref = out[0]["result"], _ref(run)
    assert res["blocks"] == ref["blocks"] and res["parent"] == ref["parent"]  # bitwise (module docstring)
    assert json.loads((r / "scores.json").read_text())["blocks"] == ref["blocks"]
    # the last stage of each pipeline writes its state; the other stages hold no metrics
    writers = sorted(p.name for p in (r / "state" / "score").glob("*.json"))
    assert writers == [f"rank{i:03d}.json" for i, o in enumerate(out) if o["pp_rank"] == pp - 1]
    if pp == 2 and world == 2:  # each rank holds its stage's share of the parent, no more
        from megapuzzle.checkpoints.canonical import load_arch
        from megapuzzle.memory_model import weights_share

        arch = load_arch(r / "parent")
        whole = weights_share(arch, 1, 1, 0, bytes_per=1)
        assert [o["layers"] for o in out] == [[0, 1], [2, 3]]
        for o in out:
            assert o["params"] == weights_share(arch, 1, 2, o["pp_rank"], bytes_per=1) < whole
        head = arch.vocab_size * arch.hidden_size  # the last stage's head (tied or not: its own copy)
        assert sum(o["params"] for o in out) == whole + (head if arch.tie_word_embeddings else 0)


def test_tp2_pp2_scores_equal_tp1(run, tmp_path):
    r = _copy(run, tmp_path / "r", drop_kv1=True)
    res = run_distributed(_score, world=4, tp=2, pp=2, args=(r, section(CFG, "score", ScoreConfig)))[0]
    ref = _ref(run)
    assert res["parent"]["lm_loss"] == pytest.approx(ref["parent"]["lm_loss"], rel=1e-5)
    assert res["blocks"].keys() == {k for k in ref["blocks"] if "kv1" not in k}
    for key, b in res["blocks"].items():
        for m in ("kl", "lm_loss"):
            assert b[m] == pytest.approx(ref["blocks"][key][m], rel=1e-3, abs=1e-5), (key, m)


def test_pp2_resumes_after_a_kill(run, tmp_path):
    r = _copy(run, tmp_path / "r")
    cfg = section(CFG, "score", ScoreConfig)
    n = len(_ref(run)["blocks"])
    assert run_distributed(_score, world=2, pp=2, args=(r, cfg, 3)) == [{"stopped_after": 3}] * 2
    assert not (r / "scores.json").exists()
    assert len(json.loads((r / "state/score/rank001.json").read_text())["blocks"]) == 3
    # armed to stop at the (n - 2)-th block it scores: a resume that redid the 3 saved ones would stop
    res = run_distributed(_score, world=2, pp=2, args=(r, cfg, n - 2))[0]
    assert res["blocks"] == _ref(run)["blocks"]


def test_a_pipeline_the_launch_cannot_hold_fails_at_start_in_one_line(run, tmp_path):
    from megapuzzle.errors import UserError

    r = _copy(run, tmp_path / "r")
    with pytest.raises(UserError, match=r"score \(tensor_parallel=1, pipeline_parallel=2\): world size 1"):
        run_score(r, section(CFG, "score", ScoreConfig), pp=2, progress=False)
    with pytest.raises(UserError, match="score.pipeline_parallel"):
        ScoreConfig(pipeline_parallel=0)
