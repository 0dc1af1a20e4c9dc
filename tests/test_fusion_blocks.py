"""Fused-run blocks: fold init, BLD over a run (parent input at i -> parent output at j), replace-the-run KL."""

from __future__ import annotations

import torch

from megapuzzle.arch import FFNVariant


def test_run_block_bld_and_score(debug_parent):
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.fusion_blocks import init_run_block, run_state_dict, score_run_block, train_run_block

    torch.set_num_threads(1)
    ck, data = debug_parent / "checkpoint", debug_parent / "data"
    parent, tensors, _ = load_checkpoint(ck, dtype=torch.float32)
    layer, local = init_run_block(parent, tensors, 1, 2)
    assert layer.attention == parent.layers[1].attention and layer.ffn == FFNVariant("mlp", 512)
    arch, sd = run_state_dict(parent, tensors, 1, 2, layer, local)
    assert arch.layers[2].name == "no_op+no_op" and arch.num_layers == parent.num_layers

    res = train_run_block(ck, data / "train", data / "heldout", 1, 2, steps=15, batch_size=4, seq_len=32, lr=2e-3)
    assert set(res.tensors) == set(local)
    assert 0 < res.nmse_final < res.nmse_init  # BLD across the run improves on the exact fold
    before = score_run_block(ck, data / "heldout", 1, 2, layer, local, seq_len=32)
    after = score_run_block(ck, data / "heldout", 1, 2, res.layer, res.tensors, seq_len=32)
    assert before["kl_to_parent"] > 0 and after["kl_to_parent"] < before["kl_to_parent"]
