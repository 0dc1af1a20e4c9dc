"""The runtime that costs are measured on: Megatron-core GPTModel driven like a static-batching server.

Prefill and decode both run `GPTModel.forward` with Megatron's own
`megatron.core.inference.contexts.StaticInferenceContext` (the KV cache of its static-batching
text-generation engine): prefill fills the cache and materializes the last token's logits
only; a decode step feeds one token per sequence against the cache. Why this runtime rather
than our HF DeciLM modeling file:

* it is the project's engine: the same `build_gpt_model` that BLD, scoring and GKD use, so
  costs describe the layers the pipeline realizes, including Megatron's heterogeneous spec;
* on a GPU the same code runs TransformerEngine layers and FP8 (`build_gpt_model(fp8=True)`,
  plus Megatron's `prepare_model_for_fp8_inference` padding), which the HF file cannot;
* it runs on CPU through megapuzzle.runtime.cpu_compat (which bridges the cache allocation),
  and its logits match a full forward (tests/test_cost.py checks it).

Known trait of this path (measured, so it is in the costs, not an error): without flash-decode
(a CUDA-only kernel) Megatron caches un-rotated keys and re-applies RoPE to the whole cache
every decode step, so on CPU a GQA decode step grows with the cache faster than a
rotated-key cache (HF, vLLM, TRT-LLM) would.

`measure_model_throughput` times end-to-end generation on this same runtime, so predicted and
measured speedups compare like with like.
"""

from __future__ import annotations

import gc
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from megapuzzle.runtime.dtypes import dtype_name, precision_name, resolve_dtype  # noqa: F401 (re-exported)
from megapuzzle.arch import Architecture
from megapuzzle.errors import UserError

RUNTIME_NAME = "megatron-core GPTModel.forward + StaticInferenceContext"


# ----------------------------------------------------------------------------- environment

