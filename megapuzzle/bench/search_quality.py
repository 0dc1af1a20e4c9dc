"""`megapuzzle bench search-quality`: which method gives the best child at equal MEASURED speed?

    megapuzzle run examples/cpu_demo.yaml --run-dir runs/cpu_demo --until mip
    megapuzzle bench search-quality --config examples/cpu_demo.yaml --run-dir runs/cpu_demo \\
        --out benchmarks/results/search_quality/stdlib [--targets 1.2 1.4 1.6 1.8 2.0 2.4 2.8 3.2] \\
        [--gkd-steps 60] [--work-dir runs/cpu_demo_sq_bench] [--methods puzzle uniform ...] [--threads 1]

Sweep: every method (METHOD_INFO; puzzle = the MIP through stages.mip.mip.run_mip; puzzle_fusion = the
tiling MIP with fused-run candidates, from a base run with run blocks (tools/add_fusion_inputs.py)
and a config with search_space.fusion_max_run >= 2; uniform, depth, random, greedy =
megapuzzle.bench.baselines) is asked for a child at each target, in increasing
order, target-major (so an interrupted sweep has every method's low targets). A method stops at
the first target its selection cannot meet; the last target it met is recorded as its max.
A selection that picks the same architecture as the method's previous target is not trained
again (the row says `same as`). Every child gets the same GKD (the config's gkd: section,
with --gkd-steps overriding its steps for the whole sweep) and the same evaluate.

Comparison (megapuzzle.bench.frontier): a method's quality at measured speed s is the best of
its children whose measured speedup is >= s (a monotone frontier envelope). The table gives
that at a grid of speeds, after GKD and before GKD (the realized child), and per method the
measured-speed range where it is best. WORK defaults to RUN_sq_bench next to RUN (RUN itself is
never written); each child is a resumable run directory (a re-run skips finished stages).
Writes to --out:

    table.md                     the command, the equal-speed tables, where each method is best,
                                 (with puzzle and puzzle_fusion: the paired with/without-fusion
                                 section), every child (method, target, predicted, measured, ...)
    results.json                 the rows + the parent's metrics + the envelopes
    quality_vs_throughput.png    retention against MEASURED speedup, one curve (envelope) per
                                 method; left after GKD, right before GKD
"""

from __future__ import annotations

import logging
import argparse
import copy
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megapuzzle.bench.frontier import best_ranges, envelope_steps, equal_speed_table, fmt_ranges, speed_grid
from megapuzzle.config import load_config
from megapuzzle.errors import UserError
from megapuzzle.logs import prefixed
from megapuzzle.fileio import atomic_write_json, atomic_write_text, save_figure_atomic

log = logging.getLogger(__name__).info

BENCHMARKS = ("search-quality",)
# every method the bench can sweep: (plot colour, marker, what it is). A new method needs an entry
# here and in megapuzzle.bench.baselines.ALL_METHODS / run_child.
METHOD_INFO = {
    "puzzle": ("tab:red", "*", "Puzzle: the MIP over the BLD library"),
    "greedy": ("tab:purple", "D", "greedy on the same library and scores"),
    "uniform": ("tab:blue", "s", "uniform width (same KV heads + FFN width everywhere; pruning init, no BLD)"),
    "depth": ("tab:green", "^", "depth: whole layers dropped by block influence (ShortGPT)"),
    "random": ("tab:grey", "o", "random library pairs (rejection sampling at the target)"),
    "puzzle_fusion": ("tab:orange", "P", ("Puzzle + FFN Fusion: the tiling MIP with fused-run candidates "
                                          "(search_space.fusion_max_run; RUN/library_runs)")),
}
DEFAULT_METHODS = ("puzzle", "greedy", "uniform", "depth", "random")
DEFAULT_TARGETS = (1.2, 1.4, 1.6, 1.8, 2.0, 2.4, 2.8, 3.2)
STYLE = {m: v[:2] for m, v in METHOD_INFO.items()}


def default_work_dir(run_dir: str | Path) -> Path:
    root = Path(run_dir).resolve()
    return root.with_name(f"{root.name}_sq_bench")


