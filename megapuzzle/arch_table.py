"""An Architecture as a markdown table, one row per layer (`megapuzzle info`, reports)."""

from __future__ import annotations

from megapuzzle.arch import Architecture


def architecture_table(arch: Architecture) -> str:
    rows = ["| layer | attention | ffn | params |", "|---:|---|---|---:|"]
    for i, l in enumerate(arch.layers):
        rows.append(f"| {i} | {l.attention.name} | {l.ffn.name} | {arch.layer_params(i):,} |")
    return "\n".join(rows)
