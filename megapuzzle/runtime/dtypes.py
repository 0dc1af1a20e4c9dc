"""Parameter dtypes by name: what `dtype: auto|float32|bfloat16|float16` means on this machine."""

from __future__ import annotations

import torch


def resolve_dtype(name: str) -> torch.dtype:
    """"auto" = bf16 on a GPU, fp32 on CPU (CPU bf16 GEMMs are emulated on most x86 parts)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def precision_name(dtype: torch.dtype, fp8: bool) -> str:
    return "fp8" if fp8 else {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
