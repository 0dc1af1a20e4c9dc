"""Canonical (full, HF DeciLM-named) state dict <-> Megatron GPTModel parameters, TP/PP aware.

The canonical format is what every checkpoint on disk holds: full unsharded tensors under
HF DeciLM / Llama names (`model.layers.{i}.self_attn.q_proj.weight`, ...). Megatron differs in
three ways, all handled here:

* names (`decoder.layers.{j}.self_attention.linear_qkv.weight`, j local to the PP stage);
* fused tensors: linear_qkv interleaves per query group [q heads of the group; k; v], and
  linear_fc1 is [gate; up] *per TP shard*;
* TP sharding: column-parallel layers (qkv, fc1, linear replacements, embedding and output
  vocab rows) split dim 0, row-parallel ones (linear_proj, fc2) split dim 1, norms replicate.

RoPE needs no q/k row permutation: Megatron-core with rotary_interleaved=False rotates halves
exactly like HF Llama (`rotate_half`); tests/test_model.py checks logits against
transformers' LlamaForCausalLM.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from ..arch import Architecture, AttentionVariant, FFNVariant
from ..blocks.base import WeightEntry, WeightsError, first_present
from ..checkpoints.canonical import expected_canonical_shapes, shape_of
from ..checkpoints.shards import SafetensorsReader, layer_group
from .config import stage_layer_ranges
from .gpt import unwrap_model


# ----------------------------------------------------------------------------- canonical layout

# one source of truth for names/shapes: the checkpoint format's own definition
canonical_shapes = expected_canonical_shapes


def _check_names(tensors: Mapping[str, torch.Tensor], want: Mapping[str, tuple[int, ...]]) -> None:
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    if missing:
        raise WeightsError(f"{len(missing)} canonical tensor(s) missing for this architecture, e.g. "
                           f"{missing[:3]}; the checkpoint does not match the architecture")
    if unexpected:
        raise WeightsError(f"{len(unexpected)} unexpected canonical tensor(s), e.g. {unexpected[:3]}; "
                           f"the checkpoint does not match the architecture")


def _check_shape(name: str, shape: tuple[int, ...], want: Mapping[str, tuple[int, ...]]) -> None:
    if tuple(shape) != want[name]:
        raise WeightsError(f"{name} has shape {list(shape)}, the architecture needs {list(want[name])}")


def check_canonical(tensors: Mapping[str, torch.Tensor], arch: Architecture) -> None:
    """Raise a one-line WeightsError on missing, unexpected or mis-shaped canonical tensors."""
    want = canonical_shapes(arch)
    _check_names(tensors, want)
    for k in want:
        _check_shape(k, shape_of(tensors, k), want)


def init_random_canonical(arch: Architecture, seed: int = 0, std: float = 0.02, norm_std: float = 0.0,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random canonical state dict (normal(0, std) matrices, norms 1 + normal(0, norm_std))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in canonical_shapes(arch).items():
        if len(shape) == 1:
            t = 1.0 + norm_std * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        out[name] = t.to(dtype)
    return out


# ----------------------------------------------------------------------------- fused tensors

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv: int) -> torch.Tensor:
    """HF q/k/v -> Megatron linear_qkv rows, grouped [q heads of group g; k_g; v_g] per KV group."""
    h, d = q.shape[1], q.shape[0] // num_heads
    hpg = num_heads // num_kv
    return torch.cat([q.reshape(num_kv, hpg * d, h), k.reshape(num_kv, d, h), v.reshape(num_kv, d, h)],
                     dim=1).reshape(-1, h)


def split_qkv(w: torch.Tensor, num_heads: int, num_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv` (works per TP shard too: shards hold whole KV groups)."""
    h = w.shape[1]
    d = w.shape[0] // (num_heads + 2 * num_kv)
    hpg = num_heads // num_kv
    w = w.reshape(num_kv, (hpg + 2) * d, h)
    q, k, v = w[:, : hpg * d], w[:, hpg * d: (hpg + 1) * d], w[:, (hpg + 1) * d:]
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


