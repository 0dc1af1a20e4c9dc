"""`megapuzzle measure`: what each subblock variant costs, measured here and estimated for GPUs.

    megapuzzle measure --run-dir RUN [--config CFG] [--force]      -> RUN/costs.json

Per subblock variant of the search space (deduplicated over layers: cost depends on the
shape, not the layer): prefill time for a grid of (batch, seq), decode-step time with `seq`
tokens cached, parameter bytes and KV-cache bytes per token (exact, from the arch, checked
against the built model). Method (docs/design.md, "Where the time goes": measured costs need care on a CPU):

* pinned torch threads, warm-up, repeats, medians and IQRs;
* each subblock is timed inside a realistic stack: `stack_layers` layers that all have the
  variant (the other subblock no-op), run as a whole model, minus the same model with empty
  layers, divided by the layer count. Stack and baseline samples are interleaved (ABBA) and
  the cost is the median of the paired differences, so short-term drift cancels; `passes`
  repeats every entry spread over the run so slow drift hits all entries alike;
* on a shared CPU box, `threads: 1` + `clock: cpu` (process CPU time) keeps other jobs'
  load out of the numbers (wall time there swings by 2-10x; see MeasureConfig.clock);
* the fixed part (embeddings + final norm + head) and the cost of an empty layer come from
  models with 1 and `stack_layers` empty layers;
* the whole parent is measured too and compared with the sum of its parts (costs["check"]).

Runtime: Megatron-core GPTModel with its static-batching KV cache (megapuzzle.costs.timing
says why); `measure_model_throughput` uses the same. Measuring is resumable: every finished
(entry, pass) goes to RUN/state/measure_partial.json, and a re-run with the same settings
skips it (raising `passes` later only measures the new passes).
Analytic roofline tables for named GPUs (megapuzzle.roofline) are added under costs["roofline"].
Readers: megapuzzle.costs.table (re-exported here).
"""

from __future__ import annotations

import logging
import argparse
import datetime
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from megapuzzle.train import faults
from megapuzzle.config.measure import MeasureConfig  # noqa: F401 (the stage's config)
from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch, SearchSpace, empty_layer
from megapuzzle.costs.table import (  # noqa: F401  (re-exported: the accessors live there, torch-free)
    FORMAT,
    cost_table,
    fixed_runtime,
    grid_value,
    load_costs,
    parent_check_rows,
    predict_generation_time,
    predict_runtime,
    throughput_settings,
    variant_cost,
    variant_key,
    variant_memory,
)
from megapuzzle.costs.partial import MeasurePartial, search_space_variants  # noqa: F401  (re-exported)
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json

_LOG = logging.getLogger(__name__)


def log(msg: str) -> None:
    _LOG.info(f"[measure] {msg}")

_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------- variants

_EMPTY = empty_layer()


def stack_arch(parent: Architecture, subblock: str, variant, layers: int) -> Architecture:
    """`layers` layers that all have `variant` in `subblock` and a no-op in the other one."""
    layer = LayerArch(variant, _EMPTY.ffn) if subblock == "attention" else LayerArch(_EMPTY.attention, variant)
    return replace(parent, layers=(layer,) * layers)


def _subblock_params(parent: Architecture, subblock: str, v) -> int:
    return parent.subblock_params(v)


def _kv_elems_per_token(parent: Architecture, subblock: str, v) -> int:
    return v.kind_spec.kv_elems_per_token(parent, v)


# ----------------------------------------------------------------------------- measuring

