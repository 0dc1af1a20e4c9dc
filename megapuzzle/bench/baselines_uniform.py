"""Uniform width at any size (megapuzzle.bench.baselines' `uniform`): the settings it may use in every
layer, and the costs of FFN widths costs.json never measured (linear in the width between the
measured ones). Torch-free."""

from __future__ import annotations

import numpy as np

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, SearchSpace
from megapuzzle.errors import UserError


def uniform_grid(parent: Architecture, space: SearchSpace, ffn_steps: int | None = 16) -> tuple[list, list]:
    """(attention, FFN) variants uniform width may use in every layer. ffn_steps=None: the search
    space's grid (what the library holds). An int N: every KV-head count that divides the query
    heads and is at most the parent's, and every FFN width k*I/N (k = 1..N, I the parent's), not
    only the library's: a homogeneous pruning is not limited to the sizes BLD trained."""
    L = parent.num_layers
    if ffn_steps is None:
        att = [a for a in space.attention_variants(parent, 0) if a.parent_like
               and all(a in space.attention_variants(parent, l) for l in range(L))]
        ffn = [f for f in space.ffn_variants(parent, 0) if f.parent_like
               and all(f in space.ffn_variants(parent, l) for l in range(L))]
        return att, ffn
    own_a, own_f = parent.layers[0].attention, parent.layers[0].ffn
    if any(la.attention != own_a or la.ffn != own_f for la in parent.layers) or not own_a.parent_like or not own_f.parent_like:
        raise UserError("uniform width over arbitrary sizes needs a homogeneous GQA + MLP parent")
    heads = parent.num_attention_heads
    att = [AttentionVariant("gqa", k) for k in range(own_a.num_kv_heads, 0, -1)
           if heads % k == 0 and own_a.num_kv_heads % k == 0]
    sizes = sorted({max(1, round(k * own_f.intermediate_size / ffn_steps)) for k in range(1, ffn_steps + 1)}, reverse=True)
    return att, [FFNVariant("mlp", n) for n in sizes]


class InterpolatedCosts:
    """mip.stage.ScenarioCosts that also prices MLP widths costs.json did not measure: linear in the
    intermediate size through the two nearest measured widths (extrapolated below the smallest,
    never below 0). Every measured variant keeps its measured cost."""

    def __init__(self, sc):
        self.sc, self._mlp = sc, None

    def __getattr__(self, name):
        return getattr(self.sc, name)

    def _measured_mlp(self) -> list[int]:
        if self._mlp is None:
            from megapuzzle.costs.table import cost_table

            self._mlp = sorted(FFNVariant.from_name(e["name"]).intermediate_size
                               for e in cost_table(self.sc.costs, self.sc.source)["variants"].values()
                               if e.get("subblock") == "ffn" and FFNVariant.from_name(e["name"]).parent_like)
        return self._mlp

    def variant_time(self, v, b: int) -> float:
        if not (isinstance(v, FFNVariant) and v.parent_like) or v.intermediate_size in self._measured_mlp():
            return self.sc.variant_time(v, b)
        return interpolate_linear(self._measured_mlp(), [self.sc.variant_time(FFNVariant("mlp", n), b)
                                                         for n in self._measured_mlp()], v.intermediate_size)

    def generation_time(self, arch: Architecture, b: int) -> float:
        return self.sc.fixed_time(b, arch.num_layers) + sum(
            self.variant_time(l.attention, b) + self.variant_time(l.ffn, b) for l in arch.layers)

    def tokens_per_s(self, arch: Architecture, b: int) -> float:
        return b * self.sc.cfg.gen_len / self.generation_time(arch, b)


def interpolate_linear(xs: list[float], ys: list[float], x: float) -> float:
    """y at x on the piecewise-linear curve through sorted xs (at least 2), extrapolated from the end
    segments, floored at 0 (a subblock cannot take negative time)."""
    if len(xs) < 2:
        raise UserError(f"need two measured MLP widths to interpolate a cost, have {xs}")
    i = min(max(1, int(np.searchsorted(xs, x))), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))