def device_name() -> str:
    """GPU name, or the CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for dist, key in (("megatron-core", "megatron_core"), ("transformer-engine", "transformer_engine")):
        try:
            out[key] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def preflight(fp8: bool, fp8_recipe: str = "delayed") -> None:
    """Fail at once, in one line, when the requested precision cannot run on this machine."""
    if not fp8:
        return
    from megapuzzle.model.config import ModelConfigError, check_fp8, resolve_use_te

    try:
        check_fp8(True, resolve_use_te(None))
    except ModelConfigError as e:
        raise UserError(f"measure.fp8: {e}") from None


def ensure_runtime(threads: int | None) -> int:
    """Pin torch's intra-op threads (0 = every core this process may use, None = leave as is)
    and set up a single-process Megatron parallel state when none exists. Returns the count."""
    import os

    from megatron.core import parallel_state as ps

    if threads == 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is not None:
        torch.set_num_threads(int(threads))
    if not ps.model_parallel_is_initialized():
        from megapuzzle.runtime import init_distributed

        init_distributed(tp=1, pp=1, seed=1234)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- the runner

_FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}  # our name -> Megatron's fp8_recipe


class GPTRunner:
    """A Megatron GPTModel for `arch` (random weights, or canonical `tensors`) in eval mode."""

    def __init__(self, arch: Architecture, *, dtype: torch.dtype = torch.float32, fp8: bool = False,
                 fp8_recipe: str = "delayed", tensors: Mapping[str, torch.Tensor] | None = None, seed: int = 0):
        from megapuzzle.model import ModelOptions, build_gpt_model, load_canonical_into_model

        extra = {"fp8_recipe": _FP8_RECIPES[fp8_recipe]} if fp8 else {}
        # Skip Megatron's initialisation (slow on CPU for big layers); random weights come below.
        opts = ModelOptions(perform_initialization=False, extra=extra)
        self.arch = arch
        self.model = build_gpt_model(arch, params_dtype=dtype, fp8=fp8, options=opts).eval()
        self.device = next(self.model.parameters()).device
        if tensors is None:
            self._random_fill(seed)
        else:
            load_canonical_into_model(self.model, tensors, arch)
        if fp8:  # Megatron's FP8 inference: pads GEMM inputs to TE's FP8 shape rules (decode: M = batch)
            from megatron.core.fp8_utils import prepare_model_for_fp8_inference

            prepare_model_for_fp8_inference(self.model)
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def _random_fill(self, seed: int) -> None:
        # Unset weights would be torch.empty garbage: NaN / denormals slow CPU math and skew timings.
        g = torch.Generator(device=self.device).manual_seed(seed)
        for p in self.model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)

    def param_count(self) -> int:
        from megapuzzle.model import count_parameters

        return count_parameters(self.model)

    def context(self, batch: int, max_seq: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        return StaticInferenceContext(batch, max_seq)

    def tokens(self, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.arch.vocab_size, (batch, seq), generator=g).to(self.device)

    def _forward(self, ctx, tokens: torch.Tensor, start: int) -> torch.Tensor:
        b, s = tokens.shape
        pos = torch.arange(start, start + s, device=self.device).unsqueeze(0).expand(b, s)
        return self.model(tokens, pos, None, inference_context=ctx, runtime_gather_output=True)

    def prefill(self, ctx, tokens: torch.Tensor) -> torch.Tensor:
        """Fill the cache with `tokens` [b, s] from position 0; logits of the last token [b, V]."""
        ctx.reset()
        out = self._forward(ctx, tokens, 0)
        ctx.sequence_len_offset = tokens.shape[1]
        return None if out is None else out[:, -1]

    def decode(self, ctx, tokens: torch.Tensor, advance: bool = True) -> torch.Tensor:
        """One step: tokens [b, 1] at position ctx.sequence_len_offset; logits [b, V]. With
        advance=False the cache length stays put (timing the same step again and again)."""
        ctx.enable_decode_mode()
        out = self._forward(ctx, tokens, ctx.sequence_len_offset)
        if advance:
            ctx.sequence_len_offset += tokens.shape[1]
        return None if out is None else out[:, -1]

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each sequence, [b, 1], from prefill's / decode's logits."""
        return logits.argmax(-1, keepdim=True)

    def kv_cache_bytes_per_token(self, ctx) -> int:
        """Bytes Megatron allocated for K and V per cached token (after a forward on `ctx`)."""
        total = sum(t.numel() * t.element_size() for kv in ctx.key_value_memory_dict.values() for t in kv)
        return total // (ctx.max_sequence_length * ctx.max_batch_size)

    # -- timed step makers: each returns a zero-argument callable running one step
    def prefill_step(self, batch: int, seq: int) -> Callable[[], None]:
        ctx, toks = self.context(batch, seq), self.tokens(batch, seq)

        def step():
            self.prefill(ctx, toks)
        step.ctx = ctx  # type: ignore[attr-defined]
        return step

    def decode_step(self, batch: int, seq: int) -> Callable[[], None]:
        """One decode step with `seq` tokens cached; repeated calls keep the cache length."""
        ctx, toks = self.context(batch, seq + 1), self.tokens(batch, 1)
        ctx.sequence_len_offset = seq
        with torch.inference_mode():
            self.decode(ctx, toks, advance=False)  # allocates the cache
            for kv in ctx.key_value_memory_dict.values():
                for t in kv:  # what a prefill would leave there, without paying for one
                    t.normal_(0.0, 1.0)

        def step():
            self.decode(ctx, toks, advance=False)
        step.ctx = ctx  # type: ignore[attr-defined]
        return step


# ----------------------------------------------------------------------------- timing