class _Measurer:
    """Times stacks against the empty-layer baselines (whose steps it caches); returns raw samples
    as {key: {phase: [[[seconds per sample] per seq] per batch]}}."""

    def __init__(self, parent: Architecture, cfg: MeasureConfig, dtype):
        from megapuzzle.costs.timing import GPTRunner

        self.parent, self.cfg, self.k = parent, cfg, cfg.stack_layers
        self.elem = _ELEM_BYTES[str(dtype).replace("torch.", "")]
        self._runner = lambda arch: GPTRunner(arch, dtype=dtype, fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe,
                                              seed=cfg.seed)
        self.empty1 = self._runner(replace(parent, layers=(_EMPTY,)))
        self.emptyk = self._runner(replace(parent, layers=(_EMPTY,) * self.k))
        self._steps: dict[tuple, Callable] = {}

    def step(self, runner, phase: str, b: int, s: int, cache: bool = False):
        key = (id(runner), phase, b, s)
        if cache and key in self._steps:
            return self._steps[key]
        fn = runner.prefill_step(b, s) if phase == "prefill" else runner.decode_step(b, s)
        if cache:
            self._steps[key] = fn
        return fn

    def time(self, fns, runner) -> list[list[float]]:
        from megapuzzle.costs.timing import time_interleaved

        c = self.cfg
        return time_interleaved(fns, repeats=c.repeats, warmup=c.warmup, min_sample_s=c.min_sample_s,
                                sync=runner.sync, clock=c.clock)

    def grid(self, fn: Callable[[str, int, int], dict[str, list[float]]]) -> dict[str, Any]:
        bs, ss = self.cfg.batch_sizes, self.cfg.seq_lens
        out: dict[str, Any] = {}
        for ph in self.cfg.phases:
            for i, b in enumerate(bs):
                for j, s in enumerate(ss):
                    for key, samples in fn(ph, b, s).items():
                        out.setdefault(key, {}).setdefault(ph, [[[] for _ in ss] for _ in bs])[i][j] = samples
        return out

    def baseline(self) -> dict[str, Any]:
        """The fixed part (a model with zero layers, extrapolated) and one empty layer's cost."""
        def point(ph, b, s):
            t1, tk = self.time([self.step(self.empty1, ph, b, s), self.step(self.emptyk, ph, b, s, cache=True)],
                               self.emptyk)
            eps = [(y - x) / (self.k - 1) for x, y in zip(t1, tk)]
            return {"baseline": [x - e for x, e in zip(t1, eps)], "empty_layer": eps}

        return self.grid(point)

    def variant(self, subblock: str, v) -> dict[str, Any]:
        """Paired (stack - empty stack) / k samples; checks sizes against the built model."""
        p, k, elem = self.parent, self.k, self.elem
        params, kv = _subblock_params(p, subblock, v), _kv_elems_per_token(p, subblock, v)
        runner = self._runner(stack_arch(p, subblock, v, k))
        built = runner.param_count() - self.emptyk.param_count()
        if built != k * params:  # the arch's size rules and Megatron's modules must agree exactly
            raise RuntimeError(f"{subblock}.{v.name}: built model has {built // k} params per layer, "
                               f"the arch says {params}")

        def point(ph, b, s):
            stack = self.step(runner, ph, b, s)
            ts, tb = self.time([stack, self.step(self.emptyk, ph, b, s, cache=True)], runner)
            got = runner.kv_cache_bytes_per_token(stack.ctx)
            if got != k * kv * elem:
                raise RuntimeError(f"{subblock}.{v.name}: Megatron caches {got // k} bytes per token per "
                                   f"layer, the arch says {kv * elem}")
            return {"runtime": [(x - y) / k for x, y in zip(ts, tb)]}

        return self.grid(point)

    def whole(self, arch: Architecture) -> dict[str, Any]:
        runner = self._runner(arch)
        return self.grid(lambda ph, b, s: {"runtime": self.time([self.step(runner, ph, b, s)], runner)[0]})


