"""Read an exported DeciLM directory with whatever transformers this interpreter has, and write
what it computes as json. Executed by another environment's interpreter (the oldest and the
newest transformers we support, see tools/make_reader_venvs.sh):

    PYTHON megapuzzle/serving/hf_reader_check.py REQUEST.json RESULT.json

Self-contained on purpose (torch, transformers and the standard library only).

REQUEST: {"model": DIR, "prompts": [[token ids]], "max_new_tokens": int}
RESULT:  {"transformers": version, "prompt_logits": [[[float]]] (last position of each prompt,
          no cache), "cached": [[new ids]] (generate, KV cache on), "recompute": [[new ids]]
          (generate, KV cache off), "left_padded": [[new ids]] (every prompt in one left-padded
          batch, KV cache on)}
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    req = json.loads(open(argv[0]).read())
    # transformers 5 renamed torch_dtype -> dtype (the old name warns); 4.x knows only torch_dtype
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(req["model"], trust_remote_code=True, **{dtype_kw: torch.float32})
    model.eval()
    n = int(req["max_new_tokens"])
    out = {"transformers": transformers.__version__, "prompt_logits": [], "cached": [], "recompute": []}
    with torch.no_grad():
        for p in req["prompts"]:
            ids = torch.tensor([p], dtype=torch.long)
            out["prompt_logits"].append(model(ids).logits[0].tolist())
            for key, cache in (("cached", True), ("recompute", False)):
                g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, use_cache=cache, pad_token_id=0)
                out[key].append(g[0, ids.shape[1]:].tolist())
        width = max(len(p) for p in req["prompts"])
        batch = torch.tensor([[0] * (width - len(p)) + list(p) for p in req["prompts"]], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in req["prompts"]], dtype=torch.long)
        g = model.generate(batch, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=0)
        out["left_padded"] = g[:, width:].tolist()
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
