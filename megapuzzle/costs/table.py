"""Reading costs.json: per-variant runtimes and memory, and whole-architecture predictions.

Pure Python (no torch), so the MIP and reports can import it cheaply. A *cost table* is

    grid:        {"batch_sizes": [b...], "seq_lens": [s...]}
    phases:      ["prefill", "decode"]
    baseline:    {phase: {"median": [[sec per (b, s)]], "iqr": [[...]]}}   embeddings + final norm + head
    empty_layer: {phase: {...}}      one layer whose attention and FFN are both no-op (Megatron
                                      still runs the layer; its python/dispatch cost is real on CPU)
    variants:    {"attention.gqa_kv2" | "ffn.mlp_512" | ...:
                  {"subblock", "name", "param_count", "param_bytes", "kv_bytes_per_token",
                   "runtime": {phase: {"median": [[...]], "iqr": [[...]]}}}}

Matrices are indexed [batch index][seq index]. "prefill" = a forward over `seq` tokens for
`batch` sequences; "decode" = one step producing one new token per sequence with `seq` tokens
already cached. Variant runtimes are marginal (over an empty layer), so

    runtime(arch) = baseline + num_layers * empty_layer + sum over layers (attention + ffn).

costs.json holds the measured table at its top level, plus analytic ones under
costs["roofline"][gpu] with the same keys (megapuzzle.roofline); `source=` picks one.
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Any

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant
from megapuzzle.blocks.registry import subblocks_of_name
from megapuzzle.errors import UserError

FORMAT = "megapuzzle-costs/1"
PHASES = ("prefill", "decode")


def load_costs(path: str | os.PathLike) -> dict[str, Any]:
    """costs.json as a dict, checked for the format and the table keys (one-line UserError)."""
    try:
        with open(path) as fh:
            costs = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run `megapuzzle measure --run-dir RUN` first") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid json ({e}); re-run `megapuzzle measure`") from None
    if not isinstance(costs, dict) or costs.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} file; re-run `megapuzzle measure`")
    for key in ("grid", "baseline", "empty_layer", "variants"):
        if key not in costs:
            raise UserError(f"{path} lacks '{key}'; re-run `megapuzzle measure`")
    return costs


def cost_table(costs: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """The measured table (source None or "measured") or the roofline table of a GPU ("h100", ...)."""
    if source in (None, "measured"):
        return costs
    from megapuzzle.roofline import gpu_key

    try:
        key = gpu_key(source)
    except ValueError as e:
        raise UserError(str(e)) from None
    tables = costs.get("roofline") or {}
    if key not in tables:
        raise UserError(f"costs have no roofline table for {source!r} (have: {sorted(tables) or 'none'}); "
                        f"add it to measure.roofline_gpus and re-run `megapuzzle measure`")
    return tables[key]


def variant_key(variant: str | AttentionVariant | FFNVariant, subblock: str | None = None) -> str:
    """"attention.NAME" / "ffn.NAME" for a variant object, a prefixed name, or a name + subblock."""
    if isinstance(variant, AttentionVariant):
        return f"attention.{variant.name}"
    if isinstance(variant, FFNVariant):
        return f"ffn.{variant.name}"
    name = str(variant)
    if name.startswith(("attention.", "ffn.")):
        return name
    if subblock in ("attention", "ffn"):
        return f"{subblock}.{name}"
    owners = subblocks_of_name(name)  # the kinds that parse it (megapuzzle.blocks)
    if len(owners) == 1:
        return f"{owners[0]}.{name}"
    raise ValueError(f"variant name {name!r} is ambiguous; write attention.{name} or ffn.{name}")


def _interp1(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear in x, exact at grid points, linear extrapolation from the end segments."""
    if len(xs) == 1:
        return float(ys[0])
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return float(ys[i])
    i = min(max(i, 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def grid_value(table: dict[str, Any], matrix: list[list[float]], batch: int, seq: int) -> float:
    """`matrix` (indexed [batch][seq] on the table's grid) at (batch, seq), interpolated in between."""
    bs, ss = table["grid"]["batch_sizes"], table["grid"]["seq_lens"]
    b_order, s_order = sorted(range(len(bs)), key=bs.__getitem__), sorted(range(len(ss)), key=ss.__getitem__)
    xs_s = [ss[j] for j in s_order]
    rows = [_interp1(xs_s, [matrix[i][j] for j in s_order], seq) for i in b_order]
    return _interp1([bs[i] for i in b_order], rows, batch)


def _phase(table: dict[str, Any], phase: str) -> str:
    if phase not in table.get("phases", PHASES):
        raise ValueError(f"phase {phase!r} not in this cost table (has {table.get('phases')})")
    return phase


def _variant_entry(table: dict[str, Any], variant, subblock: str | None = None) -> tuple[str, dict]:
    key = variant_key(variant, subblock)
    if key.endswith(".no_op") and key not in table["variants"]:
        return key, {"param_count": 0, "param_bytes": 0, "kv_bytes_per_token": 0, "runtime": None}
    try:
        return key, table["variants"][key]
    except KeyError:
        raise KeyError(f"no costs for {key}; it is not in the measured search space "
                       f"(have {sorted(table['variants'])})") from None


def variant_cost(costs: dict[str, Any], variant: str | AttentionVariant | FFNVariant, phase: str,
                 batch: int, seq: int, *, source: str | None = None, subblock: str | None = None) -> float:
    """Seconds one layer's subblock adds (marginal over an empty layer), at a grid point or
    interpolated between grid points. Negative medians (noise around zero for tiny subblocks)
    read as 0: a subblock cannot make a model faster."""
    table = cost_table(costs, source)
    _, entry = _variant_entry(table, variant, subblock)
    if entry["runtime"] is None:
        return 0.0
    return max(0.0, grid_value(table, entry["runtime"][_phase(table, phase)]["median"], batch, seq))


def variant_memory(costs: dict[str, Any], variant, *, source: str | None = None,
                   subblock: str | None = None) -> dict[str, int]:
    """{"param_count", "param_bytes", "kv_bytes_per_token"} of one layer's subblock."""
    _, entry = _variant_entry(cost_table(costs, source), variant, subblock)
    return {k: int(entry[k]) for k in ("param_count", "param_bytes", "kv_bytes_per_token")}


def fixed_runtime(costs: dict[str, Any], num_layers: int, phase: str, batch: int, seq: int, *,
                  source: str | None = None) -> float:
    """Seconds outside the subblocks: embeddings + final norm + head, plus `num_layers` empty layers."""
    table = cost_table(costs, source)
    ph = _phase(table, phase)
    base = grid_value(table, table["baseline"][ph]["median"], batch, seq)
    empty = grid_value(table, table["empty_layer"][ph]["median"], batch, seq)
    return max(0.0, base) + num_layers * max(0.0, empty)


def predict_runtime(costs: dict[str, Any], arch: Architecture, batch: int, seq: int, phase: str, *,
                    source: str | None = None) -> float:
    """Predicted seconds of a whole-model prefill (or one decode step) of `arch`:
    fixed_runtime + sum over layers of variant_cost(attention) + variant_cost(ffn)."""
    total = fixed_runtime(costs, arch.num_layers, phase, batch, seq, source=source)
    for layer in arch.layers:
        total += variant_cost(costs, layer.attention, phase, batch, seq, source=source)
        total += variant_cost(costs, layer.ffn, phase, batch, seq, source=source)
    return total


def predict_generation_time(costs: dict[str, Any], arch: Architecture, batch: int, prefill_len: int,
                            gen_len: int, *, source: str | None = None) -> dict[str, float]:
    """What megapuzzle.costs.timing.measure_model_throughput measures, predicted: one prefill of
    `prefill_len` tokens (giving the first new token), then gen_len - 1 decode steps with
    prefill_len, prefill_len + 1, ... tokens cached."""
    if gen_len < 1:
        raise ValueError(f"gen_len must be >= 1, got {gen_len}")
    prefill = predict_runtime(costs, arch, batch, prefill_len, "prefill", source=source)
    decode = sum(predict_runtime(costs, arch, batch, prefill_len + t, "decode", source=source)
                 for t in range(gen_len - 1))
    total = prefill + decode
    return {"prefill_s": prefill, "decode_s": decode, "total_s": total,
            "tokens_per_s": batch * gen_len / total if total > 0 else float("inf")}


def throughput_settings(costs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments that make `measure_model_throughput` time like this costs.json was
    measured (threads, clock, dtype, fp8), so measured and predicted speedups compare."""
    return {"threads": costs.get("threads"), "clock": costs.get("clock", "wall"), "dtype": costs.get("dtype", "auto"),
            "fp8": costs.get("precision") == "fp8", "fp8_recipe": costs.get("fp8_recipe") or "delayed"}


def parent_check_rows(costs: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored whole-parent agreement rows (predicted vs measured), [] when absent."""
    return list((costs.get("check") or {}).get("rows", []))