def measure_costs(parent: Architecture, cfg: MeasureConfig | None = None, *, space: SearchSpace | None = None,
                  state_path: str | Path | None = None) -> dict[str, Any]:
    """Measure every variant of `space` for `parent` on this machine; returns the costs.json dict.

    Entries (baseline, each non-no-op variant, the whole parent) are measured once per pass;
    samples of all passes are pooled. `state_path`: the resumable partial file ((entry, pass)
    results measured with the same settings are reused).
    """
    cfg = cfg or MeasureConfig()
    if cfg.engine == "vllm":
        from megapuzzle.serving.vllm_costs import measure_costs_vllm

        return measure_costs_vllm(parent, cfg, space=space, state_path=state_path)

    import torch

    from megapuzzle.costs import timing as rt

    rt.preflight(cfg.fp8, cfg.fp8_recipe)
    if cfg.clock == "cpu" and torch.cuda.is_available():
        raise UserError("measure.clock: cpu times the host, not the GPU; use clock: wall on a GPU machine")
    threads = rt.ensure_runtime(cfg.threads)
    dtype = rt.resolve_dtype(cfg.dtype)
    if cfg.fp8 and dtype != torch.bfloat16:
        raise UserError("measure.fp8 needs bfloat16 parameters; set measure.dtype to auto or bfloat16")
    attention, ffn = search_space_variants(parent, space)
    settings = {**cfg.measured_settings(), "threads": threads, "dtype": rt.dtype_name(dtype),
                "device": rt.device_name(), "versions": rt.versions(), "runtime": rt.RUNTIME_NAME,
                "parent": parent.to_dict()}
    partial = MeasurePartial(Path(state_path) if state_path is not None else None, settings)

    # no-op variants are an empty layer: zero by definition (their overhead is `empty_layer`)
    todo = ["baseline"] + [f"attention.{v.name}" for v in attention if not v.identity]
    todo += [f"ffn.{v.name}" for v in ffn if not v.identity] + (["check.parent"] if cfg.check_parent else [])
    jobs = [(p, name) for p in range(cfg.passes) for name in todo]
    left = sum(not partial.done(name, p) for p, name in jobs)
    measurer, t_start, n_done = None, time.perf_counter(), 0
    for p, name in jobs:
        if partial.done(name, p):
            continue
        if measurer is None:
            log(f"{rt.device_name()}, {threads} threads, {rt.dtype_name(dtype)}{' + fp8' if cfg.fp8 else ''}, "
                f"{cfg.clock} clock, grid b={list(cfg.batch_sizes)} s={list(cfg.seq_lens)}, {cfg.passes} pass(es) "
                f"x {cfg.repeats} repeats; {left} of {len(jobs)} results to measure")
            measurer = _Measurer(parent, cfg, dtype)
        t0 = time.perf_counter()
        if name == "baseline":
            result = measurer.baseline()
        elif name == "check.parent":
            result = measurer.whole(parent)
        else:
            subblock, vname = name.split(".", 1)
            result = measurer.variant(subblock, (AttentionVariant if subblock == "attention" else FFNVariant
                                                 ).from_name(vname))
        partial.save(name, p, result)
        n_done += 1
        elapsed = time.perf_counter() - t_start
        log(f"pass {p + 1}/{cfg.passes} {name}: {time.perf_counter() - t0:.1f} s ({n_done}/{left}, "
            f"~{elapsed / n_done * (left - n_done):.0f} s left)")
        if faults.reached("measure", n_done, (name, p)):  # tests: a kill after this entry
            raise faults.Killed(f"measure: killed after {n_done} entries")

    return assemble_costs(parent, cfg, partial, attention, ffn, settings, threads=threads,
                          dtype_name=rt.dtype_name(dtype), precision=rt.precision_name(dtype, cfg.fp8))


def assemble_costs(parent: Architecture, cfg: MeasureConfig, partial: MeasurePartial, attention, ffn,
                   settings: dict[str, Any], *, threads: int, dtype_name: str, precision: str) -> dict[str, Any]:
    """The costs.json dict from the measured samples: table, parent check, roofline tables."""
    from megapuzzle.costs.timing import RUNTIME_NAME
    from megapuzzle.roofline import roofline_table

    elem = _ELEM_BYTES[dtype_name]
    zeros = [[0.0] * len(cfg.seq_lens) for _ in cfg.batch_sizes]
    variants: dict[str, Any] = {}
    for subblock, vs in (("attention", attention), ("ffn", ffn)):
        for v in vs:
            name, params = f"{subblock}.{v.name}", _subblock_params(parent, subblock, v)
            runtime = ({ph: {"median": zeros, "iqr": zeros} for ph in cfg.phases} if v.identity
                       else partial.pooled(name, cfg.passes)["runtime"])
            variants[name] = {"subblock": subblock, "name": v.name, "measured": not v.identity,
                              "param_count": params, "param_bytes": params * elem,
                              "kv_bytes_per_token": _kv_elems_per_token(parent, subblock, v) * elem,
                              "runtime": runtime}
    base = partial.pooled("baseline", cfg.passes)
    costs: dict[str, Any] = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": settings["device"], "versions": settings["versions"], "threads": threads,
        "dtype": dtype_name, "precision": precision, "runtime": RUNTIME_NAME, "clock": cfg.clock,
        "method": (f"median of paired differences: stack of {cfg.stack_layers} layers with the variant (other "
                   f"subblock no-op) minus the same stack of empty layers, / {cfg.stack_layers}; "
                   f"ABBA-interleaved; {cfg.passes} pass(es) x {cfg.repeats} repeats pooled, {cfg.warmup} warm-up, "
                   f"samples >= {cfg.min_sample_s} s"),
        "grid": {"batch_sizes": list(cfg.batch_sizes), "seq_lens": list(cfg.seq_lens)},
        "phases": list(cfg.phases), "repeats": cfg.repeats, "passes": cfg.passes, "warmup": cfg.warmup,
        "stack_layers": cfg.stack_layers, "fp8_recipe": cfg.fp8_recipe if cfg.fp8 else None,
        "settings": settings, "parent": parent.to_dict(),
        "search_space": {"attention": [v.name for v in attention], "ffn": [v.name for v in ffn]},
        "units": {"runtime": "seconds", "param_bytes": "bytes", "kv_bytes_per_token": "bytes"},
        "baseline": base["baseline"], "empty_layer": base["empty_layer"], "variants": variants,
    }
    if cfg.check_parent:
        rows = []
        meas = partial.pooled("check.parent", cfg.passes)["runtime"]
        for ph in cfg.phases:
            for i, b in enumerate(cfg.batch_sizes):
                for j, s in enumerate(cfg.seq_lens):
                    m = meas[ph]["median"][i][j]
                    pred = predict_runtime(costs, parent, b, s, ph)
                    rows.append({"phase": ph, "batch": b, "seq": s, "predicted": pred, "measured": m,
                                 "measured_iqr": meas[ph]["iqr"][i][j], "rel_error": (pred - m) / m})
        errs = [abs(r["rel_error"]) for r in rows]
        costs["check"] = {"arch": "parent", "rows": rows, "max_abs_rel_error": max(errs),
                          "mean_abs_rel_error": sum(errs) / len(errs)}
    prec = cfg.roofline_precision if cfg.roofline_precision != "auto" else ("fp8" if cfg.fp8 else "bf16")
    costs["roofline"] = {
        g: roofline_table(parent, attention, ffn, cfg.batch_sizes, cfg.seq_lens, g, prec,
                          cfg.roofline_compute_efficiency, cfg.roofline_bandwidth_efficiency, cfg.phases)
        for g in cfg.roofline_gpus}
    return costs


