"""HuggingFace directories in and out: Llama / DeciLM read, DeciLM (`nemotron-nas`) and Llama write.

Tensors travel under the canonical names, which are HF's own Llama / DeciLM names:
    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied),
    model.layers.{i}.input_layernorm.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
    model.layers.{i}.self_attn.linear_attn.weight, model.layers.{i}.post_attention_layernorm.weight,
    model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.mlp.linear_mlp.weight
so reading is a load plus checks and writing is a dump plus config. Weights are safetensors only:
pickled `*.bin` checkpoints are refused, never unpickled (torch.load runs arbitrary code).

A written directory appears whole or not at all: it is built in a temp sibling and renamed
into place. DeciLM exports carry our own `configuration_decilm.py` / `modeling_decilm.py`
(hf_modeling/), so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works
offline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from megapuzzle.arch import Architecture
from megapuzzle.errors import UserError
from megapuzzle.families import DEFAULT as DEFAULT_FAMILY
from megapuzzle.families import get_family
from megapuzzle.checkpoints.canonical import expected_canonical_shapes, validate_tensors  # noqa: F401 (re-exported)
from megapuzzle.checkpoints.shards import SafetensorsReader, ShardWriter, safetensors_files
from megapuzzle.fileio import atomic_write_bytes, atomic_write_json, replace_dir

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_decilm.py", "modeling_decilm.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Model types whose checkpoints are exactly the Llama computation: the family's (megapuzzle.families).
LLAMA_LIKE_TYPES = get_family(DEFAULT_FAMILY).hf_model_types
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
# Tensors some checkpoints carry that are not weights (recomputed at load by every runtime).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- names and shapes

def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise UserError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")


def _cast(tensors, dtype: torch.dtype | None):
    if isinstance(tensors, SafetensorsReader):  # stays lazy: each tensor is cast as it is read
        return tensors if dtype is None else tensors.with_dtype(dtype)
    if dtype is None:
        return dict(tensors)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


# ----------------------------------------------------------------------------- read

def _load_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from megapuzzle.fileio import read_safetensors

    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index} is malformed ({e}); re-save the model with save_pretrained") from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise UserError(f"{hf_dir} has only pickled weights ({pickles[0]}), which megapuzzle never loads; "
                            f"convert them to safetensors first (save_pretrained(..., safe_serialization=True))")
        raise UserError(f"{hf_dir} has no *.safetensors weights; point at a HuggingFace model directory")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise UserError(f"{hf_dir} lacks shard {name} named in {INDEX_FILE}; the download is incomplete")
        tensors.update(read_safetensors(hf_dir / name, fix="the download is incomplete or damaged: download "
                                                            "the model again (or re-save it with save_pretrained)"))
    return tensors


def _check_llama_like(cfg: dict, hf_dir: Path) -> None:
    problem = get_family(DEFAULT_FAMILY).hf_config_problem(cfg)
    if problem:
        raise UserError(f"{hf_dir}/config.json {problem}")
    for i, block in enumerate(cfg.get("block_configs") or []):
        for part in ("attention", "ffn"):
            for key in ("num_sink_tokens", "unshifted_sink", "sparsify"):  # window_length: kind swa
                if isinstance(block, dict) and isinstance(block.get(part), dict) and block[part].get(key):
                    raise UserError(f"{hf_dir}/config.json block_configs[{i}].{part}.{key} is set; "
                                    f"sink and sparsified blocks are not supported")


def _hf_arch(hf_dir: Path) -> Architecture:
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{hf_dir} has no config.json; point at a HuggingFace model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path} is not valid json ({e}); re-download or re-save the model") from None
    _check_llama_like(cfg, hf_dir)
    return Architecture.from_hf_config(cfg)


def open_hf_llama(hf_dir: str | os.PathLike, *, dtype=None) -> tuple[Architecture, SafetensorsReader]:
    """Like read_hf_llama, but the tensors are a lazy reader over the HF shards (headers checked
    here, each tensor read and cast when accessed): what a streaming import needs."""
    hf_dir = Path(hf_dir)
    arch = _hf_arch(hf_dir)
    if not safetensors_files(hf_dir):
        _load_safetensors(hf_dir)  # raises its one-line error (pickles only / no weights)
    tied = arch.tie_word_embeddings

    def keep(name: str) -> bool:
        return not name.endswith(_IGNORED_SUFFIXES) and not (tied and name == "lm_head.weight")

    tensors = SafetensorsReader(hf_dir, dtype=_resolve_dtype(dtype), keep=keep,
                                order=list(expected_canonical_shapes(arch)),
                                fix="the download is incomplete or damaged: download the model again "
                                    "(or re-save it with save_pretrained)")
    validate_tensors(arch, tensors, source=str(hf_dir))
    return arch, tensors


def read_hf_llama(hf_dir: str | os.PathLike, *, dtype=None) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """Read a HF Llama or DeciLM directory: (Architecture, canonical tensors).

    dtype: None keeps the stored dtype (bf16 stays bf16); a torch dtype or "bf16"/"fp16"/"fp32" casts.
    With tied embeddings the dict holds no `lm_head.weight` (a stored copy is dropped)."""
    hf_dir = Path(hf_dir)
    arch = _hf_arch(hf_dir)
    tensors = {k: v for k, v in _load_safetensors(hf_dir).items() if not k.endswith(_IGNORED_SUFFIXES)}
    if arch.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    validate_tensors(arch, tensors, source=str(hf_dir))
    return arch, _cast(tensors, _resolve_dtype(dtype))


# ----------------------------------------------------------------------------- write

def _dtype_name(tensors) -> str:
    if isinstance(tensors, SafetensorsReader):
        floats = {tensors.out_dtype(k) for k in tensors if tensors.out_dtype(k).is_floating_point}
    else:
        floats = {v.dtype for v in tensors.values() if v.is_floating_point()}
    if len(floats) != 1:
        raise UserError(f"tensors mix dtypes {sorted(map(str, floats))}; pass dtype= to write one dtype")
    return str(next(iter(floats))).removeprefix("torch.")


def _write_weights(tmp: Path, tensors, order: list[str], max_shard_bytes: int) -> None:
    """Shards written as they fill (layer-aligned), one tensor read at a time from a lazy reader."""
    if max_shard_bytes < 1:
        raise UserError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    writer = ShardWriter(tmp, max_shard_bytes, metadata={"format": "pt"})  # transformers needs "format"
    for name in order:
        writer.add(name, tensors[name])
    writer.close()


def _copy_file(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, src.read_bytes())


def _generation_config(arch: Architecture, tokenizer_dir: Path | None) -> dict:
    if tokenizer_dir is not None and (tokenizer_dir / "generation_config.json").is_file():
        try:  # the source model's own sampling defaults and eos list (Llama-3 instruct has several)
            return json.loads((tokenizer_dir / "generation_config.json").read_text())
        except json.JSONDecodeError:
            pass
    out = {"_from_model_config": True}
    if arch.bos_token_id is not None:
        out["bos_token_id"] = arch.bos_token_id
    if arch.eos_token_id is not None:
        out["eos_token_id"] = arch.eos_token_id
    return out


def _check_out_dir(out_dir, force: bool) -> Path:
    """Refuse before any work is done, so a refused call leaves everything untouched."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; pick another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --force to overwrite")
    return out