class PipelineGPTRunner(GPTRunner):
    """GPTRunner on this rank's pipeline stage (PP > 1): every step runs the stages in turn, the
    hidden state [s, b, h] travels stage to stage (p2p), the last stage's logits pick the next
    tokens and those (not the logits) go back to every stage, as a PP inference server does.
    One micro-batch: the stages run one after the other, so a step costs the sum of the stages
    plus PP - 1 hops, for parent and child alike. Logits are returned on the last stage only."""

    def __init__(self, arch: Architecture, **kw):
        from megatron.core import parallel_state as ps

        super().__init__(arch, **kw)
        self.ps = ps
        self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.dtype = next(self.model.parameters()).dtype

    def _forward(self, ctx, tokens: torch.Tensor, start: int) -> torch.Tensor | None:
        import torch.distributed as dist

        b, s = tokens.shape
        if not self.first:
            x = torch.empty((s, b, self.arch.hidden_size), dtype=self.dtype, device=self.device)
            dist.recv(x, src=self.ps.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(x)
        out = super()._forward(ctx, tokens, start)
        if not self.last:
            dist.send(out.contiguous(), dst=self.ps.get_pipeline_model_parallel_next_rank())
            return None
        return out

    def greedy(self, logits: torch.Tensor | None) -> torch.Tensor:
        import torch.distributed as dist

        nxt = logits.argmax(-1, keepdim=True) if self.last else \
            torch.empty((self.batch, 1), dtype=torch.long, device=self.device)
        dist.broadcast(nxt, src=self.ps.get_pipeline_model_parallel_last_rank(),
                       group=self.ps.get_pipeline_model_parallel_group())
        return nxt

    def context(self, batch: int, max_seq: int):
        self.batch = batch
        return super().context(batch, max_seq)


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and inter-quartile range (0 for fewer than 2 samples)."""
    if not samples:
        return {"median": float("nan"), "iqr": float("nan")}
    med = statistics.median(samples)
    if len(samples) < 2:
        return {"median": med, "iqr": 0.0}
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median": med, "iqr": q[2] - q[0]}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(fns: list[Callable[[], None]], *, repeats: int, warmup: int, min_sample_s: float = 0.0,
                     sync: Callable[[], None] = lambda: None, clock: str = "wall") -> list[list[float]]:
    """Seconds per call of each fn, `repeats` samples each, taken interleaved.

    Samples alternate between the fns in ABBA order (forward, then reversed), so a slow drift
    of the machine (other jobs on a shared box) hits every fn alike and cancels in their
    differences. A sample repeats its call until it lasts `min_sample_s` (sub-millisecond
    decode steps are otherwise timer and scheduler noise). GC is off while timing.
    `clock`: "wall" (perf_counter) or "cpu" (this process's CPU time, blind to other jobs).
    """
    _clock = CLOCKS[clock]
    inner = []
    with torch.inference_mode():
        for fn in fns:
            t = float("inf")
            for _ in range(max(1, warmup)):
                sync()
                t0 = _clock()
                fn()
                sync()
                t = min(t, _clock() - t0)
            inner.append(max(1, min(1000, math.ceil(min_sample_s / max(t, 1e-7)))) if min_sample_s > 0 else 1)
        out: list[list[float]] = [[] for _ in fns]
        was = gc.isenabled()
        gc.disable()
        try:
            for r in range(repeats):
                order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
                for i in order:
                    sync()
                    t0 = _clock()
                    for _ in range(inner[i]):
                        fns[i]()
                    sync()
                    out[i].append((_clock() - t0) / inner[i])
        finally:
            if was:
                gc.enable()
    return out


# ----------------------------------------------------------------------------- end-to-end

@dataclass
class ThroughputResult:
    """One timed generation: prefill, then gen_len - 1 decode steps (gen_len new tokens per sequence)."""

    batch: int
    """Sequences generated together."""
    prefill_len: int
    """Prompt tokens per sequence."""
    gen_len: int
    """New tokens per sequence."""
    prefill_s: float
    """Median seconds of the prefill (which also yields the first new token)."""
    decode_s: float
    """Median seconds of the gen_len - 1 decode steps together."""
    total_s: float
    """Median over repeats of prefill + decode seconds."""
    tokens_per_s: float
    """batch * gen_len / total_s: generated tokens per second, end to end."""
    tokens: torch.Tensor = field(repr=False)
    """Greedy tokens generated in the last repeat, [batch, gen_len]."""
    runtime: str = RUNTIME_NAME
    """The engine timed (the same one `megapuzzle measure` uses)."""
    clock: str = "wall"
    """What the seconds are: wall time, or this process's CPU time (see time_interleaved)."""
    samples: list[dict[str, float]] = field(default_factory=list, repr=False)
    """Per-repeat prefill_s / decode_s."""


def measure_model_throughput(arch: Architecture, tensors_or_random: Mapping[str, torch.Tensor] | str | None,
                             batch: int, prefill_len: int, gen_len: int, *, repeats: int = 3, warmup: int = 1,
                             dtype: str | torch.dtype = "auto", fp8: bool = False, fp8_recipe: str = "delayed",
                             threads: int | None = None, seed: int = 0, clock: str = "wall") -> ThroughputResult:
    """End-to-end greedy generation throughput of a whole architecture on the cost runtime.

    `tensors_or_random`: canonical tensors (e.g. from load_checkpoint), or "random" / None for
    random weights (timing does not depend on them). Each repeat prefills `prefill_len` random
    prompt tokens per sequence and generates `gen_len` tokens (the first from the prefill's
    logits, then gen_len - 1 decode steps), like HF generate(max_new_tokens=gen_len).
    The medians over repeats are reported. `threads` None leaves torch's setting alone; pass
    the `threads` and `clock` that costs.json records to compare with its predictions.
    """
    if min(batch, prefill_len, gen_len) < 1:
        raise ValueError(f"batch, prefill_len and gen_len must be >= 1, got {batch}, {prefill_len}, {gen_len}")
    preflight(fp8, fp8_recipe)
    if clock == "cpu" and torch.cuda.is_available():
        raise UserError("clock='cpu' times the host, not the GPU; use clock='wall' on a GPU machine")
    ensure_runtime(threads)
    dt = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    tensors = None if tensors_or_random is None or isinstance(tensors_or_random, str) else tensors_or_random
    from megatron.core import parallel_state as ps

    # PP > 1 (evaluate --pp): the stages of one model, the generation passing through them in turn
    cls = PipelineGPTRunner if ps.get_pipeline_model_parallel_world_size() > 1 else GPTRunner
    runner = cls(arch, dtype=dt, fp8=fp8, fp8_recipe=fp8_recipe, tensors=tensors, seed=seed)
    prompt = runner.tokens(batch, prefill_len, seed=seed + 1)
    ctx = runner.context(batch, prefill_len + gen_len)
    samples, out, _clock = [], None, CLOCKS[clock]
    with torch.inference_mode():
        for r in range(warmup + repeats):
            runner.sync()
            t0 = _clock()
            nxt = runner.greedy(runner.prefill(ctx, prompt))
            runner.sync()
            t1 = _clock()
            gen = [nxt]
            for _ in range(gen_len - 1):
                nxt = runner.greedy(runner.decode(ctx, nxt))
                gen.append(nxt)
            runner.sync()
            t2 = _clock()
            if r >= warmup:
                samples.append({"prefill_s": t1 - t0, "decode_s": t2 - t1})
            out = torch.cat(gen, dim=1)
    pre = statistics.median(s["prefill_s"] for s in samples)
    dec = statistics.median(s["decode_s"] for s in samples)
    total = statistics.median(s["prefill_s"] + s["decode_s"] for s in samples)
    return ThroughputResult(batch=batch, prefill_len=prefill_len, gen_len=gen_len, prefill_s=pre, decode_s=dec,
                            total_s=total, tokens_per_s=batch * gen_len / total, tokens=out.cpu(),
                            clock=clock, samples=samples)


def time_model(arch: Architecture, phase: str, batch: int, seq: int, *, repeats: int = 5, warmup: int = 1,
               min_sample_s: float = 0.0, dtype: torch.dtype = torch.float32, fp8: bool = False,
               fp8_recipe: str = "delayed", runner: GPTRunner | None = None, clock: str = "wall") -> dict[str, float]:
    """Median / IQR seconds of one whole-model prefill (or one decode step at cache length `seq`)."""
    runner = runner or GPTRunner(arch, dtype=dtype, fp8=fp8, fp8_recipe=fp8_recipe)
    step = runner.prefill_step(batch, seq) if phase == "prefill" else runner.decode_step(batch, seq)
    (samples,) = time_interleaved([step], repeats=repeats, warmup=warmup, min_sample_s=min_sample_s,
                                  sync=runner.sync, clock=clock)
    return summarize(samples)
