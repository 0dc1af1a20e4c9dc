"""TransformerEngine and FP8 on one GPU: the TE layer spec computes the local spec's logits
within bf16 tolerance, and FP8 (delayed and current scaling) stays within a stated tolerance of
bf16, on a heterogeneous model using every block kind."""

from __future__ import annotations

import pytest
import torch
from megapuzzle.arch import Architecture, LayerArch
from megapuzzle.arch import AttentionVariant as A
from megapuzzle.arch import FFNVariant as F

from _gpu import dist1, requires_fp8, requires_te  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("dist1")]

# FP8 GEMMs need dims that are multiples of 16: hidden 256, head_dim 32, FFN sizes / 16.
LAYERS = (
    LayerArch(A("gqa", 4), F("mlp", 512)),
    LayerArch(A("gqa", 2), F("mlp", 256)),
    LayerArch(A("linear"), F("linear")),
    LayerArch(A("no_op"), F("mlp", 768)),
    LayerArch(A("gqa", 1), F("no_op")),
    LayerArch(A("gqa", 8), F("mlp", 1024)),
)
ARCH = Architecture(vocab_size=1024, hidden_size=256, num_attention_heads=8, layers=LAYERS,
                    max_position_embeddings=512)
BF16_REL = 2e-2   # TE vs local spec, both bf16: relative L2 error of the logits
FP8_REL = 0.10    # FP8 vs bf16 (TE): relative L2 error of the logits
FP8_TOP1 = 0.90   # FP8 vs bf16: next-token argmax agreement


def _logits(use_te: bool, fp8: bool = False, recipe: str = "delayed") -> torch.Tensor:
    from megapuzzle.costs.timing import _FP8_RECIPES
    from megapuzzle.model import (
        ModelOptions,
        build_gpt_model,
        forward_logits,
        init_random_canonical,
        load_canonical_into_model,
    )

    tensors = init_random_canonical(ARCH, seed=7, std=0.02, norm_std=0.1)
    extra = {"fp8_recipe": _FP8_RECIPES[recipe]} if fp8 else {}
    model = build_gpt_model(ARCH, params_dtype=torch.bfloat16, use_te=use_te, fp8=fp8,
                            options=ModelOptions(perform_initialization=False, extra=extra))
    load_canonical_into_model(model, tensors, ARCH)
    model.eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, ARCH.vocab_size, (4, 128), generator=g)
    with torch.no_grad():
        for _ in range(3 if fp8 else 1):  # delayed scaling needs a few steps of amax history
            out = forward_logits(model, tokens)
    return out.float().cpu()


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@requires_te
def test_te_spec_matches_local_spec():
    local, te = _logits(use_te=False), _logits(use_te=True)
    rel = _rel(te, local)
    agree = (te.argmax(-1) == local.argmax(-1)).float().mean().item()
    print(f"TE vs local (bf16): relative L2 {rel:.2e}, top-1 agreement {agree:.4f}")
    assert rel < BF16_REL and agree > 0.97


@requires_fp8
@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_forward_is_close_to_bf16(recipe):
    bf16, fp8 = _logits(use_te=True), _logits(use_te=True, fp8=True, recipe=recipe)
    assert torch.isfinite(fp8).all()
    rel = _rel(fp8, bf16)
    agree = (fp8.argmax(-1) == bf16.argmax(-1)).float().mean().item()
    print(f"FP8 ({recipe}) vs bf16: relative L2 {rel:.3e}, top-1 agreement {agree:.4f}")
    assert 0 < rel < FP8_REL and agree > FP8_TOP1
