"""`megapuzzle export-hf --quantize fp8` (nvidia-modelopt) on CPU: the export has FP8 E4M3
weights with positive scales for every decoder projection, keeps the block_configs, every
dequantized weight is the original within E4M3 rounding, the dequantized model's logits stay
close to the unquantized model's, and bad input fails in one line leaving the output alone."""

from __future__ import annotations

import json

import pytest
import torch

from megapuzzle.arch import AttentionVariant as A, FFNVariant as F, LayerArch
from megapuzzle.cli import main

E4M3_REL = 2.0 ** -4       # round-to-nearest with 3 mantissa bits: |error| <= 2^-4 |x| for normal values
E4M3_SUBNORMAL = 2.0 ** -9  # smallest E4M3 subnormal (times the scale): the absolute floor


@pytest.fixture(scope="module")
def exported(debug_parent, tmp_path_factory):
    """The trained debug parent exported in fp32 and in FP8 (default calibration text)."""
    tmp = tmp_path_factory.mktemp("fp8")
    ckpt = debug_parent / "checkpoint"
    assert main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp / "fp32"), "--dtype", "fp32"]) == 0
    assert main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp / "fp8"), "--quantize", "fp8",
                 "--calib-batches", "2", "--calib-seq-len", "64"]) == 0
    return tmp


def _weights(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_fp8_export_layout(exported):
    from megapuzzle.checkpoints.quantize_fp8 import check_fp8_dir

    fp8, fp32 = exported / "fp8", exported / "fp32"
    q = json.loads((fp8 / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "FP8"
    c8, c32 = (json.loads((d / "config.json").read_text()) for d in (fp8, fp32))
    assert c8["block_configs"] == c32["block_configs"] and c8["architectures"] == ["DeciLMForCausalLM"]
    assert c8["quantization_config"]["quant_method"] == "modelopt"
    counts = check_fp8_dir(fp8, len(c32["block_configs"]))
    w = _weights(fp8)
    projections = [n for n in w if ".layers." in n and n.endswith("_proj.weight")]
    # every q/k/v/o/gate/up/down of every layer is FP8: 7 per full layer
    assert len(projections) == 7 * len(c32["block_configs"]) == counts["torch.float8_e4m3fn"]
    assert w["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert all((w[n[:-len("weight")] + "input_scale"] > 0).all() for n in projections)
    for name in ("tokenizer.json", "modeling_decilm.py", "configuration_decilm.py"):
        assert (fp8 / name).is_file()


def test_dequantized_weights_are_within_e4m3_rounding(exported):
    from megapuzzle.checkpoints.quantize_fp8 import dequantized_state_dict

    ref, raw = _weights(exported / "fp32"), _weights(exported / "fp8")
    dq = dequantized_state_dict(exported / "fp8")
    assert set(dq) == set(ref)
    worst = 0.0
    for n, t in raw.items():
        if t.dtype != torch.float8_e4m3fn:
            continue
        scale = raw[n[:-len("weight")] + "weight_scale"].float()
        # the per-tensor scale maps the tensor's amax onto E4M3's 448
        assert torch.allclose(scale * 448.0, ref[n].abs().max(), rtol=1e-2)
        err = (dq[n] - ref[n]).abs()
        bound = E4M3_REL * ref[n].abs() + E4M3_SUBNORMAL * scale
        assert (err <= bound * 1.001).all(), f"{n}: error above E4M3 rounding"
        worst = max(worst, (err / ref[n].abs().clamp_min(1e-12))[ref[n].abs() > 16 * E4M3_SUBNORMAL * scale].max().item())
    assert 0.0 < worst <= E4M3_REL * 1.001  # quantized (not a copy) and within the bound


def test_dequantized_model_logits_stay_close(exported, debug_parent):
    from transformers import AutoModelForCausalLM

    from megapuzzle.checkpoints.quantize_fp8 import calibration_tokens, dequantized_state_dict

    model = AutoModelForCausalLM.from_pretrained(exported / "fp32", trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    arch_vocab = model.config.vocab_size
    tokens = calibration_tokens(debug_parent / "checkpoint", arch_vocab, batches=1, batch_size=2, seq_len=64)[0]
    with torch.no_grad():
        ref = model(tokens).logits.log_softmax(-1)
        model.load_state_dict(dequantized_state_dict(exported / "fp8"), strict=True)
        q = model(tokens).logits.log_softmax(-1)
    kl = (ref.exp() * (ref - q)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert kl < 0.01 and agree > 0.9, f"KL {kl:.4f}, top-1 agreement {agree:.3f}"


def test_heterogeneous_child_quantizes_every_linear(debug_parent, tmp_path):
    """A child with every variant kind (linear / no-op subblocks, odd FFN width) keeps its
    block_configs and quantizes every Linear that has weights (calibrated on an indexed dataset)."""
    from megapuzzle.arch import Architecture
    from megapuzzle.checkpoints.canonical import load_arch, save_checkpoint
    from megapuzzle.checkpoints.quantize_fp8 import check_fp8_dir
    from megapuzzle.model.weights import init_random_canonical

    p = load_arch(debug_parent / "checkpoint")
    h, kv = p.hidden_size, p.layers[0].attention.num_kv_heads
    layers = [LayerArch(A("gqa", kv), F("mlp", 96)), LayerArch(A("linear"), F("linear")),
              LayerArch(A("no_op"), F("mlp", 2 * h)), LayerArch(A("gqa", 1), F("no_op"))]
    arch = Architecture(vocab_size=p.vocab_size, hidden_size=h, num_attention_heads=p.num_attention_heads,
                        layers=layers, max_position_embeddings=256)
    save_checkpoint(tmp_path / "ckpt", arch, init_random_canonical(arch, seed=5, std=0.05, norm_std=0.1))
    out = tmp_path / "fp8"
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--quantize", "fp8",
                 "--calib-data", str(debug_parent / "data" / "heldout"), "--calib-batches", "1",
                 "--calib-seq-len", "32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert [b["attention"].get("replace_with_linear", False) for b in cfg["block_configs"]] == [False, True, False, False]
    check_fp8_dir(out, 4)
    w = _weights(out)
    fp8 = sorted(n for n, t in w.items() if t.dtype == torch.float8_e4m3fn)
    # gqa layer 0: q k v o gate up down (7); linear attn + linear ffn (2); layer 2 mlp (3); layer 3 q k v o (4)
    assert len(fp8) == 16, fp8


def test_bad_input_is_one_line_and_leaves_output(debug_parent, tmp_path, capsys, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    ckpt = str(debug_parent / "checkpoint")
    assert main(["export-hf", "--checkpoint", ckpt, "--out", str(out), "--quantize", "fp8"]) == 2
    assert capsys.readouterr().err.strip().endswith("is not empty; pass --force to overwrite")
    assert main(["export-hf", "--checkpoint", ckpt, "--out", str(out), "--quantize", "fp8", "--force",
                 "--calib-batches", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--calib-batches must be >= 1" in err and "\n" not in err
    monkeypatch.setitem(__import__("sys").modules, "modelopt", None)  # as if not installed
    monkeypatch.setitem(__import__("sys").modules, "modelopt.torch.quantization", None)
    assert main(["export-hf", "--checkpoint", ckpt, "--out", str(out), "--quantize", "fp8", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs nvidia-modelopt" in err and "pip install" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