# ----------------------------------------------------------------------------- param plan

# One Megatron parameter and its canonical tensor(s); the subblock kinds (megapuzzle.blocks) make them.
_Entry = WeightEntry
_first_present = first_present


def layer_param_plan(params, j: int, i: int, a: AttentionVariant, f: FFNVariant) -> list[_Entry]:
    """The Megatron parameters of layer `i` (local index `j` in this PP stage), from each
    subblock kind's weight mapping (megapuzzle.blocks)."""
    mp, cp = f"decoder.layers.{j}.", f"model.layers.{i}."
    return a.kind_spec.weight_entries(params, mp, cp, a) + f.kind_spec.weight_entries(params, mp, cp, f)


def _plan(model, arch: Architecture) -> tuple[list[_Entry], dict[str, torch.nn.Parameter]]:
    m = unwrap_model(model)
    params = dict(m.named_parameters())
    entries: list[_Entry] = []
    fam = arch.family_spec
    if m.pre_process:
        entries.append(_Entry("embedding.word_embeddings.weight", (fam.embed_name,), "dim0"))
    for j, layer in enumerate(m.decoder.layers):
        i = layer.layer_number - 1  # Megatron's layer_number is global and 1-based
        entries += layer_param_plan(params, j, i, arch.layers[i].attention, arch.layers[i].ffn)
    if m.post_process:
        entries.append(_Entry("decoder.final_layernorm.weight", (fam.final_norm_name,), "rep"))
        if m.output_layer.weight is not None:  # None when tied on a single stage
            src = fam.embed_name if arch.tie_word_embeddings else fam.lm_head_name
            entries.append(_Entry("output_layer.weight", (src,), "dim0"))
    for e in entries:
        if e.param not in params:
            raise WeightsError(f"model has no parameter {e.param}; it was not built for this architecture")
    covered = {e.param for e in entries}
    extra = [n for n in params if n not in covered]
    if extra:
        raise WeightsError(f"model parameters without a canonical source, e.g. {extra[:3]}; "
                           f"the model was not built for this architecture")
    return entries, params


def tp_rank_and_size():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def local_tp_shard(e: _Entry, full: list[torch.Tensor], arch: Architecture, r: int, t: int) -> torch.Tensor:
    if e.kind == "rep":
        return full[0]
    if e.kind == "dim0":
        return full[0].chunk(t, dim=0)[r]
    if e.kind == "dim1":
        return full[0].chunk(t, dim=1)[r]
    if e.kind == "qkv":  # whole KV groups per shard, so the fused tensor splits contiguously
        return fuse_qkv(*full, arch.num_attention_heads, e.num_kv).chunk(t, dim=0)[r]
    if e.kind == "fc1":  # Megatron's MLP chunks each shard's output into [gate; up]
        return torch.cat([full[0].chunk(t, dim=0)[r], full[1].chunk(t, dim=0)[r]], dim=0)
    raise AssertionError(e.kind)


