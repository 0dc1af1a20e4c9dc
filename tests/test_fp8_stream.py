"""The streamed FP8 export (one decoder layer at a time) equals ModelOpt's whole-model flow.

Reference: what `export-hf --quantize fp8` did before it streamed, kept here only: the whole
checkpoint as an fp32 DeciLM directory, loaded with transformers, `mtq.quantize(model,
FP8_DEFAULT_CFG, loop)` over every calibration batch, cast to bf16, `export_hf_checkpoint`.

Tolerances, derived:
* FP8 weights and weight scales depend on the weights only: the same fp32 (then bf16) numbers
  go through the same formula, so they must be bitwise equal.
* Input scales are bf16(amax_x) / 448 (ModelOpt rounds the amax buffer to bf16 with the model).
  The streamed layers run the same modules on the same shapes in fp32, but a different process
  or kernel choice could reorder a reduction and move amax_x by a few fp32 ulps; after the bf16
  rounding that is at most one bf16 ulp of amax_x (relative 2^-7 at the bottom of a binade,
  bf16 has 8 significant bits), plus the fp32 division's half ulp. That is the bound asserted.
* Hidden states after the last layer: each layer's fp32 output differs from the whole model's
  only by reduction order, bounded well under 2^-16 relative to max |h| for these widths
  (dot products of <= 128 terms, u = 2^-24 each, a few layers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megapuzzle.arch import Architecture, AttentionVariant as A, FFNVariant as F, LayerArch

BF16_ULP_REL = 2.0 ** -7   # spacing / value at the bottom of a bf16 binade
FP32_DIV_REL = 2.0 ** -24  # half an fp32 ulp: the division's rounding

HETERO = [LayerArch(A("gqa", 2), F("mlp", 96)), LayerArch(A("linear"), F("linear")),
          LayerArch(A("no_op"), F("mlp", 128)), LayerArch(A("no_op"), F("no_op")),
          LayerArch(A("swa", 4, window=5), F("mlp", 64)), LayerArch(A("gqa", 1), F("no_op"))]
UNIFORM = [LayerArch(A("gqa", 2), F("mlp", 128))] * 3


def _checkpoint(tmp: Path, layers, tied: bool) -> Path:
    from megapuzzle.checkpoints.canonical import save_checkpoint
    from megapuzzle.model.weights import init_random_canonical

    arch = Architecture(vocab_size=300, hidden_size=64, num_attention_heads=4, layers=layers,
                        max_position_embeddings=256, tie_word_embeddings=tied)
    return save_checkpoint(tmp / "ckpt", arch, init_random_canonical(arch, seed=5, std=0.05, norm_std=0.1))


def whole_model_export(ckpt: Path, tokens: torch.Tensor, out: Path) -> torch.Tensor:
    """ModelOpt's whole-model FP8 flow; returns the model's last hidden state before the final norm."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.checkpoints.hf_io import write_decilm_dir

    arch, tensors, _ = load_checkpoint(ckpt, dtype=torch.float32)
    write_decilm_dir(arch, tensors, out / "fp32")
    model = AutoModelForCausalLM.from_pretrained(out / "fp32", trust_remote_code=True, dtype=torch.float32).eval()
    last = []  # the final norm's input: the last decoder layer's output
    model.model.norm.register_forward_pre_hook(lambda mod, args: last.append(args[0].clone()))

    def forward_loop(m):
        with torch.no_grad():
            for batch in tokens:
                m(batch, use_cache=False)

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    model.to(torch.bfloat16)
    export_hf_checkpoint(model, export_dir=out / "fp8")
    return torch.stack(last[: len(tokens)])  # later calls: the exporter's own probe forward


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("layers,tied", [(HETERO, False), (UNIFORM, True)], ids=["heterogeneous", "tied"])
def test_streamed_export_equals_whole_model_modelopt(tmp_path, layers, tied, monkeypatch):
    import megapuzzle.checkpoints.fp8_layers as fl
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.checkpoints.quantize_fp8 import write_fp8_dir

    ckpt = _checkpoint(tmp_path, layers, tied)
    tokens = torch.randint(0, 300, (3, 2, 24), generator=torch.Generator().manual_seed(0))
    ref_last = whole_model_export(ckpt, tokens, tmp_path / "ref")
    ref = tmp_path / "ref" / "fp8"

    streams = []

    class Recorded(fl.LayerStream):  # keeps the stream, to compare its final hidden states
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            streams.append(self)

    monkeypatch.setattr(fl, "LayerStream", Recorded)
    arch, tensors, _ = load_checkpoint(ckpt, dtype=torch.float32)
    new = tmp_path / "new"
    new.mkdir()
    summary = write_fp8_dir(arch, tensors, tokens, new)
    assert summary["quantized_linears"] == sum(
        {"gqa": 4, "swa": 4, "linear": 1, "no_op": 0, "mlp": 3}[v.kind] for layer in layers
        for v in (layer.attention, layer.ffn))

    # the same files: names, configs byte-for-byte as json, the same tensor names / dtypes / shapes
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in ref.iterdir())
    for name in ("config.json", "hf_quant_config.json", "generation_config.json"):
        assert json.loads((new / name).read_text()) == json.loads((ref / name).read_text()), name
    a, b = _tensors(new), _tensors(ref)
    assert set(a) == set(b)
    assert ("lm_head.weight" in a) is (not tied)
    n_fp8 = n_input = 0
    for n in sorted(b):
        x, y = a[n], b[n]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), n
        if n.endswith("input_scale"):
            n_input += 1
            bound = (BF16_ULP_REL + FP32_DIV_REL) * float(y)
            assert abs(float(x) - float(y)) <= bound, f"{n}: {float(x)} vs {float(y)}"
        elif x.dtype == torch.float8_e4m3fn:
            n_fp8 += 1
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{n}: FP8 weights differ"
        else:  # weight scales (fp32), embeddings / norms / lm_head (bf16): bitwise
            assert torch.equal(x, y), n
    assert n_fp8 == n_input == summary["quantized_linears"]

    # the streamed hidden states are the whole model's (reduction order at most)
    (stream,) = streams
    last = torch.stack(stream.hidden)
    tol = 2.0 ** -16 * float(ref_last.abs().max())
    assert (last - ref_last).abs().max() <= tol


