"""Serving engines run out of process: vLLM, and other transformers versions, each in its own
interpreter (vLLM pins transformers to a range of its own; see docs in engines.py).

`engines.py` finds and runs those interpreters; `reference.py` is what our own Megatron model
says (greedy recompute, prompt log-probs) for comparing against them. `vllm_worker.py` and
`hf_reader_check.py` are scripts the other interpreter runs: they import only torch,
transformers / vLLM and the standard library, never megapuzzle.
"""
