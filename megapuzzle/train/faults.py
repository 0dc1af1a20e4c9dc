"""Simulated kill -9 for the resume tests. Every resumable loop reports each unit of work it
finishes (`reached(loop, count, item)`); a test arms a loop with `kill_after(loop, n)` and the
loop then stops at its n-th unit exactly where a kill would leave it (nothing saved since its last
checkpoint), or records what it did with `recording(loop)`. Production code never arms or records,
so the loops' signatures carry no test switches.

    with faults.kill_after("gkd", 3):
        assert run_gkd(run, cfg) == {"stopped_at": 3}

Loops: "train-parent", "bld", "gkd" (optimizer steps), "score" (blocks scored), "measure"
(entries measured; the kill raises `Killed` out of measure_costs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_ARMED: dict[str, int] = {}
_RECORDS: dict[str, list] = {}


class Killed(Exception):
    """Raised where a loop cannot return early: the simulated kill."""


def reached(loop: str, count: int, item: Any = None) -> bool:
    """True when `loop` must stop now (a test armed it for `count`); records `item` when recording."""
    if loop in _RECORDS and item is not None:
        _RECORDS[loop].append(item)
    n = _ARMED.get(loop)
    return n is not None and count >= n


@contextlib.contextmanager
def kill_after(loop: str, n: int) -> Iterator[None]:
    _ARMED[loop] = n
    try:
        yield
    finally:
        _ARMED.pop(loop, None)


@contextlib.contextmanager
def recording(loop: str) -> Iterator[list]:
    """The items `loop` reports while the block runs, in order."""
    _RECORDS[loop] = out = []
    try:
        yield out
    finally:
        _RECORDS.pop(loop, None)
