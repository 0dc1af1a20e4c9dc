"""The frozen parent's forward in distillation (GKD), through `megapuzzle.model.runner.StageRunner`.

For tokens [b, s] in micro-batches: this pipeline stage's layer outputs per micro-batch and, on the
last stage, the final hidden state (after the final norm; the output layer does not run: the loss
applies it, megapuzzle.train.vocab_kd) per micro-batch. The same modules run the same ops on the
same shapes as `GPTModel.forward` with forward hooks and the output layer off, so the tensors are
bitwise those (tests/test_gkd_parent_pass.py).

Under PP every stage calls it with the same tokens: micro-batch by micro-batch, a stage receives
its input from the previous stage (the first embeds), runs its layers and sends the result on.
Each stage only ever waits on the one before it, so the chain cannot deadlock, and nothing but the
boundary stream [s, mb, h] crosses stages.
"""

from __future__ import annotations

import torch

from megapuzzle.model.runner import StageRunner

StagePass = tuple[dict[int, list[torch.Tensor]], list[torch.Tensor]]
"""(this stage's layer outputs per micro-batch by global layer index, the last stage's final hidden
states per micro-batch)."""


@torch.no_grad()
def parent_pass(model, tokens: torch.Tensor, micro: int) -> StagePass:
    """(this stage's layer outputs {global layer index: [s, mb, h] per micro-batch}, the last stage's
    final hidden state [s, mb, h] per micro-batch; [] on other stages) for `tokens` [b, s] in
    micro-batches of `micro` rows. Every stage of the pipeline calls it with the same tokens."""
    if tokens.shape[0] % micro:
        raise ValueError(f"batch size {tokens.shape[0]} is not a multiple of the micro-batch size {micro}")
    run = StageRunner(model)
    hidden: dict[int, list[torch.Tensor]] = {}
    final: list[torch.Tensor] = []

    def keep(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        hidden.setdefault(i, []).append(y)

    for t in tokens.split(micro):
        h = run.stage_input(t)
        h = run.layers_from(h, run.rotary(h), on_layer=keep)
        if run.is_last:
            final.append(run.final_norm(h))
        else:
            run.send(h)
    return hidden, final
