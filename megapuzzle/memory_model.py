"""Per-rank memory of each stage at 8B-405B, scaled from the measured bytes of benchmarks/bench_memory.py.

    from megapuzzle.memory_model import MemoryModel
    mm = MemoryModel.from_results()                 # benchmarks/results/memory*.json
    mm.predict("score", owned=16e9)                 # -> Prediction(host=..., gpu=..., ...)

The benchmark runs every stage's real command on a random Llama (CPU, so everything the rank holds is in
its RSS) and records, per rank: `baseline` (ru_maxrss before the command: interpreter, torch, Megatron),
`peak`, and `owned` (the rank's share of each model's weights in their dtype, plus, for the training
stages, the optimizer state of its trainable parameters). From those rows:

    k_stage   = max over the stage's rows of (peak - baseline) / owned       (bytes added per owned byte)
    fixed     = max baseline                                                  (bytes before any weight)

taken from the largest shape the stage was measured at (the 1.24B `1b` shape; GKD at the 0.62B `mid`
shape, its fp32 state at `1b` does not fit the benchmark machine). A smaller shape's fixed costs weigh
more per owned byte, so the max errs high. import-hf / realize / export-hf are one process each,
owned = one shard + the largest tensor. GKD is measured in fp32 with local AdamW (owned = parent,
child, grads, two moments) and applied to the recipes' bf16 + fp32-master layout byte for byte. The
streamed FP8 export (`export-fp8`) comes from benchmarks/bench_fp8_export.py (memory_fp8_export.json):
owned = one layer in fp32 + one output shard + the embedding in fp32; its calibration hidden states
are activations (arithmetic, held once).

Scaling to a recipe (`Prediction`):

* host RSS per rank = fixed + k x owned: the whole measured footprint, as if the rank ran on CPU. On a
  GPU the weights, state and activations move to the device and the host keeps less, so this bounds it;
  it must fit the rank's share of the node's host memory (2 TB / 8 GPUs on a DGX H100);
* GPU memory per rank = k x owned + activations + CUDA reserve. The activations are arithmetic (the
  benchmark runs 32-token batches, whose activations are noise next to the weights), named per stage
  in tests/test_examples.py (GKD's in `gkd_activation_bytes`: recompute, 1F1B, the parent's stash);
  the reserve (CUDA context, NCCL and allocator slack) is a fixed 4 GiB.

Everything here is plain arithmetic on the JSON files; tests/test_examples.py applies it to the
H100 recipes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
H100_BYTES = 80e9
DGX_H100_HOST_BYTES = 2e12
GPUS_PER_NODE = 8
CUDA_RESERVE = 4 * GiB
TRAINED_PARAM_BYTES = 20  # bf16 param + grad, fp32 master + main grad + 2 AdamW moments (BLD, GKD)
IO_STAGES = ("import-hf", "realize", "export-hf")


@dataclass(frozen=True)
class Coefficient:
    stage: str
    k: float
    """Bytes added per owned byte (max over the stage's measured rows at `shape`)."""
    fixed: float
    """Bytes before the command (max measured baseline)."""
    shape: str
    """The benchmark shape the figures come from."""
    rows: int


@dataclass(frozen=True)
class Prediction:
    stage: str
    owned: float
    host: float
    gpu: float | None
    activations: float

    def fits(self, gpu_bytes: float = H100_BYTES, host_bytes: float = DGX_H100_HOST_BYTES / GPUS_PER_NODE) -> bool:
        return self.host <= host_bytes and (self.gpu is None or self.gpu <= gpu_bytes)

    def __str__(self) -> str:
        g = "-" if self.gpu is None else f"{self.gpu / 1e9:.1f} GB"
        return (f"{self.stage}: owned {self.owned / 1e9:.1f} GB, GPU {g} (activations {self.activations / 1e9:.1f} GB), "
                f"host {self.host / 1e9:.1f} GB")


class MemoryModel:
    def __init__(self, coefficients: dict[str, Coefficient]):
        self.coefficients = coefficients

    @classmethod
    def from_results(cls, paths: list[Path] | None = None) -> "MemoryModel":
        """Fit the coefficients to bench_memory.py's JSON files (default: benchmarks/results/memory*.json)."""
        paths = paths or sorted(RESULTS.glob("memory*.json"))
        if not paths:
            raise FileNotFoundError(f"no benchmark results (memory*.json) under {RESULTS}; run benchmarks/bench_memory.py")
        by_stage: dict[str, list[tuple[int, str, dict, dict]]] = {}
        for p in paths:
            res = json.loads(Path(p).read_text())
            for r in res["rows"]:
                by_stage.setdefault(r["key"], []).append((res["params"], res["shape"], r, res))
        coeffs = {}
        for stage, rows in by_stage.items():
            biggest = max(n for n, *_ in rows)
            mine = [(shape, r, res) for n, shape, r, res in rows if n == biggest]
            ks = []
            for _, r, res in mine:
                owned = r["owned"]
                if stage in IO_STAGES:
                    owned = res["shard_bytes"] + res["largest_tensor_bytes"]
                if owned:
                    ks.append((r["peak"] - r["baseline"]) / owned)
            if not ks:
                continue
            coeffs[stage] = Coefficient(stage, max(ks), max(r["baseline"] for _, r, _ in mine), mine[0][0], len(mine))
        return cls(coeffs)

    def predict(self, stage: str, owned: float, *, activations: float = 0.0, on_gpu: bool = True) -> Prediction:
        c = self.coefficients[stage]
        held = c.k * owned
        return Prediction(stage, owned, host=c.fixed + held + (0 if on_gpu else activations),
                          gpu=(held + activations + CUDA_RESERVE) if on_gpu else None, activations=activations)


# ------------------------------------------------------------------ what a rank owns, by stage


def layer_activation_bytes(tokens: int, hidden: int, tp: int, sequence_parallel: bool = False) -> float:
    """One transformer layer's saved activations for backward, bf16, flash attention: tokens x hidden x
    (10 + 24 / tp) bytes, or 34 / tp with sequence parallelism (Korthikanti et al. 2022, without the s^2
    term: SP splits the 10 the TP ranks otherwise replicate)."""
    return tokens * hidden * (34 / tp if sequence_parallel else 10 + 24 / tp)


def weights_share(arch, tp: int, pp: int, stage: int, bytes_per: int = 2) -> int:
    """This rank's weights: its stage's layers (matrices / tp, norms whole), the embedding on the first
    stage and the final norm + head on the last (tied: the head is a copy there)."""
    from megapuzzle.model.config import stage_layer_ranges

    mine = stage_layer_ranges(arch.num_layers, pp)[stage]
    n = sum(arch.layer_params(i) for i in mine) / tp
    emb = arch.vocab_size * arch.hidden_size / tp
    if stage == 0:
        n += emb
    if stage == pp - 1:
        n += arch.hidden_size + (emb if (not arch.tie_word_embeddings or pp > 1) else 0)
    return int(n * bytes_per)


def max_weights_share(arch, tp: int, pp: int, bytes_per: int = 2) -> int:
    return max(weights_share(arch, tp, pp, s, bytes_per) for s in range(pp))


def gkd_activation_bytes(*, tokens: int, hidden: int, vocab: int, tp: int, pp: int, layers_per_stage: int,
                         micro_batches: int, recompute: str, loss_chunk_tokens: int = 0,
                         sequence_parallel: bool = False) -> float:
    """GKD's activations on its worst pipeline stage (bf16, Megatron's 1F1B), `tokens` per micro-batch,
    `micro_batches` per rank and step. Stage s keeps min(pp - s, micro_batches) child micro-batches in
    flight; per layer each keeps its layer_activation_bytes ("none"; "selective" the same: that figure
    already assumes flash attention, whose s^2 part selective recompute would drop) or, with "full", only
    the layer's input (bf16 [tokens, hidden], replicated over TP), plus one layer's activations while the
    backward re-runs it. The child's captured layer outputs are the next layers' inputs and the cosine
    terms save nothing else (megapuzzle.train.distill.CosineDistance). The parent's layer outputs are
    kept for every micro-batch it has run: under PP it runs the rank's whole batch (or
    gkd.parent_pass_micro_batches of it) before the child's schedule
    (megapuzzle.stages.gkd.pipeline.forward_pass), so all `micro_batches`; at PP = 1 one micro-batch at a
    time. The last stage also keeps the parent's final hidden state per such micro-batch (not its logits:
    megapuzzle.train.vocab_kd computes them from it), and for the micro-batch in its loss the child's
    bf16 logits and their gradient (2 [tokens, vocab / tp] bf16) plus, over `loss_chunk_tokens` rows at a
    time (0: all `tokens`), the parent's bf16 logits and the loss's fp32 temporaries (4 [rows, vocab / tp]).
    With gkd.sequence_parallel every stream between layers is split along the sequence over TP: the
    child's kept inputs, the parent's kept outputs and final hidden states are [tokens / tp, hidden], a
    layer's activations 34 / tp (layer_activation_bytes); the loss gathers the two final hidden states
    along the sequence, 2 whole [tokens, hidden] streams while it runs."""
    layer = layer_activation_bytes(tokens, hidden, tp, sequence_parallel)
    stream = tokens * hidden * 2 / (tp if sequence_parallel else 1)
    parent_mbs = micro_batches if pp > 1 else 1
    rows = min(loss_chunk_tokens or tokens, tokens)
    worst = 0.0
    for s in range(pp):
        in_flight = min(pp - s, micro_batches)
        child = in_flight * layers_per_stage * (stream if recompute == "full" else layer)
        if recompute == "full":
            child += layer
        act = child + parent_mbs * layers_per_stage * stream
        if s == pp - 1:
            act += parent_mbs * stream + 2 * 2 * tokens * vocab / tp + (2 + 4 * 4) * rows * vocab / tp
            if sequence_parallel:
                act += 2 * tokens * hidden * 2
        worst = max(worst, act)
    return worst
