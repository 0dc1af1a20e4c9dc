"""The embedded parent's sizes and training budget (megapuzzle.stages.parent.train_parent flavours)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from megapuzzle.arch import Architecture
from megapuzzle.config.rules import Flag, Integer, Number, Section, lr_schedule
from megapuzzle.errors import UserError


def _vocab_splits_over_tp(cfg) -> None:
    if cfg.vocab_size % 128:
        raise UserError(f"train-parent.vocab_size {cfg.vocab_size} is not a multiple of 128; pick e.g. "
                        f"{128 * math.ceil(cfg.vocab_size / 128)}")


@dataclass(frozen=True)
class ParentConfig(Section):
    """Sizes and budget of the embedded parent."""

    SECTION = "train-parent"
    CHECKS = (lr_schedule, _vocab_splits_over_tp)

    vocab_size: Annotated[int, Integer(ge=128)] = 4096
    """Sentencepiece BPE vocabulary (a multiple of 128 so TP can split it)."""
    hidden_size: Annotated[int, Integer()] = 256
    """Residual width (8M parameters in all: trains in minutes on 2 CPU cores)."""
    num_layers: Annotated[int, Integer()] = 6
    """Decoder layers."""
    num_attention_heads: Annotated[int, Integer()] = 8
    """Query heads (head dim 32)."""
    num_kv_heads: Annotated[int, Integer()] = 4
    """GQA KV heads; leaves 2 and 1 as reduced-KV variants for Puzzle."""
    intermediate_size: Annotated[int, Integer()] = 1024
    """SwiGLU width (ffn_mult 6.0): variants 768, 512, 256 at the 256 granularity, all
    writable as ffn_mult, so every child stays loadable by TensorRT-LLM and vLLM."""
    seq_len: Annotated[int, Integer()] = 256
    """Training sequence length."""
    batch_size: Annotated[int, Integer()] = 8
    """Global batch in sequences."""
    steps: Annotated[int, Integer()] = 240
    """Optimizer steps (tokens = steps x batch x seq_len)."""
    lr: Annotated[float, Number(gt=0)] = 3e-3
    """Peak learning rate."""
    min_lr: Annotated[float, Number(ge=0)] = 3e-4
    """Cosine floor."""
    warmup_steps: Annotated[int, Integer(ge=0)] = 20
    """Linear warmup steps."""
    weight_decay: Annotated[float, Number(ge=0)] = 0.1
    """AdamW weight decay (not on norms)."""
    grad_clip: Annotated[float, Number(ge=0)] = 1.0
    """Global gradient-norm clip."""
    seed: int = 1234
    """Seeds data order, init and tokenizer sampling."""
    checkpoint_every: Annotated[int, Integer()] = 40
    """Save resumable state every N steps."""
    log_every: Annotated[int, Integer()] = 10
    """Console line every N steps."""
    eval_batches: Annotated[int, Integer(ge=0)] = 24
    """Held-out batches (of batch_size x seq_len) for the final loss; 0 = the whole split."""
    max_files: Annotated[int, Integer(ge=0)] = 0
    """Use only the first N corpus files (0 = all); the debug flavour's shortcut."""
    tie_word_embeddings: Annotated[bool, Flag()] = False
    """Share input and output embeddings (Llama-3 8B+ do not)."""
    rope_theta: Annotated[float, Number(gt=0)] = 10000.0
    """RoPE base."""
    corpus: str = "stdlib"
    """"stdlib" (the running Python's own source, the default) or a directory of text files
    (.txt/.md/.rst/.py, recursively, e.g. Debian python3-doc's /usr/share/doc/python3-doc/html/_sources);
    a directory's files go to held-out by their relative path (~2%, megapuzzle.data.corpus)."""

    def architecture(self, bos: int | None = None, eos: int | None = None) -> Architecture:
        return Architecture.homogeneous(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads, num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=max(2048, self.seq_len),
            rope_theta=self.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=bos, eos_token_id=eos)
