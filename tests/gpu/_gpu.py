"""The GPU tier's skip markers and fixture: `python -m pytest tests/gpu -v` on a CUDA node (CI
has no GPU: every test here is skipped there, with the reason). TE / FP8 tests also need
TransformerEngine (`pip install -e ".[gpu]"`) and, for FP8, an sm >= 89 GPU (Ada, Hopper,
Blackwell). A plain module, not a conftest.py: tests import `conftest` by name, and a second
conftest.py here would shadow tests/conftest.py."""

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


@pytest.fixture(scope="module")
def dist1():
    """One-process Megatron parallel state (NCCL on the GPU)."""
    from megapuzzle.runtime import destroy_distributed, init_distributed

    info = init_distributed(tp=1, pp=1, seed=1234)
    yield info
    destroy_distributed()
