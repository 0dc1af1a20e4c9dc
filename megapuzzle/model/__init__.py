"""Heterogeneous Megatron-core GPTModel from an Architecture, canonical weights, forward helpers."""

from .config import (
    ModelConfigError,
    ModelOptions,
    llama3_inv_freq,
    make_transformer_config,
    pipeline_split,
    stage_layer_ranges,
)
from .forward import capture_layer_inputs, forward_hidden_states, forward_logits
from .gpt import build_gpt_model, count_parameters, fp8_autocast, unwrap_model
from .weights import (
    WeightsError,
    canonical_shapes,
    check_canonical,
    gather_canonical_from_model,
    init_random_canonical,
    iter_canonical_from_model,
    load_canonical_into_model,
    write_checkpoint_from_model,
)

__all__ = [
    "ModelConfigError", "ModelOptions", "llama3_inv_freq", "make_transformer_config", "pipeline_split",
    "stage_layer_ranges", "capture_layer_inputs", "forward_hidden_states", "forward_logits",
    "build_gpt_model", "count_parameters", "fp8_autocast", "unwrap_model", "WeightsError",
    "canonical_shapes", "check_canonical", "gather_canonical_from_model", "init_random_canonical",
    "load_canonical_into_model", "iter_canonical_from_model", "write_checkpoint_from_model",
]