# ----------------------------------------------------------------------------- report

def format_costs(costs: dict[str, Any], source: str | None = None) -> str:
    """A markdown table: per variant, params, KV bytes/token and milliseconds per grid point
    (medians; `source` picks the measured table or a GPU's roofline one)."""
    t = cost_table(costs, source)
    pts = [(ph, b, s) for ph in t["phases"] for b in t["grid"]["batch_sizes"] for s in t["grid"]["seq_lens"]]
    head = "| variant | params | KV B/tok | " + " | ".join(f"{ph[:3]} b{b} s{s}" for ph, b, s in pts) + " |"
    rows = [head, "|---|---:|---:|" + "---:|" * len(pts)]

    def ms(matrix_of, ph, b, s):
        return f"{1e3 * grid_value(t, matrix_of[ph]['median'], b, s):.4g}"

    rows.append("| (fixed: emb+head) | | | " + " | ".join(ms(t["baseline"], *p) for p in pts) + " |")
    rows.append("| (empty layer) | | | " + " | ".join(ms(t["empty_layer"], *p) for p in pts) + " |")
    for key, e in t["variants"].items():
        rows.append(f"| {key} | {e['param_count']:,} | {e['kv_bytes_per_token']:,} | "
                    + " | ".join(ms(e["runtime"], *p) for p in pts) + " |")
    return "\n".join(rows)


def format_check(costs: dict[str, Any]) -> str:
    rows = ["| phase | batch | seq | predicted ms | measured ms (IQR) | rel. error |", "|---|---:|---:|---:|---:|---:|"]
    for r in parent_check_rows(costs):
        rows.append(f"| {r['phase']} | {r['batch']} | {r['seq']} | {1e3 * r['predicted']:.3f} | "
                    f"{1e3 * r['measured']:.3f} ({1e3 * r['measured_iqr']:.3f}) | {100 * r['rel_error']:+.1f}% |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- CLI

def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="run directory (reads RUN/parent, writes RUN/costs.json)")
    p.add_argument("--config", help="YAML config (its measure: and search_space: sections); defaults otherwise")
    p.add_argument("--force", action="store_true", help="discard partial measurements and measure everything again")


def run_cli(args: argparse.Namespace) -> int:
    from megapuzzle.checkpoints.canonical import load_arch, require_parent
    from megapuzzle.config import RunDir, load_config, section

    run = RunDir(args.run_dir)
    cfg_dict = load_config(args.config) if args.config else {}
    mcfg = section(cfg_dict, "measure", MeasureConfig)
    space = SearchSpace.from_dict(cfg_dict.get("search_space"))
    parent = load_arch(require_parent(run))
    state = run.state / "measure_partial.json"
    if args.force and state.exists():
        state.unlink()
    costs = measure_costs(parent, mcfg, space=space, state_path=state)
    atomic_write_json(run.costs, costs)
    print(format_costs(costs))
    if "check" in costs:
        print(f"\nwhole parent, predicted (sum of parts) vs measured:\n{format_check(costs)}")
    print(f"\nwrote {run.costs}")
    return 0
