"""The equal-speed comparison (megapuzzle.bench.frontier): envelope, grid table, best ranges."""

from __future__ import annotations

import pytest

from megapuzzle.bench.frontier import best_ranges, envelope, envelope_steps, equal_speed_table, speed_grid

A = [(1.3, 99.0), (1.6, 98.0), (2.1, 95.0), (1.5, 97.0)]  # (1.5, 97) is dominated by (1.6, 98)
B = [(1.25, 99.5), (1.8, 96.0), (2.5, 93.0)]


def test_envelope_is_the_best_child_at_least_that_fast():
    assert envelope(A, 1.0) == 99.0
    assert envelope(A, 1.3) == 99.0          # >= is inclusive
    assert envelope(A, 1.31) == 98.0         # 1.3 is too slow now; 1.6 serves
    assert envelope(A, 1.55) == 98.0
    assert envelope(A, 1.61) == 95.0
    assert envelope(A, 2.1) == 95.0
    assert envelope(A, 2.11) is None         # nothing that fast
    assert envelope([(1.5, None), (None, 90.0)], 1.0) is None  # unevaluated children are ignored


def test_envelope_is_monotone_and_matches_brute_force():
    pts = [(1.0 + 0.1 * (k * 7 % 13), 90 + (k * 5 % 11)) for k in range(12)]
    prev = float("inf")
    for s in [1.0 + 0.01 * i for i in range(260)]:
        v = envelope(pts, s)
        brute = max([q for sp, q in pts if sp >= s], default=None)
        assert v == brute
        if v is not None:
            assert v <= prev
            prev = v


def test_envelope_steps_drops_dominated_children():
    assert envelope_steps(A) == [(2.1, 95.0), (1.6, 98.0), (1.3, 99.0)]
    assert envelope_steps([(2.0, 99.0), (1.5, 98.0)]) == [(2.0, 99.0)]  # the slower, worse child is no corner


def test_equal_speed_table_and_grid():
    grid = speed_grid({"a": A, "b": B}, lo=1.2, step=0.4)
    assert grid == [1.2, 1.6, 2.0, 2.4]      # up to the fastest child, 2.5
    tab = equal_speed_table({"a": A, "b": B}, grid)
    assert tab == {"a": [99.0, 98.0, 95.0, None], "b": [99.5, 96.0, 93.0, 93.0]}
    assert speed_grid({"a": [(1.1, 99.0)]}, lo=1.2) == []


def test_best_ranges_are_exact_intervals():
    ranges, segs = best_ranges({"a": A, "b": B}, lo=1.0)
    # b to 1.25 (99.5 vs 99); a to 1.6 (99/98 vs 96); on (1.6, 1.8] a can only offer its 2.1x child (95)
    # while b's 1.8x child gives 96; a again to 2.1 (95 vs 93); b alone past a's fastest child
    assert segs == [(1.0, 1.25, ["b"]), (1.25, 1.6, ["a"]), (1.6, 1.8, ["b"]), (1.8, 2.1, ["a"]), (2.1, 2.5, ["b"])]
    assert ranges == {"a": [(1.25, 1.6), (1.8, 2.1)], "b": [(1.0, 1.25), (1.6, 1.8), (2.1, 2.5)]}


def test_best_ranges_share_ties_and_agree_with_sampling():
    c = [(1.4, 99.0), (2.0, 95.0)]
    d = [(1.7, 99.0), (2.0, 94.0)]
    ranges, segs = best_ranges({"c": c, "d": d}, lo=1.0)
    assert segs == [(1.0, 1.4, ["c", "d"]), (1.4, 1.7, ["d"]), (1.7, 2.0, ["c"])]
    assert ranges["c"] == [(1.0, 1.4), (1.7, 2.0)] and ranges["d"] == [(1.0, 1.7)]
    curves = {"a": A, "b": B, "c": c}
    ranges, _ = best_ranges(curves, lo=1.0)
    for s in [1.0 + 0.005 * i + 0.0025 for i in range(300)]:  # sample midpoints: winners match the intervals
        vals = {m: envelope(p, s) for m, p in curves.items()}
        vals = {m: v for m, v in vals.items() if v is not None}
        if not vals:
            assert all(not any(a < s <= b for a, b in r) for r in ranges.values())
            continue
        top = max(vals.values())
        for m in curves:
            inside = any(a < s <= b for a, b in ranges[m])
            assert inside == (m in vals and vals[m] == top), (s, m)


@pytest.mark.parametrize("tol", [0.0, 0.6])
def test_tolerance_widens_ties(tol):
    ranges, _ = best_ranges({"a": [(2.0, 98.0)], "b": [(2.0, 98.5)]}, lo=1.0, tol=tol)
    assert ranges["b"] == [(1.0, 2.0)]
    assert ranges["a"] == ([(1.0, 2.0)] if tol else [])


def test_the_equal_speed_section_exists_when_no_child_reaches_the_grid_start():
    # a loaded CI machine can measure every child below 1.2x (even below 1.0x): the table and the
    # "where best" list must still be there, starting at the fastest child rounded down
    from megapuzzle.bench.search_quality import equal_speed_markdown

    rows = [{"method": "a", "measured_x": 0.93, "retention_pct": 99.0, "retention_before_gkd_pct": 98.0},
            {"method": "b", "measured_x": 1.04, "retention_pct": 97.0, "retention_before_gkd_pct": 96.0}]
    md = equal_speed_markdown(rows, ("a", "b"))
    assert md.count("measured speedup is >= s") == 2 and md.count("Where each method is best") == 2
    assert "| 1.00 | - | **97.0** |" in md and "| 0.90 |" not in md  # grid starts at floor(1.04 / 0.1) * 0.1
    assert "- a: best in (0.90, 0.93]" in md  # the list starts below 1.0x when a child is that slow
    assert "- b: best in (0.93, 1.04]" in md
