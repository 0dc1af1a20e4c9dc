"""BLD's Megatron-core pieces: the teacher forward and the student blocks.

Teacher: the parent GPTModel (TP / PP-sharded like any Megatron model), run through
megapuzzle.model.runner.StageRunner, the layer-by-layer runner score and evaluate use. One forward
per batch runs the embedding (first stage; later stages receive the previous stage's hidden state
through megapuzzle.stages.bld.pp_relay's relay, which also carries the streams of fused-run blocks
that start on an earlier stage) and this stage's decoder layers up to the deepest layer this rank
trains (all of them when a later stage needs the boundary state, which is then sent on). It keeps
per layer the residual stream entering it (x) and leaving it (y), both from the runner's
`on_layer`, and after its attention (m, the input of `pre_mlp_layernorm`, from a forward pre-hook:
the runner sees a layer only from outside). No logits: BLD never needs them.

Students: each block is a Megatron-core `TransformerLayer`, built from its kinds' modules for a
1-layer architecture by the layer spec the parent's layers come from (megapuzzle.model.layer_specs,
so TP shards it exactly as it shards the parent) and fed the teacher's RoPE table (same RoPE,
llama3 scaling included). With fp8 they are built with FP8 GEMMs (TransformerEngine spec) and run
under Megatron's fp8 autocast with a TP-only amax reduction (the ranks of a TP group run the same
students; DP ranks do not):

* attention variant (decoupled): TransformerLayer(variant attention, no-op FFN) whose FFN
  slots (`pre_mlp_layernorm`, `mlp`, `mlp_bda`) are the teacher's own modules for that layer,
  frozen (requires_grad False) and shared, not copied. It runs on x; gradients flow through
  the frozen FFN into the attention only.
* FFN variant (decoupled): TransformerLayer(no-op attention, variant FFN) run on m. The frozen
  parent attention in front of it is deterministic and identical to the teacher's, so its
  output (m) is taken from the teacher forward instead of being recomputed per variant.
* coupled (attention, FFN) pair: TransformerLayer(variant attention, variant FFN) on x.

In every case the block's layer output is compared with the teacher's y, and the canonical
<-> Megatron mapping is megapuzzle.model.weights' own (its private per-layer plan, reused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megapuzzle.arch import Architecture, LayerArch, empty_layer
from megapuzzle.model.config import ModelOptions, make_transformer_config, resolve_use_te
from megapuzzle.model.gpt import fp8_autocast, mark_tensor_parallel_weights, quiet_unknown_mlp, unwrap_model
from megapuzzle.model.layer_specs import layer_spec
from megapuzzle.model.runner import StageRunner
from megapuzzle.model.weights import (
    WeightsError,
    layer_param_plan,
    local_tp_shard,
    tp_rank_and_size,
    tp_all_gather,
    split_qkv,
)

NO_ATTN, NO_FFN = empty_layer().attention, empty_layer().ffn
MEGATRON_PREFIX = "decoder.layers.0."  # the names weights.layer_param_plan expects for local layer 0


# ----------------------------------------------------------------------------- teacher

@dataclass
class TeacherOutputs:
    """Residual streams of one batch, Megatron layout [s, b, h], keyed by global layer index."""

    x: dict[int, torch.Tensor]
    """Input of each layer."""
    m: dict[int, torch.Tensor]
    """After the layer's attention (input of its pre-MLP norm); only for the layers asked for."""
    y: dict[int, torch.Tensor]
    """Output of each layer."""
    rotary: torch.Tensor | None
    """The parent's RoPE table for this sequence length (None without RoPE)."""


