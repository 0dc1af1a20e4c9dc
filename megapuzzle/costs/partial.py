"""What `measure` shares between its engines (Megatron in process, vLLM out of process): the
variants a search space needs timed, and the resumable record of finished measurements."""

from __future__ import annotations

import logging
import json
from pathlib import Path
from typing import Any

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, SearchSpace
from megapuzzle.fileio import atomic_write_json

log = logging.getLogger(__name__).info


def search_space_variants(parent: Architecture, space: SearchSpace | None = None
                          ) -> tuple[list[AttentionVariant], list[FFNVariant]]:
    """Every attention and FFN variant any layer may take, deduplicated, in first-seen order."""
    space = space or SearchSpace()
    attn: dict[AttentionVariant, None] = {}
    ffn: dict[FFNVariant, None] = {}
    for i in range(parent.num_layers):
        attn.update(dict.fromkeys(space.attention_variants(parent, i)))
        ffn.update(dict.fromkeys(space.ffn_variants(parent, i)))
    L = parent.num_layers
    for n in range(2, space.fusion_max_run + 1):  # FFN Fusion: a run's FFNs as one of the summed width
        for i in range(L - n + 1):
            if all(parent.layers[k].ffn.parent_like for k in range(i, i + n)):
                ffn.setdefault(FFNVariant("mlp", sum(parent.layers[k].ffn.intermediate_size for k in range(i, i + n))))
                narrower = set.intersection(*[{v for v in space.ffn_variants(parent, k) if v.parent_like}
                                              for k in range(i, i + n)])  # run blocks started from those
                for v in sorted(narrower, key=lambda v: -v.intermediate_size):
                    ffn.setdefault(FFNVariant("mlp", n * v.intermediate_size))
    return list(attn), list(ffn)


class MeasurePartial:
    """RUN/state/measure_partial.json: raw samples of finished (entry, pass) pairs, under the
    settings they were measured with; other settings start afresh."""

    def __init__(self, path: Path | None, settings: dict[str, Any]):
        self.path, self.settings, self.entries = path, settings, {}
        if path is not None and path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
            if old.get("settings") == settings:
                self.entries = dict(old.get("entries", {}))
                if self.entries:
                    log(f"resuming: {sum(map(len, self.entries.values()))} (entry, pass) results in {path}")
            elif old:
                changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                                 if settings.get(k) != old.get("settings", {}).get(k))
                log(f"settings changed ({', '.join(changed)}); measuring afresh")

    def done(self, name: str, p: int) -> bool:
        return str(p) in self.entries.get(name, {})

    def save(self, name: str, p: int, result: dict[str, Any]) -> None:
        self.entries.setdefault(name, {})[str(p)] = result
        if self.path is not None:
            atomic_write_json(self.path, {"settings": self.settings, "entries": self.entries})

    def pooled(self, name: str, passes: int) -> dict[str, Any]:
        """{key: {phase: {"median", "iqr"}}} over the samples of passes 0 .. passes-1."""
        from megapuzzle.costs.timing import summarize

        out: dict[str, Any] = {}
        for result in (self.entries[name][str(p)] for p in range(passes)):
            for key, grid in result.items():
                for ph, rows in grid.items():
                    acc = out.setdefault(key, {}).setdefault(ph, [[[] for _ in r] for r in rows])
                    for i, r in enumerate(rows):
                        for j, cell in enumerate(r):
                            acc[i][j].extend(cell)
        return {key: {ph: {stat: [[summarize(c)[stat] for c in r] for r in rows] for stat in ("median", "iqr")}
                      for ph, rows in g.items()} for key, g in out.items()}