def row_from(res: dict[str, Any]) -> dict[str, Any]:
    """One table row from run_child's result (eval.json numbers, the selection's prediction)."""
    ev, rec = res["eval"], res["record"]
    row = {"method": res["method"], "target": res["throughput_x"], "dir": res["dir"],
           "predicted_x": rec.get("predicted_speedup"), "objective": rec.get("objective"),
           "layers": [f"{l['attention']}+{l['ffn']}" for l in rec["layers"]], "stage_wall_s": res["stages"],
           "runs": rec.get("runs") or []}  # fused runs [first, last] (puzzle_fusion)
    if ev:
        c, p = ev["child"], ev["parent"]
        row.update(measured_x=ev["speedup"]["measured"], predicted_x_eval=ev["speedup"]["predicted"],
                   params=c["params"], params_frac=c["params"] / p["params"], lm_loss=c["lm_loss"],
                   accuracy=c["accuracy"], kl=c["kl_to_parent"], retention_pct=ev["quality_retention_pct"],
                   retention_before_gkd_pct=(100 * ev["child_realized"]["accuracy"] / p["accuracy"]
                                             if ev.get("child_realized") and p["accuracy"] > 0 else None),
                   kl_before_gkd=(ev.get("child_realized") or {}).get("kl_to_parent"))
    return row


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def table_markdown(rows: list[dict], parent: dict | None, command: str, header: str = "") -> str:
    lines = ["# Search quality: Puzzle vs the baselines at equal measured speed", "", "```bash", command, "```",
             ""]
    if header:
        lines += [header, ""]
    lines += ["| method | target | predicted x | measured x | params | params % | summed block score | held-out loss | "
              "accuracy | KL to parent | retention % | retention before GKD % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if parent:
        lines.append(f"| parent | 1.0 | 1.00 | 1.00 | {parent['params']:,} | 100.0 | 0 | {parent['lm_loss']:.4f} | "
                     f"{parent['accuracy']:.4f} | 0 | 100.0 | 100.0 |")
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['target']:g} | failed: {r['error']} |" + " |" * 9)
            continue
        if r.get("same_as"):
            lines.append(f"| {r['method']} | {r['target']:g} | {_f(r.get('predicted_x'), '.2f')} | same child as "
                         f"{r['same_as']:g}x |" + " |" * 8)
            continue
        lines.append(
            f"| {r['method']} | {r['target']:g} | {_f(r.get('predicted_x'), '.2f')} | {_f(r.get('measured_x'), '.2f')} | "
            f"{_f(r.get('params'), ',')} | {_f(r.get('params_frac') and 100 * r['params_frac'], '.1f')} | {_f(r.get('objective'), '.4f')} | "
            f"{_f(r.get('lm_loss'), '.4f')} | {_f(r.get('accuracy'), '.4f')} | {_f(r.get('kl'), '.4f')} | "
            f"{_f(r.get('retention_pct'), '.1f')} | {_f(r.get('retention_before_gkd_pct'), '.1f')} |")
    lines.append("")
    arch = [r for r in rows if r.get("layers") and not r.get("same_as")]
    if arch:
        lines += ["", "Architectures (layer 0 first, attention+FFN):", ""]
        lines += [f"- {r['method']} {r['target']:g}x: " + ", ".join(f"`{la}`" for la in r["layers"]) for r in arch]
    return "\n".join(lines) + "\n"


