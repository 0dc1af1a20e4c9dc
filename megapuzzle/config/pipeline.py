"""The `parent:`, `data:` and `export:` sections (megapuzzle.pipeline's own stages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from megapuzzle.config.rules import Flag, Integer, OneOf, Section
from megapuzzle.errors import UserError

def _one_source(cfg) -> None:
    given = [k for k in ("train", "hf_dir", "checkpoint") if getattr(cfg, k)]
    if len(given) != 1:
        raise UserError(f"parent: give exactly one of train / hf_dir / checkpoint (got {given or 'none'})")


@dataclass(frozen=True)
class ParentSection(Section):
    """The `parent:` section: exactly one source."""

    SECTION = "parent"
    CHECKS = (_one_source,)

    train: str | None = None
    """Train the embedded parent with this train-parent flavour (default, debug)."""
    steps: Annotated[int, Integer()] | None = None
    """Override the flavour's optimizer steps."""
    hf_dir: str | None = None
    """Import this HuggingFace Llama directory."""
    checkpoint: str | None = None
    """Copy this megapuzzle checkpoint."""
    threads: Annotated[int, Integer()] | None = None
    """torch CPU threads for train-parent."""
    corpus: str | None = None
    """With train: the corpus, "stdlib" (default) or a directory of text files (train-parent --corpus)."""


@dataclass(frozen=True)
class DataSection(Section):
    """The `data:` section (ignored when the parent is trained here: its own data is used)."""

    SECTION = "data"

    train: str | None = None
    """Megatron indexed-dataset prefix of training tokens (parent's tokenizer)."""
    heldout: str | None = None
    """Indexed-dataset prefix of held-out tokens."""
    stdlib: Annotated[bool, Flag()] = False
    """Tokenize the embedded stdlib corpus with the parent's tokenizer instead."""


@dataclass(frozen=True)
class ExportSection(Section):
    """The `export:` section: the HF DeciLM directory (RUN/export) and, optionally, an FP8 one."""

    SECTION = "export"

    dtype: Annotated[str, OneOf(("auto", "bf16", "fp16", "fp32"))] = "auto"
    """Weight dtype of RUN/export: auto (the checkpoint's own: lossless), bf16, fp16 or fp32."""
    target: Annotated[str, OneOf(("vllm", "tensorrt-llm"))] | None = None
    """vllm or tensorrt-llm: fail the stage, naming the layers, if that engine cannot load the child."""
    quantize: Annotated[str, OneOf(("fp8",))] | None = None
    """fp8: also write RUN/export_fp8 (ModelOpt FP8, calibrated on RUN/data/heldout); needs
    nvidia-modelopt (the [modelopt] extra)."""
    calib_batches: Annotated[int, Integer()] = 8
    """FP8 calibration batches (x calib_batch_size x calib_seq_len tokens)."""
    calib_batch_size: Annotated[int, Integer()] = 4
    """Sequences per calibration batch."""
    calib_seq_len: Annotated[int, Integer()] = 256
    """Tokens per calibration sequence."""
    max_shard_size: str = "2GB"
    """Split safetensors files above this size."""
