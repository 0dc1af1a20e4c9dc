"""`megapuzzle export-hf --quantize fp8`: an FP8 DeciLM checkpoint through NVIDIA ModelOpt.

    megapuzzle export-hf --checkpoint RUN/gkd/checkpoint --out RUN/export_fp8 --quantize fp8 \\
        [--calib-data PREFIX] [--calib-batches 8] [--calib-seq-len 256]

Streamed, layer by layer (checkpoints/fp8_layers.py), so a 70B or 405B child exports on one node:
the calibration tokens are embedded, then each decoder layer is read alone from the lazy
checkpoint reader (fp32), built from our DeciLM modeling file, calibrated by ModelOpt on the
cached hidden states (`mtq.quantize(layer, FP8_DEFAULT_CFG, loop)`: per-tensor E4M3 weights and
static per-tensor E4M3 input scales of every Linear, max calibration on `calib_batches` batches),
written as ModelOpt's unified HF exporter writes it (float8_e4m3fn `weight` + fp32
`weight_scale` / `input_scale` per Linear, bf16 norms) into the streaming shard writer, and its
outputs feed the next layer. Embeddings / final norm / lm_head ship in bf16; `hf_quant_config.json`
(`quant_algo: FP8`) and `quantization_config` in config.json come from ModelOpt's own writers --
the layout TensorRT-LLM's checkpoint loader and vLLM's `modelopt` quantization read. The
`block_configs` (every layer's variant) are kept unchanged. tests/test_fp8_stream.py proves the
result equal to ModelOpt's whole-model flow (fp32 model in transformers, `mtq.quantize`,
`export_hf_checkpoint`): FP8 weights bitwise, scales, keys and configs. Peak memory: see
`write_fp8_dir`. Resumable after a kill -9: every finished layer is checkpointed in a work dir
beside OUT (checkpoints/fp8_resume.py, which states its disk cost); a restart with the same inputs
skips the done layers and writes the same bytes, one with other inputs starts over.

Calibration data: `--calib-data PREFIX` (a Megatron indexed dataset in the checkpoint's
tokenizer, e.g. RUN/data/heldout), else the embedded corpus's held-out split (the Python
standard library's own source) tokenized with the checkpoint's tokenizer.

ModelOpt's calibration and export run on CPU (tested here: export, scales, dequantized logits);
only a GPU can run the FP8 GEMMs (a TensorRT-LLM engine build, vLLM serving).
"""

from __future__ import annotations

import logging
import json
import os
import tempfile
from pathlib import Path

import torch

from megapuzzle.errors import UserError
from megapuzzle.train import faults

log = logging.getLogger(__name__).info

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _require_modelopt():
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError as e:
        if (getattr(e, "name", None) or "").split(".")[0] == "modelopt":  # modelopt itself is missing
            raise UserError("export-hf --quantize fp8 needs nvidia-modelopt, which is not installed; "
                            "pip install -e '.[modelopt]' (or pip install nvidia-modelopt)") from None
        raise UserError(f"nvidia-modelopt is installed but importing it failed ({e}); "
                        f"pip install -e '.[modelopt]' installs what it needs") from None
    return mtq, export_hf_checkpoint


