"""What our own Megatron-core model says, for checking a serving engine against it: greedy
continuations by full recomputation (no KV cache, so nothing but the weights and the maths can
differ), each step's top-1/top-2 logit margin (a near-tie may flip under another kernel's
rounding, and a comparison must know which steps were near-ties), and prompt log-probs."""

from __future__ import annotations

from pathlib import Path

import torch


def load_reference_model(ckpt_dir: str | Path):
    """(architecture, our single-process fp32 GPTModel) for a canonical checkpoint."""
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.model import ModelOptions, build_gpt_model, load_canonical_into_model
    from megapuzzle.runtime.distributed import init_distributed

    init_distributed(tp=1)
    arch, tensors, _ = load_checkpoint(ckpt_dir, dtype=torch.float32)
    model = build_gpt_model(arch, options=ModelOptions(perform_initialization=False))
    load_canonical_into_model(model, tensors, arch)
    return arch, model.eval()


@torch.no_grad()
def greedy_reference(model, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """{"tokens": [[new ids]], "margins": [[top1 - top2 logit per new token]],
    "prompt_logprobs": [[log p(prompt[i] | prompt[:i]) for i >= 1]]}, all in fp32 logits
    scored in float64."""
    from megapuzzle.model.forward import forward_logits

    tokens, margins, prompt_lp = [], [], []
    for prompt in prompts:
        ids = torch.tensor([prompt], dtype=torch.long)
        logits = forward_logits(model, ids)[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        prompt_lp.append(lp[:-1].gather(-1, ids[0, 1:, None])[:, 0].tolist())
        new, gaps = [], []
        for step in range(max_new_tokens):
            if step:
                logits = forward_logits(model, ids)[0].double()
            top = logits[-1].topk(2)
            new.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
        tokens.append(new)
        margins.append(gaps)
    return {"tokens": tokens, "margins": margins, "prompt_logprobs": prompt_lp}


def compare_greedy(got: list[list[int]], want: list[list[int]], margins: list[list[float]], tie: float) -> dict:
    """Token-for-token comparison of greedy continuations. A first difference at a step whose
    reference top-1/top-2 margin is below `tie` is a near-tie (either token is a correct greedy
    choice under rounding) and ends that sequence's comparison; any other difference is a
    mismatch. Returns {"equal_tokens", "compared_tokens", "near_ties", "mismatches": [...]}."""
    equal = compared = 0
    ties, mismatches = [], []
    for i, (g, w, m) in enumerate(zip(got, want, margins)):
        for j, (a, b) in enumerate(zip(g, w)):
            compared += 1
            if a == b:
                equal += 1
                continue
            (ties if m[j] < tie else mismatches).append({"prompt": i, "step": j, "got": a, "want": b,
                                                          "margin": m[j]})
            break
        if len(g) != len(w):
            mismatches.append({"prompt": i, "length": [len(g), len(w)]})
    return {"equal_tokens": equal, "compared_tokens": compared, "near_ties": ties, "mismatches": mismatches}
