"""`megapuzzle bench search-quality`: does Puzzle beat homogeneous compression at equal speed?

    megapuzzle run examples/cpu_demo.yaml --run-dir runs/cpu_demo --until mip
    megapuzzle bench search-quality --config examples/cpu_demo.yaml --run-dir runs/cpu_demo --targets 1.5 2.0 \\
        --out benchmarks/results/search_quality [--work-dir runs/cpu_demo_sq_bench] [--methods puzzle uniform ...] \\
        [--threads 1]

For every target and method (puzzle = the MIP through mip_stage.run_mip; uniform, depth, random,
greedy = megapuzzle.baselines) one child run directory WORK/<method>_x<target> is built from the
same parent, library, scores and costs, under the same budget, then gets the same GKD (the
config's gkd: section) and the same evaluate (evaluate: section). WORK defaults to
RUN_sq_bench next to RUN (RUN itself is never written).

Resumable: each child is a run directory with its own manifest.json; a killed bench re-run skips
every finished stage of every child (GKD itself resumes from its checkpoints). Progress goes to
stdout. Writes to --out:

    table.md                     the exact command, then one row per (method, target)
    results.json                 the rows + the parent's metrics + each child's directory
    quality_vs_throughput.png    accuracy retention against MEASURED throughput ratio, all methods
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

from megapuzzle.config import load_config
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json, atomic_write_text, save_figure_atomic

BENCHMARKS = ("search-quality",)
STYLE = {"puzzle": ("tab:red", "*"), "uniform": ("tab:blue", "s"), "depth": ("tab:green", "^"),
         "random": ("tab:grey", "o"), "greedy": ("tab:purple", "D")}


def default_work_dir(run_dir: str | Path) -> Path:
    root = Path(run_dir).resolve()
    return root.with_name(f"{root.name}_sq_bench")


def row_from(res: dict[str, Any]) -> dict[str, Any]:
    """One table row from run_child's result (eval.json numbers, the selection's prediction)."""
    ev, rec = res["eval"], res["record"]
    row = {"method": res["method"], "target": res["throughput_x"], "dir": res["dir"],
           "predicted_x": rec.get("predicted_speedup"), "objective": rec.get("objective"),
           "layers": [f"{l['attention']}+{l['ffn']}" for l in rec["layers"]], "stage_wall_s": res["stages"]}
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
    lines = ["# Search quality: Puzzle vs homogeneous compression at equal throughput", "", "```bash", command, "```",
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
        lines.append(
            f"| {r['method']} | {r['target']:g} | {_f(r.get('predicted_x'), '.2f')} | {_f(r.get('measured_x'), '.2f')} | "
            f"{_f(r.get('params'), ',')} | {_f(r.get('params_frac') and 100 * r['params_frac'], '.1f')} | {_f(r.get('objective'), '.4f')} | "
            f"{_f(r.get('lm_loss'), '.4f')} | {_f(r.get('accuracy'), '.4f')} | {_f(r.get('kl'), '.4f')} | "
            f"{_f(r.get('retention_pct'), '.1f')} | {_f(r.get('retention_before_gkd_pct'), '.1f')} |")
    lines.append("")
    for t in sorted({r["target"] for r in rows}):
        done = [r for r in rows if r["target"] == t and r.get("retention_pct") is not None]
        if done:
            best = max(done, key=lambda r: r["retention_pct"])
            lines.append(f"- target {t:g}x: best retention {best['method']} ({best['retention_pct']:.1f}%); "
                         + ", ".join(f"{r['method']} {r['retention_pct']:.1f}%" for r in
                                     sorted(done, key=lambda r: -r["retention_pct"])))
    arch = [r for r in rows if r.get("layers")]
    if arch:
        lines += ["", "Architectures (layer 0 first, attention+FFN):", ""]
        lines += [f"- {r['method']} {r['target']:g}x: " + ", ".join(f"`{la}`" for la in r["layers"]) for r in arch]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    done = [r for r in rows if r.get("measured_x") is not None and r.get("retention_pct") is not None]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    ax.scatter([1.0], [100.0], marker="s", s=70, color="black", label="parent", zorder=5)
    for m in dict.fromkeys(r["method"] for r in done):
        pts = [(r["measured_x"], r["retention_pct"], r["target"])  # joined in target order
               for r in sorted(done, key=lambda r: r["target"]) if r["method"] == m]
        color, marker = STYLE.get(m, ("tab:orange", "x"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=m,
                markersize=11 if marker == "*" else 7, linestyle="-", alpha=0.9)
        for x, y, t in pts:
            ax.annotate(f"{t:g}x", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
    failed: dict[str, list[str]] = {}
    for r in rows:
        if r.get("error"):
            failed.setdefault(r["method"], []).append(f"{r['target']:g}x")
    if failed:
        ax.text(0.01, 0.01, "no feasible child: " + "; ".join(f"{m} at {', '.join(t)}" for m, t in failed.items()),
                transform=ax.transAxes, fontsize=8, color="dimgray", va="bottom")
    ax.set_xlabel("measured generation throughput / parent's")
    ax.set_ylabel("next-token accuracy retention after GKD (% of parent)")
    ax.set_title("Search quality at equal throughput targets (labels: target)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return True


def command_line(args: argparse.Namespace) -> str:
    parts = ["megapuzzle", "bench", "search-quality", "--config", args.config, "--run-dir", args.run_dir,
             "--targets", *[str(t) for t in args.targets], "--out", args.out]
    if args.work_dir:
        parts += ["--work-dir", args.work_dir]
    if list(args.methods) != list(DEFAULT_METHODS):
        parts += ["--methods", *args.methods]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return " ".join(shlex.quote(p) for p in parts)


DEFAULT_METHODS = ("puzzle", "uniform", "depth", "random", "greedy")


def run_search_quality(config: str | Path, run_dir: str | Path, targets: list[float], out: str | Path, *,
                       work_dir: str | Path | None = None, methods=DEFAULT_METHODS, seed: int = 0,
                       command: str | None = None, log=print) -> dict:
    from megapuzzle.baselines import ALL_METHODS, run_child

    cfg = load_config(config)
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise UserError(f"unknown method(s) {bad}; use some of {', '.join(ALL_METHODS)}")
    if not targets or any(t <= 0 for t in targets):
        raise UserError(f"--targets must be positive throughput multiples, got {targets}")
    work = Path(work_dir) if work_dir else default_work_dir(run_dir)
    out = Path(out)
    jobs = [(t, m) for t in targets for m in methods]
    rows, parent, t_all = [], None, time.perf_counter()
    log(f"[bench] search-quality: {len(jobs)} children ({', '.join(methods)} at {', '.join(f'{t:g}x' for t in targets)})"
        f" from {run_dir}; children in {work}")
    for k, (t, m) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        log(f"[bench] ({k}/{len(jobs)}) {m} @ {t:g}x ...")
        try:
            res = run_child(run_dir, cfg, m, t, work / f"{m}_x{t:g}", seed=seed,
                            log=lambda s, m=m, t=t: log(f"  [{m} {t:g}x] {s}"))
        except UserError as e:
            rows.append({"method": m, "target": t, "error": str(e)})
            log(f"[bench] ({k}/{len(jobs)}) {m} @ {t:g}x FAILED: {e}")
            continue
        row = row_from(res)
        rows.append(row)
        if res["eval"]:
            p = res["eval"]["parent"]
            parent = {k2: p[k2] for k2 in ("params", "lm_loss", "accuracy", "tokens_per_s", "predicted_tokens_per_s")
                      if k2 in p}
        log(f"[bench] ({k}/{len(jobs)}) {m} @ {t:g}x: predicted {_f(row.get('predicted_x'), '.2f')}x, measured "
            f"{_f(row.get('measured_x'), '.2f')}x, retention {_f(row.get('retention_pct'), '.1f')}%, KL "
            f"{_f(row.get('kl'), '.4f')} ({time.perf_counter() - t0:.0f}s; {time.perf_counter() - t_all:.0f}s total)")
    command = command or (f"megapuzzle bench search-quality --config {config} --run-dir {run_dir} --targets "
                          + " ".join(f"{t:g}" for t in targets) + f" --out {out}")
    header = (f"Base run `{Path(run_dir).resolve()}`, children in `{work.resolve()}`; config `{config}`: the "
              f"same GKD ({(cfg.get('gkd') or {}).get('steps', 'default')} steps) and evaluate for every child. "
              f"`predicted x` is the selection's own prediction from costs.json (each method must meet the "
              f"target under the MIP's scenario and budgets); `measured x` is evaluate's CPU-clock timing "
              f"against the parent in the same process. Summed block score: the MIP's objective (sum of the chosen blocks' "
              f"replace-1-block scores, mip.metric) for the same architecture; for uniform it scores the library's "
              f"BLD blocks of those variants, while the uniform child carries the untrained init. Retention = child / parent next-token accuracy on "
              f"data/heldout. Random: rejection sampling (seed {seed}), the first draw within 5% above the target.")
    md = table_markdown(rows, parent, command, header)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", md)
    png = plot(rows, out / "quality_vs_throughput.png")
    result = {"command": command, "config": str(config), "run_dir": str(Path(run_dir).resolve()),
              "work_dir": str(work.resolve()), "targets": list(targets), "methods": list(methods), "seed": seed,
              "parent": parent, "rows": rows, "plot": str(out / "quality_vs_throughput.png") if png else None,
              "wall_s": time.perf_counter() - t_all}
    atomic_write_json(out / "results.json", result)
    log(md)
    log(f"[bench] wrote {out / 'table.md'}, {out / 'results.json'}" + (f", {result['plot']}" if png else ""))
    return result


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("--config", required=True, help="the base run's config YAML")
    p.add_argument("--run-dir", required=True, help="base run after `megapuzzle run CFG --until mip`")
    p.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0], help="throughput multiples of the parent")
    p.add_argument("--out", default="benchmarks/results/search_quality", help="where table.md, results.json, png go")
    p.add_argument("--work-dir", help="where the child run directories go (default RUN_sq_bench next to RUN)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="subset of the methods")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--threads", type=int, help="torch CPU threads for the whole bench (1 on a shared box: GKD at 2 "
                                               "threads under other load ran 8x slower than at 1)")


def run_cli(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_search_quality(args.config, args.run_dir, args.targets, args.out, work_dir=args.work_dir,
                       methods=args.methods, seed=args.seed, command=command_line(args))
    return 0
