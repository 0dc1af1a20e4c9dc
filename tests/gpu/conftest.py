"""The GPU tier: `python -m pytest tests/gpu -v` on a CUDA node (CI has no GPU: every test here
is skipped there, with the reason). TE / FP8 tests also need TransformerEngine (`pip install -e
".[gpu]"`) and, for FP8, an sm >= 89 GPU (Ada, Hopper, Blackwell)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="module")
def dist1():
    from megapuzzle.runtime import destroy_distributed, init_distributed

    info = init_distributed(tp=1, pp=1, seed=1234)
    yield info
    destroy_distributed()
