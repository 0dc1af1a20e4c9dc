"""A tiny end-to-end run on one GPU: train the debug parent, BLD, score, measure (GPU wall
clock), MIP, realize, GKD (Megatron DDP + distributed optimizer, bf16, overlapped grad reduce),
evaluate; BLD blocks (bf16 under Megatron's mixed-precision optimizer: `bld.dtype` auto)
improve on their init and GKD lowers the held-out KL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _gpu import requires_cuda

pytestmark = pytest.mark.gpu


ROOT = Path(__file__).resolve().parents[2]


@requires_cuda
def test_debug_pipeline_on_one_gpu(tmp_path):
    from megapuzzle.pipeline import run_pipeline

    cfg = yaml.safe_load((ROOT / "examples" / "debug.yaml").read_text())
    cfg["measure"]["dtype"] = "bfloat16"
    cfg["gkd"]["dtype"] = "bfloat16"
    path = tmp_path / "debug_gpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    run_pipeline(path, run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values()), manifest["stages"]
    blocks = json.loads((run / "library" / "index.json").read_text())["blocks"]
    trained = [b for b in blocks.values() if b["tokens"] > 0]
    assert trained and all(b["final_nmse"] <= b["init_nmse"] for b in trained)
    assert {b["trained_dtype"] for b in trained} == {"bfloat16"}  # auto on a GPU
    gkd = json.loads((run / "gkd" / "result.json").read_text())
    assert gkd["final"]["kl"] < gkd["initial"]["kl"] and gkd["trainer"] == "megatron"
    costs = json.loads((run / "costs.json").read_text())
    assert costs["device"].startswith("NVIDIA") and costs["precision"] == "bf16"
    ev = json.loads((run / "eval.json").read_text())
    print(json.dumps({k: ev[k] for k in list(ev)[:12]}, indent=1, default=str)[:2000])
