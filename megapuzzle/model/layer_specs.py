"""Megatron-core layer specs from the block kinds: each layer's TransformerLayer is its attention
kind's and its FFN kind's modules (`BlockKind.megatron_spec`, megapuzzle/blocks), so a new kind plugs
its own module in with no change here. The one place that assembles layers, for the GPTModel
(`decoder_block_spec`) and for BLD's / scoring's one-layer blocks (`layer_spec`).

Megatron-core's per-layer TransformerConfig (HeterogeneousTransformerConfig.get_config_for_layer:
KV groups, FFN width, a kind's `megatron_layer_overrides`) is unchanged; only the modules are
ours. Until this existed Megatron's own `get_gpt_heterogeneous_layer_spec` built them, knowing the
DeciLM kinds only; tests/test_layer_specs.py holds the models to bitwise what it built.
"""

from __future__ import annotations

from ..arch import Architecture


def layer_spec(arch: Architecture, index: int, config, use_te: bool):
    """The TransformerLayer ModuleSpec of layer `index` (global, 0-based) of `arch`; `config` is
    the model's HeterogeneousTransformerConfig (megapuzzle.model.config.make_transformer_config)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    la = arch.layers[index]
    layer_config = config.get_config_for_layer(index + 1)  # Megatron numbers layers from 1
    a = la.attention.kind_spec.megatron_spec(arch, la.attention, layer_config, use_te)
    f = la.ffn.kind_spec.megatron_spec(arch, la.ffn, layer_config, use_te)
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=a.norm, self_attention=a.module, self_attn_bda=a.bda,
        pre_mlp_layernorm=f.norm, mlp=f.module, mlp_bda=f.bda,
        sharded_state_dict_keys_map={**a.keys_map, **f.keys_map}))


def decoder_block_spec(arch: Architecture, config, use_te: bool):
    """TransformerBlockSubmodules for this pipeline stage's layers (Megatron's own split of
    `config`, as TransformerBlock numbers them) and the family's final norm."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from ..blocks.megatron_modules import norm_class

    offset = get_transformer_layer_offset(config)
    layers = [layer_spec(arch, offset + j, config, use_te) for j in range(get_num_layers_to_build(config))]
    return TransformerBlockSubmodules(layers, layer_norm=norm_class(config, use_te))
