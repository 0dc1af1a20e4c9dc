"""The registry's runner: the one skip / re-run / record loop over a run's stages.

`megapuzzle run` (megapuzzle.pipeline) runs the registry's stages through it, and every baseline
child of the search-quality bench (megapuzzle.bench.baselines) its own three steps, so both
resume, skip and re-run by the same rules, recorded in a manifest.json (written atomically).
Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from megapuzzle.fileio import atomic_write_json

log = logging.getLogger(__name__).info


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str)) if d is not None else {}


@dataclasses.dataclass
class Step:
    """One stage of a run as the manifest sees it."""

    name: str
    config: dict
    """What decides "unchanged": a finished step with the same config hash is skipped."""
    fn: Callable[[], dict]
    """Runs it; returns its JSON-able result for the manifest."""


def run_steps(manifest_path: Path, manifest: dict, steps: list[Step], *, only: str | None = None,
              until: str | None = None, label: str = "") -> dict:
    """The one skip / re-run / record loop (`megapuzzle run` and every baseline child use it).

    A finished step whose config is unchanged is skipped; a step whose config changed runs, and so
    does every step after it; an interrupted one ("running") runs again. Each step's status, config,
    timing and result go to the manifest (atomic) before and after it runs."""
    manifest.setdefault("stages", {})
    names = [s.name for s in steps]
    dirty = False  # a step before this one ran: everything after runs too
    n = len(steps)
    for i, st in enumerate(steps, 1):
        name = st.name
        if only and name != only:
            continue
        h = config_hash(st.config)
        prev = manifest["stages"].get(name, {})
        if not only and not dirty and prev.get("status") == "done" and prev.get("config_hash") == h:
            log(f"{label}[{i}/{n}] {name}: done, config unchanged - skipped")
            if until == name:
                break
            continue
        why = ("resuming an interrupted run" if prev.get("status") == "running" else
               "config changed" if prev.get("status") == "done" and prev.get("config_hash") != h else
               "an earlier stage ran" if prev.get("status") in ("done", "stale") else "first run")
        log(f"{label}[{i}/{n}] {name}: running ({why})")
        manifest["stages"][name] = {"status": "running", "config": st.config, "config_hash": h,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(manifest_path, manifest)
        t0 = time.perf_counter()
        try:
            result = st.fn()
        except BaseException as e:
            manifest["stages"][name].update(status="failed" if not isinstance(e, KeyboardInterrupt) else "running",
                                            error=f"{type(e).__name__}: {e}")
            atomic_write_json(manifest_path, manifest)
            raise
        manifest["stages"][name].update(status="done", wall_s=round(time.perf_counter() - t0, 2),
                                        finished=time.strftime("%Y-%m-%dT%H:%M:%S"), result=jsonable(result))
        for later in names[i:]:  # their inputs changed: never skip them on a later invocation
            if manifest["stages"].get(later, {}).get("status") == "done":
                manifest["stages"][later]["status"] = "stale"
        atomic_write_json(manifest_path, manifest)
        log(f"{label}[{i}/{n}] {name}: done in {time.perf_counter() - t0:.1f}s")
        dirty = True
        if until == name:
            break
    return manifest


