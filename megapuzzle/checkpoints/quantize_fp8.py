"""`megapuzzle export-hf --quantize fp8`: an FP8 DeciLM checkpoint through NVIDIA ModelOpt.

    megapuzzle export-hf --checkpoint RUN/gkd/checkpoint --out RUN/export_fp8 --quantize fp8 \\
        [--calib-data PREFIX] [--calib-batches 8] [--calib-seq-len 256]

Steps: the checkpoint is written as an fp32 DeciLM directory (our modeling code), loaded with
transformers, calibrated by ModelOpt (`mtq.quantize(model, FP8_DEFAULT_CFG, loop)`: per-tensor
E4M3 weights and static per-tensor E4M3 input scales of every decoder Linear, max calibration
on `calib_batches` batches), and exported with ModelOpt's unified HF exporter
(`export_hf_checkpoint`): float8_e4m3fn `weight` + fp32 `weight_scale` / `input_scale` per
Linear, bf16 embeddings / norms / lm_head, `hf_quant_config.json` (`quant_algo: FP8`) and
`quantization_config` in config.json -- the layout TensorRT-LLM's checkpoint loader and vLLM's
`modelopt` quantization read. The `block_configs` (every layer's variant) are kept unchanged.

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
import shutil
import tempfile
from pathlib import Path

import torch

from megapuzzle.errors import UserError

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
    """Calibrate + quantize + export; returns a summary (quantized Linear count, amax ranges)."""
    from transformers import AutoModelForCausalLM

    from megapuzzle.checkpoints.canonical import load_checkpoint, tokenizer_path
    from megapuzzle.checkpoints.hf_io import _check_out_dir, write_decilm_dir
    from megapuzzle.checkpoints.shards import parse_size
    from megapuzzle.fileio import replace_dir

    mtq, export_hf_checkpoint = _require_modelopt()  # before any work: a missing package fails at once
    out = _check_out_dir(out, force)
    for name, v in (("calib_batches", calib_batches), ("calib_batch_size", calib_batch_size),
                    ("calib_seq_len", calib_seq_len)):
        if v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    arch, tensors, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    tokens = calibration_tokens(checkpoint, arch.vocab_size, calib_data=calib_data, batches=calib_batches,
                                batch_size=calib_batch_size, seq_len=calib_seq_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.fp8-"))
    try:
        src = work / "fp32"
        warnings = write_decilm_dir(arch, tensors, src, tokenizer_dir=tokenizer_path(checkpoint),
                                    max_shard_bytes=parse_size(max_shard_size))
        del tensors
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=torch.float32)
        model.to(device).eval()

        def forward_loop(m):
            with torch.no_grad():
                for i, batch in enumerate(tokens):
                    m(batch.to(device), use_cache=False)
                    log(f"[export-hf] fp8 calibration batch {i + 1}/{len(tokens)}")

        mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
        summary = _quantizer_summary(model)
        model.to(torch.bfloat16)  # the non-quantized tensors (embeddings, norms, lm_head) ship in bf16
        staged = work / "fp8"
        export_hf_checkpoint(model, export_dir=staged)
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (staged / name).exists():
                shutil.copy2(src / name, staged / name)
        check_fp8_dir(staged, len(arch.layers))
        os.chmod(staged, 0o755)
        replace_dir(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary.update({"calibration_tokens": int(tokens.numel()), "warnings": list(warnings or [])})
    return summary


def _quantizer_summary(model) -> dict:
    linears, amax = 0, []
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        iq = getattr(mod, "input_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False) and iq is not None and iq.is_enabled:
            linears += 1
            amax.append(float(iq.amax.max()))
    if not linears:
        raise UserError("ModelOpt quantized no Linear layer of this model; is it a DeciLM/Llama checkpoint?")
    return {"quantized_linears": linears, "input_amax_min": min(amax), "input_amax_max": max(amax)}


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