def _curves(rows: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
    """Per method (in first-seen order) the (measured speedup, quality) points of its children."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        out.setdefault(r["method"], [])
        if r.get("measured_x") is not None and r.get(key) is not None and not r.get("same_as"):
            out[r["method"]].append((r["measured_x"], r[key]))
    return out


def equal_speed_markdown(rows: list[dict], methods, *, lo: float = 1.2, step: float = 0.1, tol: float = 0.0) -> str:
    """The equal-speed tables (after and before GKD) and where each method is best."""
    lines = []
    for key, what in (("retention_pct", "after GKD"), ("retention_before_gkd_pct", "before GKD (the realized child)")):
        curves = {m: p for m, p in _curves(rows, key).items() if m in methods}
        top = max((sp for pts in curves.values() for sp, _ in pts), default=None)
        if top is None:
            continue
        # a machine where no child reaches `lo` (a loaded 2-core CI box) still gets a table: it
        # starts at the fastest child's speed rounded down to the step
        grid = speed_grid(curves, lo, step) or speed_grid(curves, math.floor(top / step) * step, step)
        tab = equal_speed_table(curves, grid)
        lines += [f"### Retention % {what} at equal measured speed", "",
                  "Rule: a method's retention at measured speedup s = the best retention among its children whose "
                  "measured speedup is >= s (monotone frontier envelope); `-` = no child of that method is that fast. "
                  "Bold: the best at that speed.", "",
                  "| measured speedup >= | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
        for i, sp in enumerate(grid):
            vals = [tab[m][i] for m in curves]
            top = max((v for v in vals if v is not None), default=None)
            cells = ["-" if v is None else (f"**{v:.1f}**" if top is not None and v >= top - tol else f"{v:.1f}")
                     for v in vals]
            lines.append(f"| {sp:.2f} | " + " | ".join(cells) + " |")
        start = min(1.0, math.floor(min(sp for pts in curves.values() for sp, _ in pts) / step) * step)
        ranges, segs = best_ranges(curves, lo=start, tol=tol)
        lines += ["", f"Where each method is best ({what}; measured-speed intervals (a, b], exact over the envelopes' "
                      f"breakpoints from {start:.1f}x to the fastest child; ties shared):", ""]
        for m in curves:
            top = max((sp for sp, _ in curves[m]), default=None)
            lines.append(f"- {m}: best in {fmt_ranges(ranges[m])}; fastest child {'n/a' if top is None else f'{top:.2f}x'}")
        lines += ["", "Segments: " + "; ".join(f"({a:.2f}, {b:.2f}] {'+'.join(w)}" for a, b, w in segs), ""]
    return "\n".join(lines) + "\n"


def speed_at_quality(points, q: float) -> float | None:
    """The fastest measured speedup among children with retention >= q (None: none that good)."""
    return max((sp for sp, r in points if r >= q - 1e-9), default=None)


def fusion_markdown(rows: list[dict], base: str = "puzzle", fused: str = "puzzle_fusion") -> str:
    """Puzzle with vs without fused-run candidates (same parent, library, scores, costs, GKD):
    per target the two children, how many fused children use a run, and per quality level the
    measured speedup each reaches (speed gained at equal quality = fused / base)."""
    by = {m: {r["target"]: r for r in rows if r["method"] == m} for m in (base, fused)}
    if not by[base] or not by[fused]:
        return ""
    trained = [r for r in by[fused].values() if not r.get("error") and not r.get("same_as")]
    with_runs = [r for r in trained if r.get("runs")]
    lines = [f"### {fused} vs {base}: the same targets, paired", "",
             "Where both pick the same architecture the two children are the same model trained the same way: "
             "their measured speeds differ only by timing noise (the noise floor of every speed comparison here).",
             "",
             f"{len(with_runs)} of {len(trained)} trained {fused} children use a fused run"
             + (" (" + ", ".join(f"{r['target']:g}x: layers " + " ".join(f"{a}-{b}" for a, b in r["runs"])
                                 for r in with_runs) + ")" if with_runs else "") + ".", "",
             f"| target | {base} measured x | {fused} measured x | {base} retention % | {fused} retention % | "
             f"{fused} runs | same architecture | {base} summed score | {fused} summed score |",
             "|---:|---:|---:|---:|---:|---|---|---:|---:|"]

    def cell(r, k, fmt):
        if r is None:
            return "n/a"
        if r.get("error"):
            return "failed"
        return _f(r.get(k), fmt) + (f" (= {r['same_as']:g}x)" if r.get("same_as") and k == "measured_x" else "")

    for t in sorted(set(by[base]) | set(by[fused])):
        a, b = by[base].get(t), by[fused].get(t)
        runs = "n/a" if b is None or b.get("error") else (" ".join(f"{x}-{y}" for x, y in b.get("runs") or []) or "none")
        same = "n/a" if not (a and b and a.get("layers") and b.get("layers")) else (
            "yes" if a["layers"] == b["layers"] else "no")
        lines.append(f"| {t:g} | {cell(a, 'measured_x', '.2f')} | {cell(b, 'measured_x', '.2f')} | "
                     f"{cell(a, 'retention_pct', '.1f')} | {cell(b, 'retention_pct', '.1f')} | {runs} | {same} | "
                     f"{cell(a, 'objective', '.4f')} | {cell(b, 'objective', '.4f')} |")
    pts = _curves(rows, "retention_pct")
    qs = sorted({q for m in (base, fused) for _, q in pts.get(m, [])}, reverse=True)
    if qs:
        lines += ["", f"Measured speedup reached at equal quality (the fastest child with retention >= q after GKD; "
                      f"gain = {fused} / {base}):", "",
                  f"| retention >= % | {base} | {fused} | gain |", "|---:|---:|---:|---:|"]
        for q in qs:
            sa, sb = speed_at_quality(pts.get(base, []), q), speed_at_quality(pts.get(fused, []), q)
            gain = f"{sb / sa:.3f}" if sa and sb else "n/a"
            lines.append(f"| {q:.2f} | {_f(sa, '.2f')} | {_f(sb, '.2f')} | {gain} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    curves = {k: _curves(rows, k) for k in ("retention_pct", "retention_before_gkd_pct")}
    if not any(p for c in curves.values() for p in c.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13.0, 5.0), dpi=120)
    for ax, (key, title) in zip(axes, (("retention_pct", "after GKD"), ("retention_before_gkd_pct", "before GKD"))):
        ax.scatter([1.0], [100.0], marker="s", s=60, color="black", label="parent", zorder=5)
        for m, pts in curves[key].items():
            if not pts:
                continue
            color, marker = STYLE.get(m, ("tab:brown", "x"))
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, alpha=0.85,
                       s=90 if marker == "*" else 30, label=m, zorder=4)
            steps = envelope_steps(pts)  # fastest first; draw Q(s) as a step function from 1.0x
            xs, ys = [], []
            for i, (sp, q) in enumerate(reversed(steps)):
                left = 1.0 if i == 0 else list(reversed(steps))[i - 1][0]
                xs += [left, sp]
                ys += [q, q]
            ax.plot(xs, ys, color=color, linewidth=1.6, alpha=0.9)
        ax.set_xscale("log")  # 1.2x-2x is where it matters; depth can land at 10x
        ticks = [t for t in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16) if t <= ax.get_xlim()[1]]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("MEASURED speedup over the parent (generation throughput, log scale)")
        ax.set_ylabel(f"next-token accuracy retention {title} (% of parent)")
        ax.set_title(f"{title}: dots = children, lines = best child at >= that speed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return True


def command_line(args: argparse.Namespace) -> str:
    parts = ["megapuzzle", "bench", "search-quality", "--config", args.config, "--run-dir", args.run_dir,
             "--targets", *[f"{t:g}" for t in args.targets], "--out", args.out]
    if args.work_dir:
        parts += ["--work-dir", args.work_dir]
    if list(args.methods) != list(DEFAULT_METHODS):
        parts += ["--methods", *args.methods]
    for flag, v in (("--seed", args.seed), ("--gkd-steps", args.gkd_steps), ("--threads", args.threads)):
        if v:
            parts += [flag, str(v)]
    if args.uniform_steps != 16:
        parts += ["--uniform-steps", str(args.uniform_steps)]
    return " ".join(shlex.quote(p) for p in parts)


def sweep_config(cfg: dict, gkd_steps: int | None) -> dict:
    """The config every child gets: the gkd: section's steps replaced by --gkd-steps."""
    cfg = copy.deepcopy(cfg)
    if gkd_steps:
        g = dict(cfg.get("gkd") or {})
        g.pop("tokens", None)
        g["steps"] = int(gkd_steps)
        g["checkpoint_every"] = min(int(g.get("checkpoint_every", 50)), int(gkd_steps))
        cfg["gkd"] = g
    return cfg


@dataclass
class _Sweep:
    """One sweep's inputs and what it has found so far; writes table.md / results.json after every child."""

    config: str | Path
    run_dir: str | Path
    targets: list[float]
    out: Path
    work: Path
    methods: tuple
    seed: int
    steps: Any
    command: str
    rows: list[dict] = field(default_factory=list)
    parent: dict | None = None
    stopped: dict[str, dict] = field(default_factory=dict)
    k: int = 0
    t_all: float = field(default_factory=time.perf_counter)

    def header(self, final: bool) -> str:
        return ("" if final else f"**PARTIAL: the sweep had not finished when this was written (after child {self.k}; "
                f"methods still running: {', '.join(m for m in self.methods if m not in self.stopped)}).** ") + (
            f"Base run `{Path(self.run_dir).resolve()}`, children in `{self.work.resolve()}`; config `{self.config}`. "
            f"**Every child gets the same reduced GKD: {self.steps} steps** (gkd: section with --gkd-steps; "
            f"the config's own is {(load_config(self.config).get('gkd') or {}).get('steps', 'default')}) and the "
            f"same evaluate. `predicted x` is the selection's own prediction from costs.json (uniform widths "
            f"off the measured grid: interpolated); `measured x` is evaluate's CPU-clock timing against the "
            f"parent in the same process. Retention = child / parent next-token accuracy on data/heldout. "
            f"Random: rejection sampling (seed {self.seed}), the first draw within 5% above the target.")

    def write(self, final: bool = False) -> dict:
        header, stopped, rows = self.header(final), self.stopped, self.rows
        reach = [f"- {m}: " + (f"stopped at {stopped[m]['target']:g}x (max target met: "
                               f"{stopped[m]['max'] and format(stopped[m]['max'], 'g')}x): {stopped[m]['error']}"
                               if m in stopped else f"met every target swept (up to {max(self.targets):g}x; its max is higher)")
                 for m in self.methods]
        md = table_markdown(rows, self.parent, self.command, header).split("\n")
        i = md.index(header) + 2
        md = md[:i] + [equal_speed_markdown(rows, self.methods), fusion_markdown(rows), "### How far each method reaches",
                       "", *reach, "",
                       "### Every child", ""] + md[i:]
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "table.md", "\n".join(md))
        png = plot(rows, self.out / "quality_vs_throughput.png")
        env = {k: {m: envelope_steps(p) for m, p in _curves(rows, k).items()}
               for k in ("retention_pct", "retention_before_gkd_pct")}
        result = {"command": self.command, "config": str(self.config), "run_dir": str(Path(self.run_dir).resolve()),
                  "work_dir": str(self.work.resolve()), "targets": self.targets, "methods": list(self.methods),
                  "seed": self.seed, "gkd_steps": self.steps, "parent": self.parent, "rows": rows,
                  "stopped": stopped, "envelopes": env,
                  "plot": str(self.out / "quality_vs_throughput.png") if png else None, "complete": final,
                  "wall_s": time.perf_counter() - self.t_all}
        atomic_write_json(self.out / "results.json", result)
        return result

    def child(self, cfg: dict, m: str, t: float, uniform_steps: int | None) -> None:
        """Method m's child at target t: selected, then (unless the same architecture as its previous
        target's) trained and evaluated; a selection that cannot meet t stops the method."""
        from megapuzzle.bench.baselines import run_child
        from megapuzzle.mip import InfeasibleBudgetError

        k, rows = self.k, self.rows
        t0 = time.perf_counter()
        kw = dict(seed=self.seed, uniform_steps=uniform_steps)
        log(f"[bench] ({k}) {m} @ {t:g}x ...")
        try:
            with prefixed(f"  [{m} {t:g}x] "):
                sel = run_child(self.run_dir, cfg, m, t, self.work / f"{m}_x{t:g}", until="select", **kw)
            prev = [r for r in rows if r["method"] == m and not r.get("error") and not r.get("same_as")]
            same = next((r for r in prev if r["layers"] == [f"{l['attention']}+{l['ffn']}"
                                                            for l in sel["record"]["layers"]]), None)
            if same is not None:
                rows.append({**same, "target": t, "same_as": same["target"], "dir": sel["dir"],
                             "predicted_x": sel["record"].get("predicted_speedup")})
                log(f"[bench] ({k}) {m} @ {t:g}x: the same architecture as at {same['target']:g}x; not retrained")
                return
            with prefixed(f"  [{m} {t:g}x] "):
                res = run_child(self.run_dir, cfg, m, t, self.work / f"{m}_x{t:g}", **kw)
        except (UserError, InfeasibleBudgetError) as e:
            reached = [r["target"] for r in rows if r["method"] == m and not r.get("error")]
            self.stopped[m] = {"target": t, "max": max(reached) if reached else None, "error": str(e)}
            rows.append({"method": m, "target": t, "error": str(e)})
            log(f"[bench] ({k}) {m} @ {t:g}x FAILED, {m} stops here: {e}")
            return
        row = row_from(res)
        rows.append(row)
        if res["eval"]:
            p = res["eval"]["parent"]
            self.parent = {k2: p[k2] for k2 in ("params", "lm_loss", "accuracy", "tokens_per_s",
                                                "predicted_tokens_per_s") if k2 in p}
        log(f"[bench] ({k}) {m} @ {t:g}x: predicted {_f(row.get('predicted_x'), '.2f')}x, measured "
            f"{_f(row.get('measured_x'), '.2f')}x, retention {_f(row.get('retention_pct'), '.1f')}% (before GKD "
            f"{_f(row.get('retention_before_gkd_pct'), '.1f')}%) ({time.perf_counter() - t0:.0f}s; "
            f"{time.perf_counter() - self.t_all:.0f}s total)")


