"""Skip markers of the GPU tier (a module of its own: `conftest` is ambiguous between tests/ and
tests/gpu/)."""

from __future__ import annotations

import pytest
import torch

from megapuzzle.model.config import te_available

HAS_CUDA = torch.cuda.is_available()
HAS_TE = HAS_CUDA and te_available()
HAS_FP8 = HAS_TE and torch.cuda.get_device_capability() >= (8, 9)

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU tier: no CUDA GPU on this machine "
                                   "(run `python -m pytest tests/gpu` on a GPU node)")
requires_te = pytest.mark.skipif(not HAS_TE, reason="needs a CUDA GPU and TransformerEngine (pip install -e '.[gpu]')")
requires_fp8 = pytest.mark.skipif(not HAS_FP8, reason="needs TransformerEngine on an sm >= 89 GPU (Ada / Hopper)")
