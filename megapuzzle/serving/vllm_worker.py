"""Run one request in vLLM and write the answer as json. Executed by the vLLM interpreter:

    VLLM_PYTHON megapuzzle/serving/vllm_worker.py REQUEST.json RESULT.json

Self-contained on purpose (imports vLLM, the standard library and random only): vLLM lives in
its own environment because it pins transformers below what megapuzzle installs.

REQUEST (every model key: an exported or config-only DeciLM directory)
  {"engine": {"dtype", "max_model_len", "kv_cache_bytes", "enforce_eager", "load_format",
              "quantization", "seed"},
   "generate": {"model": DIR, "prompts": [[ids]], "max_tokens", "prompt_logprobs": bool},
   "time": {"models": {"A": DIR, "B": DIR, ...}, "points": [[batch, seq], ...], "decode_tokens": n,
            "repeats", "warmup", "vocab": V},
   "generation": {"models": {...}, "batch", "prefill", "gen", "rounds", "warmup", "vocab"}}
RESULT
  {"vllm": version,
   "generate": {"tokens": [[ids]], "prompt_logprobs": [[log p(prompt[i] | prompt[:i]), i >= 1]]},
   "time": {"kv_bytes_per_token": {name: int}, "samples": {name: {"b,s": {"prefill": [s], "decode": [s]}}}},
   "generation": {"seconds": {name: [one generation of batch x (prefill + gen) per round]}}}

Timing, per model and (batch, seq): `generate` with max_tokens 1 is a prefill of batch x seq
tokens (plus the scheduler's fixed work); with max_tokens 1 + n it adds n decode steps, so
(t(1 + n) - t(1)) / n is one decode step at about seq + n/2 cached tokens. All models are
loaded side by side and sampled in ABBA order per repeat, so drift hits each alike; prefix
caching is off and every call draws fresh random prompts, so no prefill is skipped.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time


def _llm(model: str, e: dict):
    from vllm import LLM

    kw = dict(model=model, tokenizer=model, skip_tokenizer_init=True, trust_remote_code=True,
              dtype=e.get("dtype", "auto"), max_model_len=int(e.get("max_model_len", 512)),
              seed=int(e.get("seed", 0)), enforce_eager=bool(e.get("enforce_eager", True)),
              enable_prefix_caching=False, load_format=e.get("load_format", "auto"),
              kv_cache_memory_bytes=int(e.get("kv_cache_bytes", 1 << 30)))
    if e.get("quantization"):
        kw["quantization"] = e["quantization"]
    return LLM(**kw)


def _generate(llm, g: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    want_lp = bool(g.get("prompt_logprobs", False))
    params = SamplingParams(temperature=0.0, max_tokens=int(g["max_tokens"]), ignore_eos=True,
                            prompt_logprobs=0 if want_lp else None, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in g["prompts"]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens, prompt_lp = [], []
    for p, o in zip(g["prompts"], outs):
        tokens.append(list(o.outputs[0].token_ids))
        if want_lp:
            # position 0 has no log-prob; position i holds {token: Logprob} including prompt token i
            prompt_lp.append([float(d[int(t)].logprob) for t, d in zip(p[1:], o.prompt_logprobs[1:])])
    return {"tokens": tokens, "prompt_logprobs": prompt_lp if want_lp else None}


def kv_bytes_per_token(llm, kv_cache_bytes: int) -> int | None:
    """Bytes of KV cache one token takes over the whole model, as vLLM allocated it: the blocks
    it carved out of exactly `kv_cache_bytes` (floor division there: error < 1 block)."""
    cfg = llm.llm_engine.vllm_config.cache_config
    blocks, size = getattr(cfg, "num_gpu_blocks", None), getattr(cfg, "block_size", None)
    if not blocks or not size:
        return None
    return round(kv_cache_bytes / (blocks * size))


def _time(llms: dict, t: dict, seed: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    n, vocab = int(t["decode_tokens"]), int(t["vocab"])
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    more = SamplingParams(temperature=0.0, max_tokens=1 + n, ignore_eos=True, detokenize=False)

    def call(llm, b: int, s: int, params) -> float:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(vocab) for _ in range(s)]) for _ in range(b)]
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0

    def sample(llm, b: int, s: int) -> tuple[float, float]:
        t1 = call(llm, b, s, one)
        tn = call(llm, b, s, more)
        return t1, (tn - t1) / n if n else 0.0

    names = list(llms)
    samples = {name: {} for name in names}
    for b, s in t["points"]:
        key = f"{b},{s}"
        for name in names:
            for _ in range(int(t.get("warmup", 1))):
                sample(llms[name], b, s)
            samples[name][key] = {"prefill": [], "decode": []}
        for r in range(int(t["repeats"])):
            for name in (names if r % 2 == 0 else names[::-1]):  # ABBA: drift hits every model alike
                pre, dec = sample(llms[name], b, s)
                samples[name][key]["prefill"].append(pre)
                samples[name][key]["decode"].append(dec)
    return {"samples": samples}


def _generation(llms: dict, g: dict, seed: int) -> dict:
    """End-to-end generation time of each model (batch prompts of `prefill` tokens, `gen` new
    tokens each), models in ABBA order round after round, so paired ratios cancel drift."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    b, p, n, vocab = int(g["batch"]), int(g["prefill"]), int(g["gen"]), int(g["vocab"])
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    def once(llm) -> float:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(vocab) for _ in range(p)]) for _ in range(b)]
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0

    names = list(llms)
    for name in names:
        for _ in range(int(g.get("warmup", 1))):
            once(llms[name])
    seconds = {name: [] for name in names}
    for r in range(int(g["rounds"])):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds[name].append(once(llms[name]))
    return {"seconds": seconds}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    req = json.loads(open(argv[0]).read())
    import vllm

    e = req.get("engine", {})
    res: dict = {"vllm": vllm.__version__}
    if "generate" in req:
        res["generate"] = _generate(_llm(req["generate"]["model"], e), req["generate"])
    if "time" in req:
        llms = {name: _llm(d, e) for name, d in req["time"]["models"].items()}
        res["time"] = _time(llms, req["time"], int(e.get("seed", 0)))
        res["time"]["kv_bytes_per_token"] = {name: kv_bytes_per_token(llm, int(e.get("kv_cache_bytes", 1 << 30)))
                                             for name, llm in llms.items()}
    if "generation" in req:
        llms = {name: _llm(d, e) for name, d in req["generation"]["models"].items()}
        res["generation"] = _generation(llms, req["generation"], int(e.get("seed", 0)))
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