def _write_hf_dir(arch: Architecture, tensors: dict[str, torch.Tensor], out_dir, config: dict, *,
                  tokenizer_dir, force: bool, max_shard_bytes: int, with_modeling: bool) -> Path:
    out = _check_out_dir(out_dir, force)
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok is not None and not tok.is_dir():
        raise UserError(f"tokenizer directory {tok} does not exist; pass the directory holding tokenizer.json")
    order = list(expected_canonical_shapes(arch))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "generation_config.json", _generation_config(arch, tok))
        _write_weights(tmp, tensors, order, max_shard_bytes)
        if with_modeling:
            for name in MODELING_FILES:
                _copy_file(MODELING_DIR / name, tmp / name)
        if tok is not None:
            for name in TOKENIZER_FILES:
                if (tok / name).is_file():
                    _copy_file(tok / name, tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the export is meant to be shared
        replace_dir(tmp, out)  # forced: swap, then delete the old one, so a crash leaves old or new
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_decilm_dir(arch: Architecture, tensors: dict[str, torch.Tensor], out_dir: str | os.PathLike, *,
                     tokenizer_dir: str | os.PathLike | None = None, force: bool = False,
                     max_shard_bytes: int = 2 * 1024**3, dtype=None) -> list[str]:
    """Write a HF DeciLM (`nemotron-nas`) directory that transformers (trust_remote_code), vLLM and
    TensorRT-LLM read. Returns `arch.engine_compatible()` problems (empty: the engines can load it)."""
    _check_out_dir(out_dir, force)
    tensors = _cast(tensors, _resolve_dtype(dtype))
    validate_tensors(arch, tensors, source="tensors to export")
    config = arch.to_hf_config(torch_dtype=_dtype_name(tensors))
    config["use_cache"] = True
    _write_hf_dir(arch, tensors, out_dir, config, tokenizer_dir=tokenizer_dir, force=force,
                  max_shard_bytes=max_shard_bytes, with_modeling=True)
    return arch.engine_compatible()


def llama_config(arch: Architecture, torch_dtype: str = "bfloat16") -> dict:
    """A plain LlamaForCausalLM config.json for a homogeneous architecture."""
    first = arch.layers[0]
    for i, layer in enumerate(arch.layers):
        if layer != first or not first.attention.parent_like or not first.ffn.parent_like:
            raise UserError(f"layer {i} is {layer.name} but a Llama config needs every layer equal and "
                            f"GQA + MLP; export heterogeneous models with write_decilm_dir")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": first.ffn.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": first.attention.num_kv_heads,
        "head_dim": arch.kv_channels,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": arch.rope_scaling,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }


def write_llama_dir(arch: Architecture, tensors: dict[str, torch.Tensor], out_dir: str | os.PathLike, *,
                    tokenizer_dir: str | os.PathLike | None = None, force: bool = False,
                    max_shard_bytes: int = 2 * 1024**3, dtype=None) -> Path:
    """Write a plain HF Llama directory (no remote code) for a homogeneous architecture, e.g. the parent."""
    _check_out_dir(out_dir, force)
    tensors = _cast(tensors, _resolve_dtype(dtype))
    validate_tensors(arch, tensors, source="tensors to export")
    config = llama_config(arch, torch_dtype=_dtype_name(tensors))
    return _write_hf_dir(arch, tensors, out_dir, config, tokenizer_dir=tokenizer_dir, force=force,
                         max_shard_bytes=max_shard_bytes, with_modeling=False)
