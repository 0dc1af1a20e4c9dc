"""Through the CLI, end to end: HF Llama dir -> `megapuzzle import-hf` -> our Megatron-core model
(TP=1 and TP=2) gives transformers' logits; a heterogeneous model using every variant kind ->
`megapuzzle export-hf` -> transformers (trust_remote_code) gives our logits; a checkpoint
written from a TP=2 model exports byte-identical files to the TP=1 one; --force is required to
overwrite."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch

from _dist import run_distributed
from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as F, LayerArch
from megapuzzle.cli import main

TOL = 1e-4


def _llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=500000.0, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return tmp_path / "hf", model


def _tokens(vocab):
    return torch.randint(0, vocab, (2, 96), generator=torch.Generator().manual_seed(1))  # past 64: scaled RoPE


def _our_logits(info, ckpt, tokens):
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.model.forward import forward_logits
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import gather_canonical_from_model, load_canonical_into_model

    arch, tensors, _ = load_checkpoint(ckpt, dtype=torch.float32)
    model = build_gpt_model(arch)
    load_canonical_into_model(model, tensors, arch)
    with torch.no_grad():
        logits = forward_logits(model, tokens)
    return {"logits": logits, "canonical": gather_canonical_from_model(model, arch, all_ranks=True)}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imp")
    hf_dir, model = _llama_dir(tmp)
    assert main(["import-hf", "--hf-dir", str(hf_dir), "--out", str(tmp / "ckpt"), "--tp", "2"]) == 0
    tokens = _tokens(128)
    with torch.no_grad():
        ref = model(tokens).logits
    return tmp, tokens, ref


@pytest.mark.parametrize("tp", [1, 2])
def test_imported_llama_matches_transformers(imported, tp):
    tmp, tokens, ref = imported
    res = run_distributed(_our_logits, world=tp, tp=tp, args=(tmp / "ckpt", tokens))
    for r in res:
        err = (r["logits"] - ref).abs().max().item()
        assert err < TOL, f"TP={tp} rank {r['info'] if 'info' in r else ''}: max abs err {err:.2e}"


def test_tp2_checkpoint_exports_the_same_files_as_tp1(imported):
    from megapuzzle.checkpoints.canonical import load_checkpoint, save_checkpoint

    tmp, tokens, _ = imported
    arch, _, _ = load_checkpoint(tmp / "ckpt")
    for tp in (1, 2):  # the weights as a TP=tp model holds them, gathered and saved again
        gathered = run_distributed(_our_logits, world=tp, tp=tp, args=(tmp / "ckpt", tokens))[0]["canonical"]
        save_checkpoint(tmp / f"from_tp{tp}", arch, gathered, force=True)
        assert main(["export-hf", "--checkpoint", str(tmp / f"from_tp{tp}"), "--out", str(tmp / f"export_tp{tp}"),
                     "--dtype", "fp32"]) == 0
    cmp = filecmp.dircmp(tmp / "export_tp1", tmp / "export_tp2")
    assert sorted(cmp.left_list) == sorted(cmp.right_list) and "model.safetensors" in cmp.left_list
    match, mismatch, errors = filecmp.cmpfiles(tmp / "export_tp1", tmp / "export_tp2", cmp.common_files, shallow=False)
    assert not mismatch and not errors, mismatch


def test_heterogeneous_export_matches_our_model_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from megapuzzle.checkpoints.canonical import save_checkpoint
    from megapuzzle.model.weights import init_random_canonical

    layers = [LayerArch(A("gqa", 4), F("mlp", 256)), LayerArch(A("gqa", 2), F("mlp", 100)),
              LayerArch(A("linear"), F("linear")), LayerArch(A("no_op"), F("mlp", 512)),
              LayerArch(A("gqa", 1), F("no_op")), LayerArch(A("no_op"), F("linear"))]
    arch = Architecture(vocab_size=128, hidden_size=64, num_attention_heads=4, layers=layers,
                        max_position_embeddings=256, tie_word_embeddings=True)
    save_checkpoint(tmp_path / "ckpt", arch, init_random_canonical(arch, seed=3, std=0.05, norm_std=0.1))
    tokens = _tokens(128)
    ours = run_distributed(_our_logits, world=1, args=(tmp_path / "ckpt", tokens))[0]["logits"]
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
                 "--dtype", "fp32"]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and len(cfg["block_configs"]) == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = model(tokens).logits
    err = (theirs - ours).abs().max().item()
    assert err < TOL, f"max abs err {err:.2e}"


def test_export_refuses_a_non_empty_dir_without_force(imported, capsys):
    tmp, _, _ = imported
    out = tmp / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export-hf", "--checkpoint", str(tmp / "ckpt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is not empty; pass --force to overwrite it") and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["export-hf", "--checkpoint", str(tmp / "ckpt"), "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file()
