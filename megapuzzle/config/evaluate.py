"""The `evaluate:` section: parent vs child quality and measured speed (megapuzzle.stages.evaluate.evaluate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from megapuzzle.config.rules import DTYPES, Flag, Integer, OneOf, Section
from megapuzzle.errors import UserError


def _vllm_whole_models(cfg) -> None:
    """vLLM times whole models in one process: not with TP x PP > 1."""
    if cfg.vllm and cfg.tensor_parallel * cfg.pipeline_parallel > 1:
        raise UserError(f"evaluate.vllm times whole models in vLLM; set it false or tensor_parallel = "
                        f"pipeline_parallel = 1 (got {cfg.tensor_parallel} x {cfg.pipeline_parallel})")


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """The `evaluate:` config section."""

    SECTION = "evaluate"
    CHECKS = (_vllm_whole_models,)

    batch_size: Annotated[int, Integer()] | None = None
    """Sequences generated together when timing (None: the MIP's chosen batch size, else 1)."""
    prefill_len: Annotated[int, Integer()] | None = None
    """Prompt tokens per sequence when timing (None: the MIP's, else 128)."""
    gen_len: Annotated[int, Integer()] | None = None
    """Generated tokens per sequence when timing (None: the MIP's, else 64)."""
    repeats: Annotated[int, Integer()] = 1
    """Timed generations per model and round."""
    warmup: Annotated[int, Integer(ge=0)] = 1
    """Untimed generations before each timing."""
    rounds: Annotated[int, Integer()] = 8
    """Parent/child timing rounds in ABBA order. The measured speedup is the median over the
    rounds x repeats generations of parent time / child time, each pair taken seconds apart, so
    machine drift (a shared host's clock speed moved the parent's time by 40% within a minute
    here) cancels as in the cost measurement's paired differences."""
    threads: Annotated[int, Integer()] | None = None
    """torch threads while timing (None: what costs.json was measured with)."""
    dtype: Annotated[str, OneOf(DTYPES)] | None = None
    """Timing dtype: auto, float32 or bfloat16 (None: costs.json's)."""
    quality_batch_size: Annotated[int, Integer()] = 8
    """Held-out sequences per quality batch."""
    seq_len: Annotated[int, Integer()] = 256
    """Held-out tokens per sequence."""
    eval_batches: Annotated[int, Integer(ge=0)] = 8
    """Held-out batches for the quality metrics (0 = the whole split)."""
    quality_dtype: Annotated[str, OneOf(DTYPES)] = "float32"
    """Weights of the quality models: float32, bfloat16, or auto (bf16 on a GPU, fp32 on CPU);
    log-probs and KL are computed in fp32 either way."""
    tensor_parallel: Annotated[int, Integer()] = 1
    """TP size of parent and child (quality and timing); must divide every layer's KV heads.
    `megapuzzle run` launches evaluate under torchrun when TP x PP > 1."""
    pipeline_parallel: Annotated[int, Integer()] = 1
    """PP size: each rank builds and reads only its stage's layers of both models, and the timed
    generation passes through the stages in turn (world = TP x PP x DP processes)."""
    vllm: Annotated[bool, Flag()] | None = None
    """Also time parent and child in vLLM (its own environment; `rounds` ABBA rounds, random
    weights). None: when costs.json was measured in vLLM, so the MIP's engine is always timed."""
