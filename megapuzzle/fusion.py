"""FFN Fusion (arXiv 2503.18908): a run of consecutive FFNs becomes one wider FFN.

Once Puzzle removes attention from consecutive layers, the FFNs left there follow each other
directly: h -> h + F_i(h) -> h + F_i(h) + F_{i+1}(h + F_i(h)) -> ...  FFN Fusion drops the
dependency, h -> h + sum_k F_k(h), i.e. the FFNs run in parallel on the run's input. That is an
approximation (the quality change is measured, and healed by a short GKD); what follows is exact.

A SwiGLU FFN with its pre-norm is  F_k(h) = D_k (silu(G_k n_k(h)) * (U_k n_k(h)))  with
n_k(h) = gamma_k * h / rms(h). Folding gamma_k into the columns, G_k n_k(h) = (G_k diag(gamma_k))
n(h) with n the weightless norm, so  sum_k F_k(h) = D (silu(G n(h)) * (U n(h)))  with
G = [G_i diag(gamma_i); G_{i+1} diag(gamma_{i+1}); ...] and U alike (stacked along the
intermediate dim), D = [D_i, D_{i+1}, ...] (along its input dim), and the shared norm weight 1.
The fused FFN has the summed width and is an ordinary SwiGLU: the fused child is one layer with
the run's first attention and that FFN, the other layers of the run no-op / no-op, so every
reader of the DeciLM format (vLLM, TRT-LLM, Megatron, transformers) loads it unchanged (the
summed width is written as `ffn_mult` when it is a multiple of 256, else as an explicit
`intermediate_size`, see megapuzzle.arch).

A run: layer i with an MLP FFN (any attention), then layers i+1..j whose attention is no-op and
whose FFN is an MLP or no-op (a no-op / no-op layer is the identity and does not break a run);
at least two MLPs. `leading_attention=False` also requires layer i's attention to be no-op.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch
from megapuzzle.errors import UserError

Run = tuple[int, int]  # first and last layer, inclusive


def find_runs(arch: Architecture, *, leading_attention: bool = True, max_run: int | None = None) -> list[Run]:
    """Maximal runs of consecutive FFNs with nothing but no-op attention between them (>= 2 MLPs).
    `max_run` caps a run's length in layers (longer runs are split greedily from the start)."""
    runs: list[Run] = []
    L = arch.num_layers
    i = 0
    while i < L:
        li = arch.layers[i]
        if not li.ffn.parent_like or (not leading_attention and not li.attention.identity):
            i += 1
            continue
        j, last_mlp, mlps = i, i, 1
        while j + 1 < L and arch.layers[j + 1].attention.identity \
                and (arch.layers[j + 1].ffn.parent_like or arch.layers[j + 1].ffn.identity) \
                and (max_run is None or j + 2 - i <= max_run):
            j += 1
            if arch.layers[j].ffn.parent_like:
                last_mlp, mlps = j, mlps + 1
        if mlps >= 2:
            runs.append((i, last_mlp))
            i = last_mlp + 1
        else:
            i += 1
    return runs


def check_runs(arch: Architecture, runs: Sequence[Run]) -> None:
    """One-line UserError unless every run is fusable and runs do not overlap."""
    prev = -1
    for i, j in sorted(runs):
        if not (0 <= i < j < arch.num_layers):
            raise UserError(f"fusion run [{i}, {j}] is not a range of at least two layers of the "
                            f"{arch.num_layers}-layer model")
        if i <= prev:
            raise UserError(f"fusion runs overlap at layer {i}; give disjoint runs")
        prev = j
        if not arch.layers[i].ffn.parent_like or not arch.layers[j].ffn.parent_like:
            raise UserError(f"fusion run [{i}, {j}] must start and end with an MLP FFN "
                            f"(layers {i}, {j} have {arch.layers[i].ffn.name}, {arch.layers[j].ffn.name})")
        for k in range(i + 1, j + 1):
            l = arch.layers[k]
            if not l.attention.identity or not (l.ffn.parent_like or l.ffn.identity):
                raise UserError(f"fusion run [{i}, {j}]: layer {k} is {l.name}; inside a run every layer "
                                f"after the first needs no-op attention and an MLP or no-op FFN")