def _part(n: int, r: int, t: int) -> slice:
    """Rank r's part of n rows split t ways, as torch.chunk splits them."""
    c = -(-n // t)
    lo = min(n, r * c)
    return slice(lo, min(n, lo + c))


def _read(src: Mapping[str, torch.Tensor], name: str, rows: slice | None = None, cols: slice | None = None
          ) -> torch.Tensor:
    """rows[, cols] of a canonical tensor: read from disk (only that part) when `src` is a lazy
    checkpoint reader, a view of the in-memory tensor otherwise."""
    if isinstance(src, SafetensorsReader):
        return src.read(name, rows, cols)
    x = src[name]
    if rows is not None:
        x = x[rows]
    return x[:, cols] if cols is not None else x


def read_tp_shard(e: _Entry, src: Mapping[str, torch.Tensor], arch: Architecture, r: int, t: int) -> torch.Tensor:
    """This TP rank's shard of a Megatron parameter, reading only its rows / columns of the
    canonical tensors (equal to local_tp_shard on the full tensors)."""
    name = e.names[0]
    if e.kind == "rep":
        return _read(src, name)
    if e.kind == "dim0":
        return _read(src, name, rows=_part(shape_of(src, name)[0], r, t))
    if e.kind == "dim1":
        return _read(src, name, cols=_part(shape_of(src, name)[1], r, t))
    if e.kind == "qkv":  # whole KV groups per shard: read this shard's groups of q, k and v
        if e.num_kv % t:
            raise WeightsError(f"{e.num_kv} KV heads do not split over TP={t}")
        g, d = e.num_kv // t, arch.kv_channels
        hpg = arch.num_attention_heads // e.num_kv
        q = _read(src, e.names[0], rows=slice(r * g * hpg * d, (r + 1) * g * hpg * d))
        k, v = (_read(src, n, rows=slice(r * g * d, (r + 1) * g * d)) for n in e.names[1:])
        return fuse_qkv(q, k, v, g * hpg, g)
    if e.kind == "fc1":  # Megatron's MLP chunks each shard's output into [gate; up]
        rows = _part(shape_of(src, name)[0], r, t)
        return torch.cat([_read(src, e.names[0], rows=rows), _read(src, e.names[1], rows=rows)], dim=0)
    raise AssertionError(e.kind)


# ----------------------------------------------------------------------------- load

def load_canonical_into_model(model, tensors: Mapping[str, torch.Tensor], arch: Architecture | None = None,
                              ) -> None:
    """Copy the canonical tensors this rank owns into its TP/PP shard of `model`.

    `tensors`: the full canonical dict, or (what every stage passes) the lazy reader of
    megapuzzle.checkpoints.canonical.load_checkpoint, from which only this PP stage's layers
    and this TP rank's rows / columns are read, one tensor at a time, cast to the parameter's
    dtype on the way in: never a whole-model copy. Raises WeightsError on missing, unexpected
    or mis-shaped tensors.
    """
    arch = arch or getattr(unwrap_model(model), "megapuzzle_arch", None)
    if arch is None:
        raise WeightsError("no architecture given and the model carries none; pass arch=")
    want = canonical_shapes(arch)
    _check_names(tensors, want)  # names: all of them; shapes: those this rank reads (below)
    entries, params = _plan(model, arch)
    r, t = tp_rank_and_size()
    with torch.no_grad():
        for e in entries:
            p = params[e.param]
            for n in e.names:
                _check_shape(n, shape_of(tensors, n), want)
            local = read_tp_shard(e, tensors, arch, r, t)
            if tuple(local.shape) != tuple(p.shape):
                raise WeightsError(f"{e.param}: shard of {e.names[0]} has shape {list(local.shape)}, "
                                   f"the model parameter has {list(p.shape)}")
            p.copy_(local.to(device=p.device, dtype=p.dtype))
            del local


# ----------------------------------------------------------------------------- gather

def tp_all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    t = ps.get_tensor_model_parallel_world_size()
    if t == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(t)]
    dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _gather_entries(entries: list[_Entry], params, arch: Architecture, t: int) -> dict[str, torch.Tensor]:
    """Full canonical tensors of `entries` (TP shards all-gathered; collective over the TP group)."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for e in entries:
            x = params[e.param].detach()
            if e.kind == "rep":
                out[e.names[0]] = x.clone()
            elif e.kind in ("dim0", "dim1"):
                full = tp_all_gather(x, 0 if e.kind == "dim0" else 1)
                out.setdefault(e.names[0], full)  # tied: embedding and output copy agree
            elif e.kind == "qkv":
                full = tp_all_gather(x, 0)
                q, k, v = split_qkv(full, arch.num_attention_heads, e.num_kv)
                out.update(zip(e.names, (q.contiguous(), k.contiguous(), v.contiguous())))
            elif e.kind == "fc1":
                parts = tp_all_gather(x, 0).chunk(t, dim=0)
                gate = torch.cat([p.chunk(2, dim=0)[0] for p in parts], dim=0)
                up = torch.cat([p.chunk(2, dim=0)[1] for p in parts], dim=0)
                out[e.names[0]], out[e.names[1]] = gate, up
    return out


def _owner_stage(name: str, arch: Architecture, pp: int) -> int:
    if name == arch.family_spec.embed_name:
        return 0
    if name.startswith("model.layers."):
        i = int(name.split(".")[2])
        return next(s for s, rng in enumerate(stage_layer_ranges(arch.num_layers, pp)) if i in rng)
    return pp - 1  # model.norm, lm_head


def gather_canonical_from_model(model, arch: Architecture | None = None, *, all_ranks: bool = False,
                                ) -> dict[str, torch.Tensor]:
    """The full canonical state dict, assembled from every TP shard and PP stage.

    all_ranks=False: global rank 0 gets the dict, the other ranks an empty one (stages send
    their tensors point-to-point to rank 0, so no rank but 0 ever holds the whole model).
    all_ranks=True: every rank gets it (broadcast over each pipeline group). Collective: all
    ranks must call it. To write a checkpoint, stream instead: iter_canonical_from_model.
    """
    return dict(iter_canonical_from_model(model, arch, all_ranks=all_ranks))


def iter_canonical_from_model(model, arch: Architecture | None = None, *, all_ranks: bool = False,
                              ) -> Iterator[tuple[str, torch.Tensor]]:
    """gather_canonical_from_model one layer at a time: (name, full tensor) in canonical order on
    global rank 0 (on every rank with all_ranks), nothing elsewhere. Every rank must run it to
    the end (it is collective); no rank holds more than one gathered layer of it at once."""
    from megatron.core import parallel_state as ps

    arch = arch or getattr(unwrap_model(model), "megapuzzle_arch", None)
    if arch is None:
        raise WeightsError("no architecture given and the model carries none; pass arch=")
    entries, params = _plan(model, arch)
    _, t = tp_rank_and_size()
    groups: dict[str, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(layer_group(e.names[0]), []).append(e)
    pp = ps.get_pipeline_model_parallel_world_size()
    stage = ps.get_pipeline_model_parallel_rank()
    group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)  # global rank of each stage in my PP group
    dtype = unwrap_model(model).config.params_dtype
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    chain0 = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    receiver = all_ranks or dist.get_rank() == 0
    key, local = None, {}
    for name, shape in canonical_shapes(arch).items():
        if layer_group(name) != key:  # the next layer: gather what this stage holds of it
            key = layer_group(name)
            mine = [e for e in groups.get(key, []) if _owner_stage(e.names[0], arch, pp) == stage]
            local = _gather_entries(mine, params, arch, t)
        owner = _owner_stage(name, arch, pp)
        if pp == 1:
            if receiver:
                yield name, local[name]
        elif all_ranks:
            buf = local[name].to(dtype) if owner == stage else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buf, src=ranks[owner], group=group)
            yield name, buf
        elif chain0:  # rank 0's pipeline group: TP rank 0, DP rank 0 of every stage
            if owner == stage == 0:
                if receiver:
                    yield name, local[name]
            elif owner == stage:
                dist.send(local[name].to(dtype).contiguous(), dst=ranks[0])
            elif stage == 0:
                buf = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buf, src=ranks[owner])
                if receiver:
                    yield name, buf


def write_checkpoint_from_model(model, arch: Architecture, out_dir, *, dtype: torch.dtype | None = None,
                                **kw) -> None:
    """Write the model as a canonical checkpoint from global rank 0, streaming layer by layer
    (megapuzzle.checkpoints.canonical.write_checkpoint; `kw` goes there). Collective. If rank 0's
    write fails, it still takes part in the rest of the gather, so no rank is left waiting."""
    from ..checkpoints.canonical import write_checkpoint

    items = iter_canonical_from_model(model, arch)
    if dist.get_rank() != 0:
        for _ in items:
            pass
        return
    try:
        write_checkpoint(out_dir, arch, ((n, x if dtype is None else x.to(dtype)) for n, x in items), **kw)
    except BaseException:
        for _ in items:
            pass
        raise
