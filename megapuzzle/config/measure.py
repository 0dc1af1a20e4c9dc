"""The `measure:` section: how block costs are timed (megapuzzle.stages.measure.measure, megapuzzle.serving.vllm_costs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from megapuzzle.config.rules import Convert, FP8_RECIPES, Flag, Integer, Integers, Number, OneOf, Section
from megapuzzle.errors import UserError

MEASURE_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Parameter dtypes costs can be timed in."""


def _gpu_keys(gpus) -> tuple[str, ...]:
    from megapuzzle.roofline import gpu_key  # torch-free; raises ValueError naming the known GPUs

    return tuple(dict.fromkeys(gpu_key(g) for g in ((gpus,) if isinstance(gpus, str) else gpus)))


def _vllm_times_wall_clock(cfg) -> None:
    if cfg.engine == "vllm" and cfg.clock != "wall":
        raise UserError("measure.engine vllm times wall clock (vLLM runs in its own processes); set clock: wall")


def _fp8_needs_bf16(cfg) -> None:
    if cfg.fp8 and cfg.dtype not in ("auto", "bfloat16"):
        raise UserError(f"measure.fp8 runs with bfloat16 parameters; set dtype to auto or bfloat16, not {cfg.dtype}")


@dataclass(frozen=True)
class MeasureConfig(Section):
    """The `measure:` config section."""

    SECTION = "measure"
    CHECKS = (_vllm_times_wall_clock, _fp8_needs_bf16)

    batch_sizes: Annotated[tuple[int, ...], Integers(canonical=True)] = (1, 4)
    """Batch sizes of the grid (sequences per forward)."""
    seq_lens: Annotated[tuple[int, ...], Integers(canonical=True)] = (128, 512)
    """Sequence lengths of the grid: prefill length, and cached tokens for a decode step."""
    decode: Annotated[bool, Flag()] = True
    """Also measure decode steps (one new token per sequence against a KV cache of seq tokens)."""
    stack_layers: Annotated[int, Integer(ge=2)] = 4
    """Layers in the stack a variant is timed in (>= 2: the empty-layer cost needs two depths)."""
    warmup: Annotated[int, Integer(ge=0)] = 2
    """Untimed calls per model and grid point before timing."""
    repeats: Annotated[int, Integer()] = 7
    """Timed samples per model and grid point and pass; medians and IQRs are over all of them."""
    passes: Annotated[int, Integer()] = 1
    """Measure every entry this many times, spread over the run, and pool the samples: on a
    machine whose load drifts over minutes, every entry (and the parent check) then sees the
    same mix of conditions."""
    min_sample_s: Annotated[float, Number(ge=0)] = 0.02
    """A sample repeats its call until it lasts this long (short decode steps are timer noise)."""
    threads: Annotated[int, Integer(ge=0)] = 0
    """torch intra-op threads to pin; 0 = every core this process may use."""
    clock: Annotated[str, OneOf(("wall", "cpu"))] = "wall"
    """wall (perf_counter; what throughput means) or cpu (this process's CPU seconds, CPU only).
    On a CPU box shared with other jobs, `threads: 1` + `clock: cpu` is the stable choice: the
    time other jobs take from us is not counted (with more threads, OpenMP spin-waits are)."""
    dtype: Annotated[str, OneOf(MEASURE_DTYPES)] = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."""
    fp8: Annotated[bool, Flag()] = False
    """FP8 GEMMs through TransformerEngine (GPU with sm >= 89 only; fails at once elsewhere)."""
    fp8_recipe: Annotated[str, OneOf(FP8_RECIPES)] = "delayed"
    """FP8 scaling: delayed (amax history) or current (per-tensor, Megatron's 'tensorwise')."""
    check_parent: Annotated[bool, Flag()] = True
    """Time the whole parent at every grid point and store predicted vs measured."""
    seed: int = 0
    """Seed of the random weights and tokens (timing does not depend on them)."""
    engine: Annotated[str, OneOf(("megatron", "vllm"))] = "megatron"
    """Where the variants are timed: megatron (Megatron-core's static inference, in this process)
    or vllm (the serving engine, in its own environment: megapuzzle.serving.vllm_costs). The MIP
    optimizes for whichever engine measured costs.json (its `engine` field)."""
    decode_tokens: Annotated[int, Integer()] = 8
    """vllm: decode steps per decode sample ((generate 1 + n tokens - generate 1) / n)."""
    vllm_kv_cache_mb: Annotated[int, Integer()] = 256
    """vllm: KV-cache budget per engine (vLLM's kv_cache_memory_bytes); the measured KV bytes per
    token are read off the blocks vLLM carves out of it."""
    vllm_enforce_eager: Annotated[bool, Flag()] = True
    """vllm: eager mode (no torch.compile / CUDA graphs). True keeps CPU start-up short; on a GPU
    set false to time with CUDA graphs, as vLLM serves by default."""
    roofline_gpus: Annotated[tuple[str, ...], Convert(_gpu_keys, "a list of GPU names")] = ("h100", "h200", "a100", "b200")
    """GPUs to add analytic roofline tables for (megapuzzle.roofline.GPUS)."""
    roofline_precision: Annotated[str, OneOf(("auto", "bf16", "fp8"))] = "auto"
    """bf16, fp8, or auto (fp8 when `fp8` is on, else bf16). GPUs without FP8 fall back to bf16."""
    roofline_compute_efficiency: Annotated[float, Number(gt=0, le=1)] = 0.6
    """Fraction of peak FLOP/s the roofline assumes GEMMs reach."""
    roofline_bandwidth_efficiency: Annotated[float, Number(gt=0, le=1)] = 0.8
    """Fraction of peak HBM bandwidth the roofline assumes."""

    @property
    def phases(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.decode else ("prefill",)

    def measured_settings(self) -> dict[str, Any]:
        """The fields that change measured numbers. Not the roofline ones, and not `passes`: more
        passes add to the ones already measured."""
        keys = ("batch_sizes", "seq_lens", "decode", "stack_layers", "warmup", "repeats", "min_sample_s",
                "clock", "fp8", "fp8_recipe", "seed")
        if self.engine != "megatron":  # the Megatron signature stays as it was: old runs stay valid
            keys += ("engine", "decode_tokens", "vllm_kv_cache_mb", "vllm_enforce_eager")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in keys)}