def fused_width(arch: Architecture, run: Run) -> int:
    i, j = run
    return sum(arch.layers[k].ffn.intermediate_size for k in range(i, j + 1) if arch.layers[k].ffn.parent_like)


def fused_arch(arch: Architecture, runs: Sequence[Run]) -> Architecture:
    """Layer i keeps its attention and gets an MLP of the run's summed width; i+1..j become no-op / no-op."""
    check_runs(arch, runs)
    layers = list(arch.layers)
    for i, j in runs:
        layers[i] = LayerArch(arch.layers[i].attention, FFNVariant("mlp", fused_width(arch, (i, j))))
        for k in range(i + 1, j + 1):
            layers[k] = LayerArch(AttentionVariant("no_op"), FFNVariant("no_op"))
    return arch.with_layers(layers)


def fold_ffns(parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(gamma, gate, up, down), ...] -> (ones norm, gate, up, down) of the one FFN that computes
    their sum on a shared input. The fold (W diag(gamma)) is done in fp32 (fp64 for fp64 inputs)
    and cast to `dtype` (default: the inputs' dtype)."""
    if len(parts) < 1:
        raise ValueError("fold_ffns needs at least one FFN")
    out_dtype = dtype or parts[0][1].dtype
    work = torch.float64 if parts[0][1].dtype == torch.float64 else torch.float32
    gates, ups, downs = [], [], []
    h = parts[0][0].shape[0]
    for gamma, gate, up, down in parts:
        if gamma.shape != (h,) or gate.shape[1] != h or up.shape != gate.shape or down.shape != (h, gate.shape[0]):
            raise ValueError(f"fold_ffns: inconsistent shapes gamma {tuple(gamma.shape)}, gate {tuple(gate.shape)}, "
                             f"up {tuple(up.shape)}, down {tuple(down.shape)}")
        g = gamma.to(work)
        gates.append(gate.to(work) * g[None, :])
        ups.append(up.to(work) * g[None, :])
        downs.append(down.to(work))
    norm = torch.ones(h, dtype=out_dtype)
    return (norm, torch.cat(gates, 0).to(out_dtype), torch.cat(ups, 0).to(out_dtype),
            torch.cat(downs, 1).to(out_dtype))


def iter_fused_tensors(arch: Architecture, tensors: Mapping[str, torch.Tensor], runs: Sequence[Run]
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """The fused checkpoint's (name, tensor) pairs in canonical order, read lazily from `tensors`
    (a lazy reader is fine: one layer, or one run's FFNs, in memory at a time)."""
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes

    new = fused_arch(arch, runs)
    start = {i: j for i, j in runs}
    inside = {k for i, j in runs for k in range(i + 1, j + 1)}
    for name in expected_canonical_shapes(new):
        if not name.startswith("model.layers."):
            yield name, tensors[name]
            continue
        layer = int(name.split(".")[2])
        p = f"model.layers.{layer}."
        assert layer not in inside  # no-op / no-op: no tensors
        if layer in start and (name.startswith(p + "mlp.") or name == p + "post_attention_layernorm.weight"):
            if name != p + "post_attention_layernorm.weight":
                continue  # emitted with the norm, below
            parts = []
            for k in range(layer, start[layer] + 1):
                if not arch.layers[k].ffn.parent_like:
                    continue
                q = f"model.layers.{k}."
                parts.append((tensors[q + "post_attention_layernorm.weight"], tensors[q + "mlp.gate_proj.weight"],
                              tensors[q + "mlp.up_proj.weight"], tensors[q + "mlp.down_proj.weight"]))
            norm, gate, up, down = fold_ffns(parts)
            del parts
            yield p + "post_attention_layernorm.weight", norm
            yield p + "mlp.gate_proj.weight", gate
            yield p + "mlp.up_proj.weight", up
            yield p + "mlp.down_proj.weight", down
            continue
        yield name, tensors[name]


def fuse_state_dict(arch: Architecture, tensors: Mapping[str, torch.Tensor], runs: Sequence[Run]
                    ) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """In-memory version for small models and tests."""
    return fused_arch(arch, runs), dict(iter_fused_tensors(arch, tensors, runs))


# ----------------------------------------------------------------------------- one run as a search block

FFN_NAMES = ("post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
"""Layer-local names of an FFN subblock: what a fused-run block stores and trains."""


def run_block_layer(parent: Architecture, i: int, j: int) -> LayerArch:
    """The replacement layer of run [i, j]: the parent's attention at i, an MLP of the summed FFN width."""
    if not 0 <= i < j < parent.num_layers:
        raise UserError(f"run [{i}, {j}] is not a range of at least two of the parent's {parent.num_layers} layers")
    widths = [parent.layers[k].ffn.intermediate_size for k in range(i, j + 1) if parent.layers[k].ffn.parent_like]
    if not widths:
        raise UserError(f"run [{i}, {j}] has no MLP to fuse")
    return LayerArch(parent.layers[i].attention, FFNVariant("mlp", sum(widths)))


def run_arch(parent: Architecture, i: int, j: int, layer: LayerArch) -> Architecture:
    """The parent with layers i..j replaced by `layer` (at i) and no-op / no-op layers."""
    layers = list(parent.layers)
    layers[i] = layer
    for k in range(i + 1, j + 1):
        layers[k] = LayerArch(AttentionVariant("no_op"), FFNVariant("no_op"))
    return parent.with_layers(layers)


def fold_run(parent: Architecture, tensors: Mapping[str, torch.Tensor], i: int, j: int,
             ffn_locals: Sequence[Mapping[str, torch.Tensor]] | None = None
             ) -> tuple[LayerArch, dict[str, torch.Tensor]]:
    """(layer, layer-local FFN tensors) of run [i, j]'s block: the fold of the parent's FFNs i..j, or
    of `ffn_locals` (per MLP layer of the run, in order: a narrower variant's library blocks; the
    width is then their sum). Reads only those FFN tensors from `tensors` (a lazy reader is fine)."""
    if ffn_locals is None:
        layer = run_block_layer(parent, i, j)
        ffn_locals = [{n: tensors[f"model.layers.{k}.{n}"] for n in FFN_NAMES}
                      for k in range(i, j + 1) if parent.layers[k].ffn.parent_like]
    else:
        widths = [int(f["mlp.gate_proj.weight"].shape[0]) for f in ffn_locals]
        layer = LayerArch(parent.layers[i].attention, FFNVariant("mlp", sum(widths)))
    folded = fold_ffns([tuple(f[n] for n in FFN_NAMES) for f in ffn_locals])
    return layer, dict(zip(FFN_NAMES, folded))


def init_run_block(parent: Architecture, tensors: Mapping[str, torch.Tensor], i: int, j: int,
                   ffn_locals: Sequence[Mapping[str, torch.Tensor]] | None = None
                   ) -> tuple[LayerArch, dict[str, torch.Tensor]]:
    """(layer, layer-local canonical tensors) of run [i, j]: attention i copied, FFNs i..j folded
    (fold_run). The whole replacement layer, for references and tests."""
    p = f"model.layers.{i}."
    local = {n[len(p):]: tensors[n] for n in tensors.keys() if n.startswith(p) and
             (n.startswith(p + "self_attn.") or n == p + "input_layernorm.weight")}
    layer, ffn = fold_run(parent, tensors, i, j, ffn_locals)
    local.update(ffn)
    return layer, local