def run_search_quality(config: str | Path, run_dir: str | Path, targets, out: str | Path, *,
                       work_dir: str | Path | None = None, methods=DEFAULT_METHODS, seed: int = 0,
                       gkd_steps: int | None = None, uniform_steps: int | None = 16,
                       command: str | None = None) -> dict:
    from megapuzzle.bench.baselines import ALL_METHODS

    cfg = sweep_config(load_config(config), gkd_steps)
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise UserError(f"unknown method(s) {bad}; use some of {', '.join(ALL_METHODS)}")
    if not targets or any(t <= 0 for t in targets):
        raise UserError(f"--targets must be positive throughput multiples, got {targets}")
    targets = sorted(set(float(t) for t in targets))
    work = Path(work_dir) if work_dir else default_work_dir(run_dir)
    out = Path(out)
    steps = (cfg.get("gkd") or {}).get("steps", "default")
    command = command or (f"megapuzzle bench search-quality --config {config} --run-dir {run_dir} --targets "
                          + " ".join(f"{t:g}" for t in targets) + f" --out {out}")
    log(f"[bench] search-quality: {', '.join(methods)} at {', '.join(f'{t:g}x' for t in targets)} from {run_dir}; "
        f"GKD {steps} steps; children in {work}")
    sweep = _Sweep(config, run_dir, targets, out, work, methods, seed, steps, command)
    for t in targets:
        for m in methods:
            if m in sweep.stopped:
                continue
            sweep.k += 1
            sweep.child(cfg, m, t, uniform_steps)
            sweep.write()
    result = sweep.write(final=True)
    log((out / "table.md").read_text())
    log(f"[bench] wrote {out / 'table.md'}, {out / 'results.json'}" + (f", {result['plot']}" if result["plot"] else ""))
    return result


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("--config", required=True, help="the base run's config YAML")
    p.add_argument("--run-dir", required=True, help="base run after `megapuzzle run CFG --until mip`")
    p.add_argument("--targets", type=float, nargs="+", default=list(DEFAULT_TARGETS),
                   help="throughput multiples of the parent, swept in increasing order; a method stops at the "
                        "first one it cannot meet")
    p.add_argument("--out", default="benchmarks/results/search_quality/stdlib",
                   help="where table.md, results.json, png go")
    p.add_argument("--work-dir", help="where the child run directories go (default RUN_sq_bench next to RUN)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="subset of the methods")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--gkd-steps", type=int, help="GKD steps for every child (default: the config's gkd.steps)")
    p.add_argument("--uniform-steps", type=int, default=16,
                   help="uniform: FFN widths k*I/N, k = 1..N (0: the search space's grid only)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the whole bench (1 on a shared box: GKD at 2 "
                                               "threads under other load ran 8x slower than at 1)")


def run_cli(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_search_quality(args.config, args.run_dir, args.targets, args.out, work_dir=args.work_dir,
                       methods=args.methods, seed=args.seed, gkd_steps=args.gkd_steps,
                       uniform_steps=args.uniform_steps or None, command=command_line(args))
    return 0