class Teacher:
    """The frozen parent; `forward(tokens)` captures x / m / y of the layers BLD needs."""

    def __init__(self, model, layers: set[int], mid_layers: set[int], relay=None):
        """`layers`: record x / y there; `mid_layers`: also m. `relay` (PP > 1): a
        megapuzzle.stages.bld.pp_relay.PipelineRelay that receives this stage's input (non-first stages)
        and sends its output on (while a later stage needs it)."""
        self.model = unwrap_model(model)
        self.runner = StageRunner(self.model)  # embedding, RoPE table, layers: as score runs them
        self.relay = relay
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.layers, self.mid_layers = set(layers), set(mid_layers)
        self._mid: dict[int, torch.Tensor] | None = None
        # The stage's layers up to the deepest one recorded, or all of them when the output goes on.
        self.send = relay is not None and relay.send_next
        self.stop = self.runner.stop if self.send else max(self.layers | self.mid_layers, default=-1) + 1
        # A pre-hook on pre_mlp_layernorm sees exactly the residual after attention. Students
        # share these modules (attention variants run the frozen parent FFN), so the hook only
        # records while the teacher itself is running.
        for i in self.mid_layers & set(self.runner.layers):  # a run block's first layer may be an earlier stage's
            self.runner.layers[i].pre_mlp_layernorm.register_forward_pre_hook(self._hook(i))

    def _hook(self, i: int):
        def pre(mod, args):
            if self._mid is not None:
                self._mid[i] = args[0].detach()
        return pre

    def layer(self, i: int):
        return self.runner.layers[i]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> TeacherOutputs:
        h, carried = self._stage_input(tokens)
        out = TeacherOutputs({}, {}, {}, self.runner.rotary(h))  # RoPE on every stage: computed locally
        for i, (x, mid) in carried.items():
            out.x[i], out.m[i] = x, mid

        def keep(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
            if i in self.layers:
                out.x[i], out.y[i] = x, y

        self._mid = out.m
        try:
            h = self.runner.layers_from(h, out.rotary, stop=self.stop, on_layer=keep)
        finally:
            self._mid = None
        if self.send:
            self.relay.send(h)
            for i in self.relay.role.carry_out:
                self.relay.send(out.x[i])
                self.relay.send(out.m[i])
        return out

    def _stage_input(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The stream into this stage ([s, b, h]) and the carried (x, m) of earlier stages' layers."""
        if self.runner.is_first:  # first pipeline stage (or no PP): embed, TP-reduced
            return self.runner.embed(tokens), {}
        # the previous stage's boundary hidden state, then the streams carried for run blocks
        h = self.relay.recv(tokens.shape[1], tokens.shape[0])
        return h, self.relay.recv_carry(tokens.shape[1], tokens.shape[0])


# ----------------------------------------------------------------------------- students

def one_layer_arch(parent: Architecture, la: LayerArch) -> Architecture:
    return parent.with_layers([la])


def build_layer(arch1: Architecture, tp: int, fp8_recipe: str | None = None,
                params_dtype: torch.dtype = torch.float32):
    """A Megatron-core TransformerLayer for the single layer of `arch1`, from its kinds' modules
    (local spec on CPU, TE spec where TE and CUDA are present).
    `fp8_recipe` ("delayed" | "current"): FP8 GEMMs (needs TE and an sm >= 89 GPU)."""
    from megatron.core.transformer.spec_utils import build_module

    te = resolve_use_te(None)
    # weights are loaded right after, so skip Megatron's random init
    opts = ModelOptions(perform_initialization=False, use_te=te, params_dtype=params_dtype)
    if fp8_recipe is not None:
        from megapuzzle.costs.timing import _FP8_RECIPES  # our recipe name -> Megatron's fp8_recipe

        # amax reduced over the TP group only: data-parallel ranks train other blocks
        opts = ModelOptions(perform_initialization=False, use_te=te, fp8=True, params_dtype=params_dtype,
                            extra={"fp8_recipe": _FP8_RECIPES[fp8_recipe], "tp_only_amax_red": True})
    config = make_transformer_config(arch1, tp, 1, opts)
    spec = layer_spec(arch1, 0, config, use_te=te)
    with quiet_unknown_mlp():
        layer = build_module(spec, config=config.get_config_for_layer(1), layer_number=1)
    mark_tensor_parallel_weights(layer)
    if params_dtype != torch.float32:
        layer.to(dtype=params_dtype)  # local-spec norms ignore params_dtype (as in build_gpt_model)
    if torch.cuda.is_available():
        layer.cuda(torch.cuda.current_device())
    return layer


class StudentBlock(torch.nn.Module):
    """One BLD block: a TransformerLayer plus the bookkeeping to load / gather its canonical tensors.

    `own` is the (attention, FFN) pair whose weights the block owns and trains (the other
    slot is no-op in `own`); `layer_arch` is what it computes (own + frozen parent parts).
    """

    def __init__(self, key: str, kind: str, layer_index: int, parent: Architecture, variant: LayerArch,
                 teacher: Teacher | None, tp: int, fp8_recipe: str | None = None,
                 params_dtype: torch.dtype = torch.float32, last: int | None = None):
        """`kind` attention | ffn | layer; `teacher` is needed only for attention blocks (their
        frozen FFN is the teacher's). kind "layer" with a full LayerArch builds and loads the
        whole layer (scoring uses that for any block plus the parent's other subblock).
        `fp8_recipe`: build with FP8 GEMMs and run forward under fp8 autocast (see build_layer).
        `params_dtype`: the layer's parameter dtype (the teacher's, for attention blocks).
        `last`: a fused-run block's last layer (its target is the parent's output there)."""
        super().__init__()
        self.key, self.kind, self.layer_index = key, kind, layer_index
        self.last = layer_index if last is None else last
        self.variant = variant
        if kind == "attention":
            self.own = LayerArch(variant.attention, NO_FFN)
        elif kind == "ffn":
            self.own = LayerArch(NO_ATTN, variant.ffn)
        else:
            self.own = variant
        self.arch1 = one_layer_arch(parent, self.own)
        self.layer = build_layer(self.arch1, tp, fp8_recipe, params_dtype)
        if kind == "attention":
            if teacher is None:
                raise ValueError(f"{key}: an attention block needs the teacher (its frozen parent FFN)")
            t = teacher.layer(layer_index)
            for name in ("pre_mlp_layernorm", "mlp", "mlp_bda"):
                delattr(self.layer, name)  # the frozen parent FFN, shared with the teacher
                setattr(self.layer, name, getattr(t, name))
        params = {MEGATRON_PREFIX + n: p for n, p in self.layer.named_parameters()}
        self.entries = layer_param_plan(params, 0, layer_index, self.own.attention, self.own.ffn)
        owned = {e.param for e in self.entries}
        for n, p in params.items():
            if n not in owned and p.requires_grad:
                raise WeightsError(f"{key}: parameter {n} has no canonical source; not a BLD block layout")
        self.owned = {e.param[len(MEGATRON_PREFIX):]: params[e.param] for e in self.entries}
        # TP-split or replicated, from the weight plan: Megatron sets `tensor_model_parallel`
        # only when it initialises the weight, and students skip that init.
        self.sharded = {e.param[len(MEGATRON_PREFIX):]: e.kind != "rep" for e in self.entries}

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """This block's own parameters by Megatron name (empty for no-op blocks)."""
        return dict(self.owned)

    def forward(self, t: TeacherOutputs) -> torch.Tensor:
        """The block's layer output [s, b, h] for the teacher's streams of one batch."""
        i = self.layer_index
        inp = t.m[i] if self.kind == "ffn" else t.x[i]
        with fp8_autocast(self.layer.config):  # no-op unless built with fp8; backward needs no autocast
            out, _ = self.layer(hidden_states=inp, attention_mask=None, rotary_pos_emb=t.rotary)
        return out

    # -- canonical <-> Megatron (same plan as weights.py, one layer)
    def load_canonical(self, local: Mapping[str, torch.Tensor]) -> None:
        """Load layer-local canonical tensors of the owned subblock(s) into this TP shard."""
        from megapuzzle.init import with_layer_prefix

        full = with_layer_prefix(local, self.layer_index)
        r, t = tp_rank_and_size()
        want = {n for e in self.entries for n in e.names}
        if set(full) != want:
            raise WeightsError(f"{self.key}: block tensors {sorted(full)} do not match {sorted(want)}")
        with torch.no_grad():
            for e in self.entries:
                p = self.owned[e.param[len(MEGATRON_PREFIX):]]
                shard = local_tp_shard(e, [full[n] for n in e.names], self.arch1, r, t)
                if tuple(shard.shape) != tuple(p.shape):
                    raise WeightsError(f"{self.key}: {e.names[0]} shard {list(shard.shape)} vs parameter "
                                       f"{list(p.shape)}")
                p.copy_(shard.to(device=p.device, dtype=p.dtype))

    def gather_canonical(self) -> dict[str, torch.Tensor]:
        """Full layer-local canonical tensors of the owned subblock(s) (TP all-gather: collective)."""
        _, t = tp_rank_and_size()
        pre = f"model.layers.{self.layer_index}."
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for e in self.entries:
                x = self.owned[e.param[len(MEGATRON_PREFIX):]].detach()
                if e.kind == "rep":
                    out[e.names[0]] = x.clone()
                elif e.kind in ("dim0", "dim1"):
                    out[e.names[0]] = tp_all_gather(x, 0 if e.kind == "dim0" else 1)
                elif e.kind == "qkv":
                    q, k, v = split_qkv(tp_all_gather(x, 0), self.arch1.num_attention_heads, e.num_kv)
                    out.update(zip(e.names, (q.contiguous(), k.contiguous(), v.contiguous())))
                elif e.kind == "fc1":
                    parts = tp_all_gather(x, 0).chunk(t, dim=0)
                    out[e.names[0]] = torch.cat([p.chunk(2, dim=0)[0] for p in parts], dim=0)
                    out[e.names[1]] = torch.cat([p.chunk(2, dim=0)[1] for p in parts], dim=0)
        return {k[len(pre):]: v.cpu() for k, v in out.items()}