def calibration_tokens(checkpoint: str | Path, vocab_size: int, *, calib_data: str | None = None,
                       batches: int = 8, batch_size: int = 4, seq_len: int = 256) -> torch.Tensor:
    """int64 [batches, batch_size, seq_len] calibration windows (deterministic)."""
    need = batches * batch_size * seq_len
    if calib_data:
        from megapuzzle.data.datasets import PackedSequenceDataset

        ds = PackedSequenceDataset.from_prefix(calib_data)
        rows = [ds.batch(i, batch_size, seq_len, seed=0)[:, :-1] for i in range(batches)]
        out = torch.stack(rows)
    else:
        from megapuzzle.checkpoints.canonical import tokenizer_path
        from megapuzzle.data.corpus import iter_stdlib_texts
        from megapuzzle.data.tokenizer import load_tokenizer

        tok_dir = tokenizer_path(checkpoint)
        if tok_dir is None:
            raise UserError(f"{checkpoint} has no tokenizer/ to tokenize the default calibration text; "
                            "pass --calib-data PREFIX (an indexed dataset in the model's tokenizer)")
        tok = load_tokenizer(tok_dir)
        ids: list[int] = []
        for text in iter_stdlib_texts("heldout"):
            ids.extend(tok.encode(text))
            if len(ids) >= need:
                break
        if len(ids) < need:
            raise UserError(f"the embedded held-out corpus gave {len(ids)} tokens, calibration needs {need}; "
                            "lower --calib-batches / --calib-seq-len")
        out = torch.tensor(ids[:need], dtype=torch.long).view(batches, batch_size, seq_len)
    if int(out.max()) >= vocab_size:
        raise UserError(f"calibration token id {int(out.max())} >= the model's vocab size {vocab_size}; "
                        "--calib-data must be tokenized with this model's tokenizer")
    return out


