"""A parent *family*: what the whole model shares around its layers (the subblock kinds are
megapuzzle.blocks). It owns the HF names of the tensors outside the layers, which HF model types
it reads, how an HF config of it is checked, the Megatron TransformerConfig fields that make the
family's computation, and whether the HF DeciLM export can represent it. Torch-free at import."""

from __future__ import annotations

from typing import Any


class Family:
    name: str = ""
    """`Architecture.family` value (arch.json's `family`, absent for the default family)."""
    hf_model_types: tuple[str, ...] = ()
    """HF `model_type`s whose checkpoints compute exactly this family (import-hf reads only these)."""
    embed_name = "model.embed_tokens.weight"
    final_norm_name = "model.norm.weight"
    lm_head_name = "lm_head.weight"
    decilm: bool = False
    """The HF DeciLM (`nemotron-nas`) export can represent it."""

    def outer_shapes(self, arch) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """Canonical tensors before the layers and after them, with their shapes."""
        h = arch.hidden_size
        after = {self.final_norm_name: (h,)}
        if not arch.tie_word_embeddings:
            after[self.lm_head_name] = (arch.vocab_size, h)
        return {self.embed_name: (arch.vocab_size, h)}, after

    def hf_config_problem(self, cfg: dict) -> str | None:
        """Why an HF config.json is not this family's computation (None: it is)."""
        return None

    def transformer_config_kwargs(self, arch) -> dict[str, Any]:
        """Megatron TransformerConfig fields that make this family's computation (torch imported lazily)."""
        return {}
