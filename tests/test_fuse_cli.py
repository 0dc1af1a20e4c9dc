"""`megapuzzle fuse` end to end on the debug parent: streamed sharded write, HF DeciLM source, GKD, report."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megapuzzle.arch import AttentionVariant as A, FFNVariant as F, LayerArch


def _child_with_run(debug_parent: Path, dest: Path) -> Path:
    """The debug parent with attention removed from layers 1 and 2: FFNs 0, 1, 2 form a run."""
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes, load_checkpoint, tokenizer_path, \
        write_checkpoint

    arch, t, _ = load_checkpoint(debug_parent / "checkpoint")
    layers = list(arch.layers)
    for i in (1, 2):
        layers[i] = LayerArch(A("no_op"), layers[i].ffn)
    layers[2] = LayerArch(A("no_op"), F("mlp", 128))  # narrower variant: keep the top 128 channels
    child = arch.with_layers(layers)

    def items():
        for name in expected_canonical_shapes(child):
            x = t[name]
            if name.startswith("model.layers.2.mlp.") and name.endswith(("gate_proj.weight", "up_proj.weight")):
                x = x[:128]
            elif name == "model.layers.2.mlp.down_proj.weight":
                x = x[:, :128]
            yield name, x
    return write_checkpoint(dest, child, items(), tokenizer_dir=tokenizer_path(debug_parent / "checkpoint"))


def test_fuse_command_end_to_end(debug_parent, tmp_path):
    from megapuzzle.checkpoints.canonical import is_checkpoint, load_checkpoint
    from megapuzzle.checkpoints.export_hf import export_hf
    from megapuzzle.cli import main
    from megapuzzle.fuse import write_fused
    from megapuzzle.fusion import fuse_state_dict

    torch.set_num_threads(1)
    child = _child_with_run(debug_parent, tmp_path / "child")
    arch, t, _ = load_checkpoint(child)
    want_arch, want = fuse_state_dict(arch, t, [(0, 2)])
    assert want_arch.layers[0].ffn == F("mlp", 256 + 256 + 128)

    # streamed + sharded: a shard per layer at this size, an index, the same tensors as in memory
    new, runs = write_fused(child, tmp_path / "fused", None, max_shard_bytes=100_000)[1:]
    assert runs == [(0, 2)] and (tmp_path / "fused" / "model.safetensors.index.json").is_file()
    fa, ft, meta = load_checkpoint(tmp_path / "fused")
    assert fa == want_arch == new and meta["runs"] == [[0, 2]]
    assert set(ft) == set(want) and all(torch.equal(ft[k], want[k]) for k in want)

    # a foreign DeciLM export read through the import path fuses to the same tensors
    export_hf(child, tmp_path / "hf", dtype="fp32")
    rc = main(["fuse", "--child", str(tmp_path / "hf"), "--out", str(tmp_path / "out_hf"),
               "--data", str(debug_parent / "data"), "--gkd-steps", "0", "--no-measure"])
    assert rc == 0
    ha, ht, _ = load_checkpoint(tmp_path / "out_hf" / "child")
    assert ha == want_arch and all(torch.equal(ht[k], want[k].to(ht[k].dtype)) for k in want)

    # the whole command: GKD from the unfused child, quality of all three, paired speed
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("gkd: {batch_size: 2, seq_len: 32, checkpoint_every: 100, log_every: 100, eval_batches: 1}\n"
                   "evaluate: {batch_size: 1, prefill_len: 4, gen_len: 2, rounds: 2, warmup: 0,"
                   " quality_batch_size: 2, seq_len: 32, eval_batches: 2}\n")
    rc = main(["fuse", "--child", str(child), "--out", str(tmp_path / "out"), "--data", str(debug_parent / "data"),
               "--config", str(cfg), "--gkd-steps", "3"])
    assert rc == 0
    out = tmp_path / "out"
    rep = json.loads((out / "fuse.json").read_text())
    assert is_checkpoint(out / "child") and is_checkpoint(out / "gkd" / "checkpoint") and (out / "fuse.md").is_file()
    q = rep["quality"]
    assert set(q) == {"unfused", "fused", "fused_gkd"}
    assert q["unfused"]["kl_to_parent"] == 0.0 and q["unfused"]["top1_agreement"] == 1.0
    assert q["fused"]["kl_to_parent"] > 0  # the fusion is an approximation, and it is measured
    assert rep["gkd"]["steps"] == 3 and rep["speed"]["speedup_measured"] > 0
    assert rep["layers_after"] == ["gqa_kv2+mlp_640", "no_op+no_op", "no_op+no_op", "gqa_kv2+mlp_256"]


def test_fuse_refuses_a_child_without_runs(debug_parent, tmp_path):
    from megapuzzle.cli import main

    rc = main(["fuse", "--child", str(debug_parent / "checkpoint"), "--out", str(tmp_path / "o"),
               "--data", str(debug_parent / "data"), "--gkd-steps", "0"])
    assert rc == 2


def _fuse_worker(info, child: str, out: str, data: str, pp: int):
    from megapuzzle.fuse import fuse
    from megapuzzle.stages.evaluate.evaluate import EvaluateConfig

    torch.set_num_threads(1)
    cfg = EvaluateConfig(quality_batch_size=2, seq_len=32, eval_batches=2, pipeline_parallel=pp)
    return fuse(child, out, data=data, heal=False, eval_cfg=cfg, measure=False)["quality"]


def test_fuse_quality_at_pp2_equals_one_process(debug_parent, tmp_path):
    """Each rank builds its pipeline stage of each model (evaluate's layout), two models at a time:
    the same quality as one process (fp32, the same ops per layer: reduction order only)."""
    import pytest
    from _dist import run_distributed

    child = _child_with_run(debug_parent, tmp_path / "child")
    one = _fuse_worker(None, str(child), str(tmp_path / "one"), str(debug_parent / "data"), 1)
    res = run_distributed(_fuse_worker, world=2, pp=2,
                          args=(str(child), str(tmp_path / "pp"), str(debug_parent / "data"), 2))
    assert set(one) == {"unfused", "fused"} and res[0] == res[1]  # every rank has the report
    for name, q in one.items():
        for k in ("lm_loss", "accuracy", "kl_to_parent", "top1_agreement"):
            assert res[0][name][k] == pytest.approx(q[k], rel=1e-5, abs=1e-7), (name, k)
    assert json.loads((tmp_path / "pp" / "fuse.json").read_text())["quality"] == res[0]