def export_fp8(checkpoint: str | Path, out: str | Path, *, calib_data: str | None = None, calib_batches: int = 8,
               calib_batch_size: int = 4, calib_seq_len: int = 256, force: bool = False,
               max_shard_size: str = "2GB") -> dict:
    """Calibrate + quantize + export, streamed layer by layer; returns a summary (quantized Linear
    count, input amax range, calibration tokens, engine warnings)."""
    from megapuzzle.checkpoints.canonical import checkpoint_fingerprint, load_checkpoint, tokenizer_path
    from megapuzzle.checkpoints.fp8_resume import Progress, inputs_key, work_dir
    from megapuzzle.checkpoints.hf_io import _check_out_dir
    from megapuzzle.checkpoints.shards import parse_size
    from megapuzzle.fileio import replace_dir

    _require_modelopt()  # before any work: a missing package fails at once
    out = _check_out_dir(out, force)
    for name, v in (("calib_batches", calib_batches), ("calib_batch_size", calib_batch_size),
                    ("calib_seq_len", calib_seq_len)):
        if v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    max_shard_bytes = parse_size(max_shard_size)
    arch, tensors, _ = load_checkpoint(checkpoint, dtype=torch.float32)  # lazy: read a layer at a time
    tokens = calibration_tokens(checkpoint, arch.vocab_size, calib_data=calib_data, batches=calib_batches,
                                batch_size=calib_batch_size, seq_len=calib_seq_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a failed or killed export leaves its work dir: the next run with the same inputs resumes there
    key = inputs_key(checkpoint_fingerprint(checkpoint), tokens, max_shard_bytes, fp8_device())
    progress = Progress(work_dir(out), key)
    summary = write_fp8_dir(arch, tensors, tokens, progress.out, tokenizer_dir=tokenizer_path(checkpoint),
                            max_shard_bytes=max_shard_bytes, progress=progress)
    os.chmod(progress.out, 0o755)
    replace_dir(progress.out, out)
    progress.finish()
    summary.update({"calibration_tokens": int(tokens.numel()), "warnings": list(arch.engine_compatible())})
    return summary


def fp8_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_fp8_dir(arch, tensors, tokens: torch.Tensor, out: Path, *, tokenizer_dir: Path | None = None,
                  max_shard_bytes: int = 2 << 30, progress=None) -> dict:
    """Write the FP8 export of (arch, lazy fp32 `tensors`) calibrated on `tokens` [batches, batch_size,
    seq_len] into the empty directory `out`, one decoder layer at a time (checkpoints/fp8_layers.py).
    With `progress` (checkpoints/fp8_resume.Progress, whose `out` is `out`) each finished layer is
    checkpointed and the layers it has done are skipped (a restart goes on where a kill stopped it).

    Peak memory (host, or the GPU when there is one), never the whole model:
    * one decoder layer in fp32 while it is calibrated, then its bf16 and FP8 copies as it is
      exported: 3.4 GB fp32 at Llama-70B (856M params per layer), 12.8 GB at 405B (3.2B);
    * the calibration activations, batches x batch_size x seq_len x hidden x 4 bytes (each batch's
      output replaces its input): 268 MB at 70B, 537 MB at 405B with the defaults 8 x 4 x 256;
    * the output: one shard (`max_shard_bytes`) + the layer being added (its FP8 weights);
    * the embedding (and at the end the LM head) in fp32 while read: vocab x hidden x 4, 4.2 GB at
      70B, 8.4 GB at 405B -- the largest tensor, as in every streamed import / export;
    * with `progress`, on a GPU, one batch of hidden states on the host while it is checkpointed
      (batch_size x seq_len x hidden x 4: 537 MB at 405B with the recipe's 4 x 2048); the layer's
      exported tensors are written from where the shard writer already holds them.
    The whole-model flow it replaces held the model in fp32: 280 GB at 70B, 1.6 TB at 405B."""
    from megapuzzle.checkpoints.fp8_layers import LayerStream, export_layer_tensors, input_amaxes, modelopt
    from megapuzzle.checkpoints.shards import ShardWriter

    # Import ModelOpt before any layer exists: its plugin imports keep the tracebacks of the ones
    # that fail, and with them the frames (and a layer's weights) of whoever imported it first.
    modelopt()
    fam = arch.family_spec
    device = fp8_device()
    start = progress.done if progress is not None else 0
    log(f"[export-hf] fp8: {arch.num_layers} layers, one at a time on {device}, calibrated on "
        f"{tokens.numel()} tokens" + (f"; layers 0-{start - 1} done before" if start else ""))
    meta = {"format": "pt"}  # transformers needs "format"
    resumed = progress.writer_state() if progress is not None else None
    writer = ShardWriter.resumed(out, max_shard_bytes, resumed, meta) if resumed else \
        ShardWriter(out, max_shard_bytes, meta)
    embed = tensors[fam.embed_name]
    stream = LayerStream(arch, embed, tokens, device)
    if not any(fam.embed_name in names for _, names in (resumed or {"files": []})["files"]):
        writer.add(fam.embed_name, embed.to(torch.bfloat16))  # embeddings / norms / lm_head ship in bf16
    del embed
    amax: list[float] = progress.amax() if progress is not None else []
    if start:  # the done layers: their outputs, and their tensors no finished shard holds yet
        stream.hidden.clear()  # the embedded tokens: never two caches at once
        stream.hidden = progress.hidden(device)
        for j in progress.pending():
            for name, t in progress.layer_tensors(j):
                writer.add(name, t)
    for i in range(start, arch.num_layers):
        layer = stream.build_layer(i, tensors)
        stream.calibrate(layer, i)
        amax += input_amaxes(layer)
        exported = [(name, t.cpu()) for name, t in export_layer_tensors(layer, i)]
        for name, t in exported:
            writer.add(name, t)
        del layer
        if progress is not None:
            progress.save(i, exported, stream.hidden, amax, writer.state())
        del exported
        if faults.reached("export-fp8", i + 1, i):
            raise faults.Killed(f"export-fp8 stopped after layer {i}")
    _, after = fam.outer_shapes(arch)
    for name in after:  # final norm, lm_head (absent when tied)
        writer.add(name, tensors[name].to(torch.bfloat16))
    writer.close()
    if not amax:
        raise UserError("ModelOpt quantized no Linear layer of this model; is it a DeciLM/Llama checkpoint?")
    write_fp8_configs(arch, out, tokenizer_dir)
    check_fp8_dir(out, arch.num_layers)
    return {"quantized_linears": len(amax), "input_amax_min": min(amax), "input_amax_max": max(amax)}


def write_fp8_configs(arch, out: Path, tokenizer_dir: Path | None) -> None:
    """config.json (+ quantization_config), hf_quant_config.json, generation_config.json, our modeling
    files and the tokenizer: what ModelOpt's export_hf_checkpoint (through save_pretrained) wrote."""
    from transformers import GenerationConfig

    from megapuzzle.checkpoints.fp8_layers import decilm_config, quantized_skeleton
    from megapuzzle.checkpoints.hf_io import MODELING_DIR, MODELING_FILES, _generation_config
    from megapuzzle.fileio import atomic_write_bytes, atomic_write_json
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    from modelopt.torch.export.plugins import sanitize_hf_config_for_deployment
    from modelopt.torch.export.quant_utils import get_quant_config

    config = decilm_config(arch)
    skeleton = quantized_skeleton(config)
    hf_quant_config = get_quant_config(skeleton)
    gen = GenerationConfig.from_dict(_generation_config(arch, tokenizer_dir))
    if gen.top_k is not None or gen.top_p is not None:  # ModelOpt's save-time fix (strict validation)
        gen.do_sample = True
    with tempfile.TemporaryDirectory(dir=out) as tmp:  # transformers' own serialization, as save_pretrained
        config.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        config_data = json.loads((Path(tmp) / "config.json").read_text())
        gen_data = json.loads((Path(tmp) / "generation_config.json").read_text())
    sanitize_hf_config_for_deployment(config_data, skeleton)
    config_data["quantization_config"] = convert_hf_quant_config_format(hf_quant_config)
    atomic_write_json(out / "config.json", config_data)
    atomic_write_json(out / "hf_quant_config.json", hf_quant_config)
    atomic_write_json(out / "generation_config.json", gen_data)
    for name in MODELING_FILES:
        atomic_write_bytes(out / name, (MODELING_DIR / name).read_bytes())
    for name in TOKENIZER_FILES:
        if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
            atomic_write_bytes(out / name, (Path(tokenizer_dir) / name).read_bytes())


def check_fp8_dir(hf_dir: str | Path, num_layers: int) -> dict[str, int]:
    """Validate an FP8 export: quant config present, every decoder projection stored as
    float8_e4m3fn with positive finite fp32 weight/input scales. Returns {dtype: count}."""
    from megapuzzle.fileio import open_safetensors

    d = Path(hf_dir)
    qcfg = json.loads((d / "hf_quant_config.json").read_text())
    if qcfg.get("quantization", {}).get("quant_algo") != "FP8":
        raise UserError(f"{d}/hf_quant_config.json does not say quant_algo FP8: {qcfg}")
    config = json.loads((d / "config.json").read_text())
    if len(config.get("block_configs", [])) != num_layers:
        raise UserError(f"{d}/config.json lost its block_configs ({len(config.get('block_configs', []))} "
                        f"for {num_layers} layers)")
    counts: dict[str, int] = {}
    for f in sorted(d.glob("*.safetensors")):
        with open_safetensors(f, fix=f"export {d} again") as sf:
            names = set(sf.keys())
            for n in names:
                t = sf.get_tensor(n)
                counts[str(t.dtype)] = counts.get(str(t.dtype), 0) + 1
                if n.endswith("_proj.weight") and ".layers." in n:
                    if t.dtype != torch.float8_e4m3fn:
                        raise UserError(f"{f.name}: {n} is {t.dtype}, expected float8_e4m3fn")
                    for s in ("weight_scale", "input_scale"):
                        sc = sf.get_tensor(n[: -len("weight")] + s)
                        if not (torch.isfinite(sc).all() and (sc > 0).all()):
                            raise UserError(f"{f.name}: {n[:-len('weight')] + s} is not a positive finite scale")
    if not counts.get("torch.float8_e4m3fn"):
        raise UserError(f"{d} holds no float8_e4m3fn tensor")
    return counts


def dequantized_state_dict(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """The export's weights back in fp32 (FP8 weight x weight_scale); scales dropped. What an
    engine's FP8 GEMM multiplies, for checking the export against the unquantized model."""
    from megapuzzle.fileio import open_safetensors

    raw: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with open_safetensors(f, fix=f"export {hf_dir} again") as sf:
            raw.update({n: sf.get_tensor(n) for n in sf.keys()})
    out = {}
    for n, t in raw.items():
        if n.endswith(("weight_scale", "input_scale")):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[n] = t.float() * raw[n[: -len("weight")] + "weight_scale"].float()
        else:
            out[n] = t.float()
    return out
