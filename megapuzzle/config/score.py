"""The `score:` section: replace-1-block scoring (megapuzzle.stages.score.score)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from megapuzzle.config.rules import DTYPES, Integer, Number, OneOf, Section


@dataclass(frozen=True)
class ScoreConfig(Section):
    """The `score:` config section."""

    SECTION = "score"

    batch_size: Annotated[int, Integer()] = 8
    """Held-out sequences per batch."""
    seq_len: Annotated[int, Integer()] = 256
    """Tokens per sequence."""
    num_batches: Annotated[int, Integer()] = 4
    """Held-out batches (tokens scored = num_batches x batch_size x seq_len)."""
    top_k: Annotated[int, Integer()] = 5
    """k of the top-k overlap metric."""
    candidates_per_pass: Annotated[int, Integer()] = 8
    """Candidates of one layer stacked into one pass through the shared layers."""
    threads: Annotated[int, Integer()] | None = None
    """torch CPU threads (None: torch's choice)."""
    dtype: Annotated[str, OneOf(DTYPES)] = "float32"
    """Parent and candidate weights: float32, bfloat16, or auto (bf16 on a GPU, fp32 on CPU). The
    log-probs and KL are computed in fp32 either way."""
    cache_gb: Annotated[float, Number(gt=0)] = 16.0
    """Parent activations kept per rank, GiB: per held-out batch, the residual stream entering
    every layer (layers x tokens x hidden, in `dtype`) and the parent's fp32 log-probs (tokens x
    vocab). Batches beyond it are scored in groups, each group's parent pass computed once; the
    scores are the same (see `cache_plan`)."""
