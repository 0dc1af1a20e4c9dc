"""Equal-speed comparison of compression methods (megapuzzle bench search-quality).

A method's children land at whatever speed they land at (a target is only a request to the
selection; the measured speedup differs), so methods are compared on their *frontier
envelope*: a method's quality at measured speed s is the best quality among its children whose
measured speedup is >= s,

    Q_m(s) = max { q_c : c a child of m, speed_c >= s }        (undefined above m's fastest child)

a non-increasing step function: a child that runs faster than s could serve at s, a slower
one could not. Q_m changes only at the speeds of m's children, so every question below is
answered exactly from the breakpoints (no sampling grid):

* `envelope(points, s)`            Q_m(s)
* `envelope_steps(points)`         the (speed, quality) corners of Q_m, fastest first
* `equal_speed_table(curves, g)`   Q_m at each speed of the grid g, per method
* `best_ranges(curves, lo)`        per method, the measured-speed intervals (a, b] above lo where
                                   its Q_m is the highest (ties within `tol` are shared)

Pure Python on small inputs (tested in tests/test_bench_frontier.py).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

Point = tuple[float, float]  # (measured speedup, quality)


def _clean(points: Iterable[Point]) -> list[Point]:
    out = []
    for s, q in points:
        if s is None or q is None or not (math.isfinite(s) and math.isfinite(q)):
            continue
        out.append((float(s), float(q)))
    return out


def envelope(points: Iterable[Point], s: float) -> float | None:
    """Best quality among points with speed >= s; None when no point is that fast."""
    vals = [q for sp, q in _clean(points) if sp >= s]
    return max(vals) if vals else None


def envelope_steps(points: Iterable[Point]) -> list[Point]:
    """The corners of the envelope, fastest first: (speed_i, Q(speed_i)) for every speed where Q
    rises as s falls (points dominated by a faster, better one are not corners)."""
    out: list[Point] = []
    best = -math.inf
    for sp, q in sorted(_clean(points), key=lambda p: (-p[0], -p[1])):
        if q > best:
            out.append((sp, q))
            best = q
    return out


def equal_speed_table(curves: Mapping[str, Sequence[Point]], grid: Sequence[float]) -> dict[str, list[float | None]]:
    """Per method, Q_m at every speed of `grid`."""
    return {m: [envelope(pts, s) for s in grid] for m, pts in curves.items()}


def speed_grid(curves: Mapping[str, Sequence[Point]], lo: float = 1.2, step: float = 0.1) -> list[float]:
    """lo, lo + step, ... up to the fastest child of any method."""
    top = max((sp for pts in curves.values() for sp, _ in _clean(pts)), default=lo)
    n = int(math.floor((top - lo) / step + 1e-9))
    return [round(lo + k * step, 6) for k in range(max(n, 0) + 1)] if top >= lo else []


def best_ranges(curves: Mapping[str, Sequence[Point]], lo: float = 1.0, tol: float = 0.0
                ) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[float, float, list[str]]]]:
    """Where each method is best. Returns (per method: merged intervals (a, b] of measured speed,
    a >= lo, where its Q_m is within `tol` of the highest; the segments: (a, b, winners) in
    increasing speed). Above every method's fastest child nothing is defined; a method that
    cannot reach a segment does not compete in it."""
    clean = {m: _clean(p) for m, p in curves.items()}
    bps = sorted({sp for pts in clean.values() for sp, _ in pts if sp > lo})
    segs: list[tuple[float, float, list[str]]] = []
    a = lo
    for b in bps:
        vals = {m: envelope(pts, b) for m, pts in clean.items()}  # constant on (a, b]
        vals = {m: v for m, v in vals.items() if v is not None}
        if vals:
            top = max(vals.values())
            win = sorted(m for m, v in vals.items() if v >= top - tol)
            if segs and segs[-1][2] == win and segs[-1][1] == a:
                segs[-1] = (segs[-1][0], b, win)
            else:
                segs.append((a, b, win))
        a = b
    ranges: dict[str, list[tuple[float, float]]] = {m: [] for m in curves}
    for a, b, win in segs:
        for m in win:
            if ranges[m] and ranges[m][-1][1] == a:
                ranges[m][-1] = (ranges[m][-1][0], b)
            else:
                ranges[m].append((a, b))
    return ranges, segs


def fmt_ranges(rs: Sequence[tuple[float, float]]) -> str:
    return ", ".join(f"({a:.2f}, {b:.2f}]" for a, b in rs) if rs else "nowhere"
