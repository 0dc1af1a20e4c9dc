"""Sliding-window GQA (`swa_kv{n}_w{w}`): grouped-query attention in which each token attends to
the `w` most recent tokens, itself included (positions p - w + 1 .. p). The worked example of
adding a kind (CONTRIBUTING.md, "Add a new block kind").

Where it is represented:
* HF DeciLM: the GQA entry plus `"window_length": w` (NVIDIA's DeciLM attention config field); our
  exported modeling file applies it. vLLM's nemotron_nas ignores `window_length` (it would serve
  full attention) and TensorRT-LLM's support is unverified, so `engine_problems` names both and
  the vLLM preset never offers it.
* Megatron-core: the heterogeneous json has no per-layer window, so the kind asks for a per-layer
  TransformerConfig override (`megatron_layer_overrides`: `window_size = (w - 1, 0)`), which
  megapuzzle.model.config applies in `get_config_for_layer`; its modules (`megatron_spec`) are
  GQA's, after checking the layer's config carries the window. Megatron's local attention then
  masks with `get_sliding_window_causal_mask` (tests/test_swa.py); TE's attention takes the same
  field (not yet run on a GPU).
* Weights: exactly GQA's (same tensors, same TP layout): the window changes the mask only.
"""

from __future__ import annotations

import re

from .base import ArchitectureError, InitError, decilm_attention
from .gqa import GQAAttention, pool_kv_heads

_NAME = re.compile(r"swa_kv(\d+)_w(\d+)")


class SlidingWindowAttention(GQAAttention):
    kind = "swa"
    size_fields = ("num_kv_heads", "window")  # num_kv_heads stays size_field: Megatron's num_query_groups
    parent_like = False  # a plain Llama layer has no window
    block_config_flag = "window_length"  # set (a positive int) selects this kind when reading block_configs

    def name(self, v) -> str:
        return f"swa_kv{v.num_kv_heads}_w{v.window}"

    def parse_name(self, name: str):
        m = _NAME.fullmatch(name)
        return self.variant(int(m.group(1)), window=int(m.group(2))) if m else None

    def validate(self, v) -> None:
        super().validate(v)
        if not isinstance(v.window, int) or v.window < 1:
            raise ArchitectureError(f"{self.kind} attention needs window >= 1, got {v.window!r}")

    def engine_problems(self, arch, v):
        return [f"sliding window {v.window}: TensorRT-LLM and vLLM"]

    # -- json: GQA's entry plus the window
    def block_config(self, arch, v):
        return decilm_attention(n_heads_in_group=arch.num_attention_heads // v.num_kv_heads, window_length=v.window)

    def from_block_config(self, d, where, arch_dims):
        w = d.get("window_length")
        if not isinstance(w, int) or w < 1:
            raise ArchitectureError(f"{where}.window_length must be a positive int, got {w!r}")
        return self.variant(self.kv_heads_from_block_config(d, where, arch_dims), window=w)

    # -- Megatron: GQA's modules; the window is a TransformerConfig field that Megatron's local and
    # TE core attention read, so the kind sets it per layer and its spec checks the layer got it
    def megatron_layer_overrides(self, arch, v) -> dict:
        return {"window_size": (v.window - 1, 0), "window_attn_skip_freq": None}

    def megatron_spec(self, arch, v, config, use_te: bool):
        want = self.megatron_layer_overrides(arch, v)["window_size"]
        if tuple(config.window_size or ()) != want:  # a config built without the overrides: full attention
            raise ArchitectureError(f"{self.name(v)}: the layer config's window_size is {config.window_size}, not "
                                    f"{want}; build it with megapuzzle.model.config.make_transformer_config")
        return super().megatron_spec(arch, v, config, use_te)

    # -- search space: the parent's GQA with each window of `search_space.attention_windows`
    def offered(self, space, parent, own):
        if type(own.kind_spec) is not GQAAttention:
            return []
        return [self.variant(own.num_kv_heads, window=w) for w in sorted(set(space.attention_windows), reverse=True)
                if w < parent.max_position_embeddings]

    # -- roofline: each query attends to min(position + 1, w) keys; decode reads min(s + 1, w) cached rows
    def extra_work(self, arch, v, phase, batch, seq, kv_bytes):
        d, nq, w = arch.kv_channels, arch.num_attention_heads, v.window
        kv_row = 2 * v.num_kv_heads * d * kv_bytes
        if phase == "prefill":
            full = min(seq, w)
            attended = full * (full + 1) / 2 + (seq - full) * w  # sum over positions of min(i, w)
            return 4.0 * batch * nq * d * attended, batch * seq * kv_row
        return 4.0 * batch * nq * d * min(seq + 1, w), batch * min(seq + 1, w) * kv_row

    # -- init: the parent's GQA weights, K/V pooled when the KV heads shrink
    def init_from(self, arch, parent_v, v, local, scores=None):
        if not isinstance(parent_v.kind_spec, GQAAttention):
            return super().init_from(arch, parent_v, v, local, scores)
        if parent_v.num_kv_heads == v.num_kv_heads:
            return {k: local[k].clone() for k in self.tensor_names}, "parent_weights"
        if v.num_kv_heads > parent_v.num_kv_heads:
            raise InitError(f"cannot grow {parent_v.name} to {v.name}")
        return pool_kv_heads(local, parent_v.num_kv_heads, v.num_kv_heads, arch.kv_channels), "kv_mean_pool"