def test_streamed_export_shards_and_loads(tmp_path, monkeypatch):
    """--max-shard-size splits the streamed export into layer-aligned shards with an index; the
    shards hold exactly the single-file export's tensors and transformers loads the directory.
    At most one decoder layer is alive at any time (the scale rule: never the whole model)."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    import megapuzzle.checkpoints.fp8_layers as fl
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.checkpoints.quantize_fp8 import dequantized_state_dict, write_fp8_dir

    built, alive_at_build = [], []

    class Watched(fl.LayerStream):
        def build_layer(self, i, tensors):
            gc.collect()
            alive_at_build.append(sum(r() is not None for r in built))
            layer = super().build_layer(i, tensors)
            built.append(weakref.ref(layer))
            return layer

    monkeypatch.setattr(fl, "LayerStream", Watched)
    ckpt = _checkpoint(tmp_path, HETERO, False)
    arch, tensors, _ = load_checkpoint(ckpt, dtype=torch.float32)
    tokens = torch.randint(0, 300, (1, 2, 16), generator=torch.Generator().manual_seed(1))
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    write_fp8_dir(arch, tensors, tokens, one)
    assert alive_at_build == [0] * len(HETERO)  # every earlier layer is gone when the next is built
    write_fp8_dir(arch, tensors, tokens, many, max_shard_bytes=40_000)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (many / "model.safetensors").exists()
    for name, f in index["weight_map"].items():  # a layer never straddles two shards
        if name.startswith("model.layers."):
            layer = ".".join(name.split(".")[:3])
            assert {v for k, v in index["weight_map"].items() if k.startswith(layer + ".")} == {f}
    a, b = _tensors(one), _tensors(many)
    assert set(a) == set(b) and all(torch.equal(a[n].float(), b[n].float()) for n in a)
    model = AutoModelForCausalLM.from_pretrained(one, trust_remote_code=True, dtype=torch.float32)
    model.load_state_dict(dequantized_state_dict(many), strict=True)
    shutil.rmtree(many)
