"""Build Megatron-core's GPTModel for an Architecture, its layers from the block kinds' modules."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import torch

from ..arch import Architecture
from ..runtime.cpu_compat import apply_cpu_compat
from .config import (
    ModelConfigError,
    ModelOptions,
    check_fp8,
    llama3_inv_freq,
    make_transformer_config,
    resolve_use_te,
    rope_kind,
)


def build_gpt_model(arch: Architecture, *, tp: int | None = None, pp: int | None = None,
                    pre_process: bool | None = None, post_process: bool | None = None,
                    params_dtype: torch.dtype = torch.float32, use_te: bool | None = None,
                    fp8: bool = False, options: ModelOptions | None = None):
    """megatron.core.models.gpt.GPTModel for `arch` on this rank's TP/PP slot.

    tp / pp default to (and must agree with) Megatron's parallel_state; pre_process /
    post_process default to "first / last pipeline stage". `options` carries the rarer knobs
    (its params_dtype/use_te/fp8 are overridden by the explicit arguments). On CPU the local
    (non-TE) spec, CPU initialisation and the cpu_compat bridges are used.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from .layer_specs import decoder_block_spec

    if not ps.model_parallel_is_initialized():
        raise ModelConfigError("Megatron parallel state is not initialised; call "
                               "megapuzzle.runtime.init_distributed(tp, pp) first")
    state_tp = ps.get_tensor_model_parallel_world_size()
    state_pp = ps.get_pipeline_model_parallel_world_size()
    tp = state_tp if tp is None else tp
    pp = state_pp if pp is None else pp
    arch.validate_tensor_parallel(tp)  # one-line ArchitectureError before Megatron asserts
    if (tp, pp) != (state_tp, state_pp):
        raise ModelConfigError(f"asked for tp={tp} pp={pp} but parallel_state was initialised with "
                               f"tp={state_tp} pp={state_pp}; pass matching sizes to init_distributed")
    opts = replace(options or ModelOptions(), params_dtype=params_dtype, use_te=use_te, fp8=fp8)
    te = resolve_use_te(opts.use_te)
    check_fp8(opts.fp8, te)
    if not torch.cuda.is_available():
        apply_cpu_compat()
    opts = replace(opts, use_te=te)
    config = make_transformer_config(arch, tp, pp, opts)

    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=True)

    # each layer from its two kinds' modules (no-op: IdentityOp, no norm; linear: norm +
    # ColumnParallelLinearGathered; GQA / MLP: the standard local or TE modules), this PP stage's only
    spec = decoder_block_spec(arch, config, use_te=te)

    kind = rope_kind(arch)
    scaling = arch.rope_scaling or {}
    with quiet_unknown_mlp():
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,  # forward_logits gathers the vocab shards itself
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            rope_scaling=kind == "llama3",
            rope_scaling_factor=float(scaling.get("factor", 8.0)) if kind == "llama3" else 8.0,
            seq_len_interpolation_factor=float(scaling["factor"]) if kind == "linear" else None,
        )
    mark_tensor_parallel_weights(model)
    if kind == "llama3":
        # Megatron's llama3 scaling fixes low/high_freq_factor and the original context at the
        # Llama-3.1 values; use the HF formula with this config's own values.
        model.rotary_pos_emb.inv_freq = llama3_inv_freq(arch).to(model.rotary_pos_emb.inv_freq.device)
    if params_dtype != torch.float32:
        # Megatron's local-spec norms (WrappedTorchNorm) ignore params_dtype and stay fp32;
        # Megatron-LM casts the whole model (Float16Module) and so do we, so every parameter
        # and every canonical tensor has one dtype. (inv_freq is no buffer: RoPE stays fp32.)
        model.to(dtype=params_dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.megapuzzle_arch = arch  # the Architecture this model was built from (weights.py reads it)
    return model


def mark_tensor_parallel_weights(module: torch.nn.Module) -> None:
    """Set Megatron's `tensor_model_parallel` / `partition_dim` on TP-split weights.

    Megatron sets them only while it initialises a weight; with perform_initialization=False
    (weights loaded right after) they stay unset and Megatron's grad-norm / clipping code then
    treats split weights as replicated. The split is a property of the layer type, so restore it."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for m in module.modules():
        dim = 0 if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)) else \
            1 if isinstance(m, RowParallelLinear) else None
        w = getattr(m, "weight", None)
        if dim is not None and isinstance(w, torch.nn.Parameter) and not getattr(w, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(w, True, dim, 1)


class _DropUnknownMLP(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith("Unknown MLP type")


@contextlib.contextmanager
def quiet_unknown_mlp():
    """TransformerLayer logs "Unknown MLP type ... Using default kwargs" for every linear / no-op
    FFN of the heterogeneous spec; default kwargs are exactly right for those, so drop it."""
    lg = logging.getLogger("megatron.core.transformer.transformer_layer")
    f = _DropUnknownMLP()
    lg.addFilter(f)
    try:
        yield
    finally:
        lg.removeFilter(f)


def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module style wrappers (`.module` chains)."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def fp8_autocast(model_or_config):
    """Context manager running FP8 GEMMs when the model was built with fp8=True, else a no-op.

    GPTModel.forward already enters it inside TransformerBlock; use this when calling layers
    directly (BLD / scoring run single `decoder.layers[j]`).
    """
    config = getattr(unwrap_model(model_or_config), "config", model_or_config)
    if not getattr(config, "fp8", None):
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config)


def count_parameters(model) -> int:
    """Parameters of this rank's model shard (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in unwrap_model(model).parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
