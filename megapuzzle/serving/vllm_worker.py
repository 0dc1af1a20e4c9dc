"""Run one request in vLLM and write the answer as json. Executed by the vLLM interpreter:

    VLLM_PYTHON megapuzzle/serving/vllm_worker.py REQUEST.json RESULT.json

Self-contained on purpose (imports vLLM, torch and the standard library only): vLLM lives in
its own virtual environment because it pins transformers below what megapuzzle installs.

REQUEST: {"model": DIR, "dtype": "float32", "max_model_len": int, "kv_cache_gb": float,
          "generate": {"prompts": [[token ids]], "max_tokens": int, "prompt_logprobs": bool}}
RESULT:  {"vllm": version, "generate": {"tokens": [[ids]], "prompt_logprobs": [[logprob of
          each prompt token after the first]]}, "kv_cache": {...}}
"""

from __future__ import annotations

import json
import os
import sys
import time


def _engine(req: dict):
    # the CPU backend sizes its KV cache from this variable (GB), not from gpu_memory_utilization
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(req.get("kv_cache_gb", 1)))
    from vllm import LLM

    return LLM(model=req["model"], tokenizer=req["model"], skip_tokenizer_init=True, trust_remote_code=True, dtype=req.get("dtype", "auto"),
               max_model_len=int(req.get("max_model_len", 512)), seed=0, enforce_eager=True,
               gpu_memory_utilization=float(req.get("gpu_memory_utilization", 0.25)))


def _generate(llm, g: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    want_lp = bool(g.get("prompt_logprobs", False))
    params = SamplingParams(temperature=0.0, max_tokens=int(g["max_tokens"]), ignore_eos=True,
                            prompt_logprobs=0 if want_lp else None, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in g["prompts"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens, prompt_lp = [], []
    for p, o in zip(g["prompts"], outs):
        tokens.append(list(o.outputs[0].token_ids))
        if want_lp:
            # position 0 has no logprob; position i holds {token: Logprob} including prompt token i
            prompt_lp.append([float(d[int(t)].logprob) for t, d in zip(p[1:], o.prompt_logprobs[1:])])
    return {"tokens": tokens, "prompt_logprobs": prompt_lp if want_lp else None, "seconds": seconds}


def _kv_cache(llm) -> dict:
    """What vLLM allocated: bytes per token of KV cache over the whole model (per-layer specs)."""
    try:
        engine = llm.llm_engine
        cfg = engine.vllm_config.cache_config
        return {"num_gpu_blocks": getattr(cfg, "num_gpu_blocks", None), "block_size": getattr(cfg, "block_size", None)}
    except Exception as e:  # noqa: BLE001 - informational only; the numbers we test come from generate
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    req = json.loads(open(argv[0]).read())
    import vllm

    llm = _engine(req)
    res = {"vllm": vllm.__version__, "kv_cache": _kv_cache(llm)}
    if "generate" in req:
        res["generate"] = _generate(llm, req["generate"])
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
