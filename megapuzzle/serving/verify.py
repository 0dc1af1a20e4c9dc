"""`megapuzzle verify-export`: read an exported child in a serving engine and check it against our
own Megatron model, token for token.

    megapuzzle verify-export --checkpoint runs/cpu_demo/gkd/checkpoint --export runs/cpu_demo/export \\
        --data runs/cpu_demo/data/heldout --engine vllm [--prompts 8 --new-tokens 16]

Engines (each its own environment, see engines.py): vllm, vllm-oldest, transformers-oldest,
transformers-newest. Both sides run fp32. Our model's greedy continuation is recomputed from
scratch at every step (no KV cache); the engine's uses its KV cache. What must hold:
  - every greedy token equal, except where our top-1/top-2 logit margin is below NEAR_TIE (either
    token is a correct greedy choice under rounding: that prompt's comparison ends there, and at
    most one prompt in eight may end so);
  - prompt log-probs (vLLM) or logits (transformers) within LOGPROB_TOL: summation order alone
    moves fp32 results by ~1e-6 (7e-7 seen), while a wrong weight, RoPE scale or KV-head mapping
    moves them by 0.1-1;
  - transformers: generate with the KV cache == without it == a left-padded batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megapuzzle.errors import UserError
from megapuzzle.serving.engines import ENVIRONMENTS, require_python, run_script
from megapuzzle.serving.reference import compare_greedy, greedy_reference, load_reference_model

LOGPROB_TOL = 1e-4
NEAR_TIE = 1e-4


def heldout_prompts(data_prefix: str | Path, n: int, min_len: int = 12) -> list[list[int]]:
    """n held-out prompts of different lengths (min_len, min_len + 3, ...) from spread-out places."""
    from megapuzzle.data.datasets import PackedSequenceDataset

    toks = PackedSequenceDataset.from_prefix(data_prefix).tokens
    longest = min_len + 3 * (n - 1)
    stride = max(1, (len(toks) - longest) // max(1, n))
    if len(toks) < longest:
        raise UserError(f"{data_prefix} has {len(toks)} tokens, too few for {n} prompts; use fewer --prompts")
    return [[int(t) for t in toks[i * stride: i * stride + min_len + 3 * i]] for i in range(n)]


def verify_export(checkpoint: str | Path, export: str | Path, prompts: list[list[int]], engine: str,
                  new_tokens: int = 16) -> dict:
    """Run the engine on the export and our model on the checkpoint; the comparison as a dict with
    "ok" (bool) and "problems" (one line each)."""
    py = require_python(engine)
    export = Path(export).resolve()  # the engine runs in another directory
    _, model = load_reference_model(checkpoint)
    ref = greedy_reference(model, prompts, new_tokens)
    out: dict = {"engine": engine, "prompts": len(prompts), "new_tokens": new_tokens, "problems": []}
    if engine.startswith("vllm"):
        max_len = max(len(p) for p in prompts) + new_tokens + 8
        res = run_script(py, "vllm_worker.py", {
            "engine": {"dtype": "float32", "max_model_len": max_len, "kv_cache_bytes": 1 << 30},
            "generate": {"model": str(export), "prompts": prompts, "max_tokens": new_tokens, "prompt_logprobs": True}})
        out["version"] = f"vllm {res['vllm']}"
        got = res["generate"]["tokens"]
        diffs = [abs(a - b) for g, w in zip(res["generate"]["prompt_logprobs"], ref["prompt_logprobs"])
                 for a, b in zip(g, w)]
        if len(diffs) != sum(len(p) - 1 for p in prompts):
            out["problems"].append(f"prompt log-probs: {len(diffs)} values for {sum(len(p) - 1 for p in prompts)} positions")
        out["prompt_logprob_max_abs_diff"] = max(diffs) if diffs else None
    else:
        from megapuzzle.model.forward import forward_logits

        res = run_script(py, "hf_reader_check.py", {"model": str(export), "prompts": prompts,
                                                     "max_new_tokens": new_tokens})
        out["version"] = f"transformers {res['transformers']}"
        got = res["cached"]
        with torch.no_grad():
            diffs = [(torch.tensor(g) - forward_logits(model, torch.tensor([p]))[0]).abs().max().item()
                     for g, p in zip(res["prompt_logits"], prompts)]
        out["logit_max_abs_diff"] = max(diffs)
        if res["cached"] != res["recompute"]:
            out["problems"].append("generate with the KV cache differs from generate without it")
        if res["left_padded"] != res["cached"]:
            out["problems"].append("a left-padded batch does not give each prompt's own continuation")
    if max(diffs) >= LOGPROB_TOL:
        out["problems"].append(f"{'prompt log-probs' if engine.startswith('vllm') else 'logits'} differ from ours by "
                               f"{max(diffs):.3g} (tolerance {LOGPROB_TOL:g})")
    cmp = compare_greedy(got, ref["tokens"], ref["margins"], NEAR_TIE)
    out["greedy"] = cmp
    if cmp["mismatches"]:
        m = cmp["mismatches"][0]
        out["problems"].append(f"{len(cmp['mismatches'])} greedy mismatch(es), first at prompt {m.get('prompt')} "
                               f"step {m.get('step')}: {m}")
    if len(cmp["near_ties"]) > max(1, len(prompts) // 8):
        out["problems"].append(f"{len(cmp['near_ties'])} prompts ended on near-ties; use other prompts")
    out["ok"] = not out["problems"]
    return out


def summary(res: dict) -> str:
    g = res["greedy"]
    num = (f"prompt log-probs max |diff| {res['prompt_logprob_max_abs_diff']:.2e}" if "prompt_logprob_max_abs_diff" in res
           else f"logits max |diff| {res['logit_max_abs_diff']:.2e}")
    return (f"{res['version']}: {g['equal_tokens']}/{g['compared_tokens']} greedy tokens equal to our model's over "
            f"{res['prompts']} prompts, {len(g['near_ties'])} near-tie(s); {num}"
            + ("" if res["ok"] else "; FAILED: " + " | ".join(res["problems"])))


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="the megapuzzle checkpoint that was exported (our model)")
    p.add_argument("--export", required=True, help="the exported HF DeciLM directory")
    p.add_argument("--data", required=True, help="indexed-dataset prefix of held-out text (e.g. RUN/data/heldout)")
    p.add_argument("--engine", choices=list(ENVIRONMENTS), default="vllm", help="where to read the export")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt")
    p.add_argument("--json", default=None, help="also write the full comparison here")


def run_cli(args: argparse.Namespace) -> int:
    from megapuzzle.fileio import atomic_write_json

    res = verify_export(args.checkpoint, args.export, heldout_prompts(args.data, args.prompts), args.engine,
                        args.new_tokens)
    if args.json:
        atomic_write_json(args.json, res)
    print(summary(res))
    return 0 if res["ok"] else 1
