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


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_one_line_exit_2_and_outputs_untouched(imported, tmp_path, capsys, damage):
    """A damaged file we did not write (a half-finished download) or one damaged since (a
    checkpoint) is a one-line error naming the file, exit 2, and the existing output stays."""
    import shutil

    tmp, _, _ = imported
    hf = tmp_path / "hf"
    shutil.copytree(tmp / "hf", hf)
    shard = hf / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64 + data[64:])
    out = tmp_path / "ckpt"
    shutil.copytree(tmp / "ckpt", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["import-hf", "--hf-dir", str(hf), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(shard) in err and "download the model again" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # a checkpoint damaged after it was written: export-hf says which file and what to do
    ckpt = tmp_path / "ckpt_damaged"
    shutil.copytree(tmp / "ckpt", ckpt)
    weights = next(ckpt.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(weights) in err and "re-run the stage" in err, err
    assert not (tmp_path / "export").exists()


def test_corrupt_train_state_names_the_file_and_the_fix(tmp_path):
    from megapuzzle.errors import UserError
    from megapuzzle.train.state import load_train_state, save_train_state

    params = {"w": torch.nn.Parameter(torch.ones(4, 4))}
    save_train_state(tmp_path / "state", 2, params, None, {})
    f = next((tmp_path / "state").rglob("params.safetensors"))
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(UserError, match=r"params\.safetensors is not a readable safetensors file .*; delete ") as e:
        load_train_state(tmp_path / "state", params, None)
    assert "\n" not in str(e.value)


def test_conversion_is_lossless_unless_a_cast_is_asked(imported, tmp_path, capsys):
    """An fp32 Llama through import-hf then export-hf (= tools/convert_to_hf.py) with no --dtype
    keeps fp32: the logits are the source's to fp32 rounding; bf16 only when asked, and said."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmp, tokens, ref = imported
    assert main(["export-hf", "--checkpoint", str(tmp / "ckpt"), "--out", str(tmp_path / "auto")]) == 0
    assert "float32 weights: the checkpoint's own dtype" in capsys.readouterr().out
    assert {v.dtype for v in load_file(str(tmp_path / "auto" / "model.safetensors")).values()} == {torch.float32}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "auto", trust_remote_code=True)
    with torch.no_grad():
        assert (model(tokens).logits - ref).abs().max().item() < TOL
    assert main(["export-hf", "--checkpoint", str(tmp / "ckpt"), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert "bfloat16 weights: cast to bf16 as asked" in capsys.readouterr().out
    assert {v.dtype for v in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}


def test_export_for_vllm_refuses_what_vllm_cannot_load(tmp_path, capsys):
    from megapuzzle.checkpoints.canonical import save_checkpoint
    from megapuzzle.model.weights import init_random_canonical

    layers = [LayerArch(A("gqa", 2), F("mlp", 256)), LayerArch(A("linear"), F("mlp", 100)),
              LayerArch(A("no_op"), F("linear")), LayerArch(A("gqa", 1), F("no_op"))]
    arch = Architecture(vocab_size=128, hidden_size=64, num_attention_heads=4, layers=layers,
                        max_position_embeddings=256)
    save_checkpoint(tmp_path / "ckpt", arch, init_random_canonical(arch, seed=1))
    out = tmp_path / "export"
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--target", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not out.exists()
    assert ("vLLM cannot load this child: layer 1: intermediate_size 100 has no ffn_mult (not a multiple of 256); "
            "layer 1: linear attention; layer 2: linear FFN; search with `search_space: {preset: vllm}`") in err, err
    # without a target it exports (for transformers and Megatron) and warns about the same layers
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    assert capsys.readouterr().err.count("warning: not loadable by") == 3
