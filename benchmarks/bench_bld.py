"""BLD benchmark: one shared teacher forward vs the cost of the students (not a unit test).

    python benchmarks/bench_bld.py                                    # trains the debug parent first
    python benchmarks/bench_bld.py --parent RUN/parent --data RUN/data/train [--heldout RUN/data/heldout]

Builds (1) the whole decoupled library of the search space and (2) a library with a single
trained variant per layer (FFN at 50 %), for the same number of steps, and prints a markdown
table: wall time, time in the teacher forward vs the students (forward + backward + AdamW),
and the naive cost of running the teacher once per block instead of once per batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _link_run(run: Path, parent: Path, train: Path, heldout: Path) -> None:
    (run / "data").mkdir(parents=True)
    os.symlink(parent.resolve(), run / "parent")
    for prefix, name in ((train, "train"), (heldout, "heldout")):
        for ext in (".bin", ".idx"):
            os.symlink(Path(str(prefix) + ext).resolve(), run / "data" / (name + ext))


def _one(work: Path, name: str, parent: Path, train: Path, heldout: Path, cfg: dict) -> dict:
    from megapuzzle.stages.bld.bld import run_bld
    from megapuzzle.library import BlockLibrary

    run = work / name
    _link_run(run, parent, train, heldout)
    t = time.perf_counter()
    res = run_bld(run, cfg, progress=False)
    res["wall_s"] = time.perf_counter() - t
    res["library"] = BlockLibrary(run / "library").entries()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", help="canonical parent checkpoint dir (default: train the debug parent)")
    ap.add_argument("--data", help="train indexed-dataset prefix (with --parent)")
    ap.add_argument("--heldout", help="held-out prefix (default: 'heldout' beside --data)")
    ap.add_argument("--steps", type=int, default=20, help="BLD steps per block")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--ffn-granularity", type=int, default=None, help="default: 256, or 64 for tiny FFNs")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="only these layers")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared 2-core box)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args()

    import torch

    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.runtime import init_distributed

    torch.set_num_threads(args.threads)
    init_distributed()  # import + set up Megatron outside the timed region
    work = Path(tempfile.mkdtemp(prefix="bench_bld_"))
    try:
        if args.parent:
            if not args.data:
                ap.error("--parent needs --data PREFIX")
            parent, train = Path(args.parent), Path(args.data)
            heldout = Path(args.heldout) if args.heldout else train.with_name("heldout")
        else:
            from megapuzzle.stages.parent.train_parent import FLAVOURS, train_parent

            out = work / "debug_parent"
            train_parent(out, dataclasses.replace(FLAVOURS["debug"], steps=30))
            parent, train, heldout = out / "checkpoint", out / "data" / "train", out / "data" / "heldout"
        arch = load_arch(parent)
        inter = next((l.ffn.intermediate_size for l in arch.layers if l.ffn.kind == "mlp"), 1024)
        gran = args.ffn_granularity or (256 if inter >= 1024 else 64)
        bld = {"tokens_per_block": args.steps * args.batch_size * args.seq_len, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "lr": 3e-4, "min_lr": 3e-5, "checkpoint_every": 10 ** 9,
               "log_every": 10 ** 9, "eval_batches": 2, "calibration_batches": 2}
        if args.layers is not None:
            bld["layers"] = args.layers
        full_space = {"ffn_granularity": gran}
        single_space = {"kv_heads": [], "ffn_fractions": [0.5], "ffn_granularity": gran, "attention_linear": False,
                        "attention_no_op": False, "ffn_linear": False, "ffn_no_op": False}
        runs = [("full decoupled library", _one(work, "full", parent, train, heldout,
                                                {"search_space": full_space, "bld": bld})),
                ("one variant per layer", _one(work, "single", parent, train, heldout,
                                               {"search_space": single_space, "bld": bld}))]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n_layers = len(args.layers) if args.layers is not None else arch.num_layers
    lines = [f"BLD on {'debug parent' if not args.parent else args.parent} ({arch.num_params() / 1e6:.2f}M params, "
             f"{n_layers} layers), {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
             f"torch threads {args.threads}", "",
             "| run | blocks trained (+ no-op evaluated) | wall s | teacher fwd s | students s | eval+calib s "
             "| teacher share of train loop | s per trained block | naive (teacher per block) s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs:
        t = r["timings"]
        trained = [k for k in r["trained"] if r["library"][k]["tokens"] > 0]
        noop = len(r["trained"]) - len(trained)
        loop = t["teacher_s"] + t["students_s"]
        naive = len(trained) * t["teacher_s"] + t["students_s"]
        lines.append(f"| {name} | {len(trained)} (+{noop}) | {r['wall_s']:.1f} | {t['teacher_s']:.2f} | "
                     f"{t['students_s']:.2f} | {t['eval_s'] + t['calibration_s']:.2f} | "
                     f"{100 * t['teacher_s'] / max(loop, 1e-9):.1f} % | {r['wall_s'] / max(len(trained), 1):.2f} | "
                     f"{naive:.1f} |")
    full, single = runs[0][1], runs[1][1]
    nf = len([k for k in full["trained"] if full["library"][k]["tokens"] > 0])
    ns = len([k for k in single["trained"] if single["library"][k]["tokens"] > 0])
    lines += ["", f"full library: {nf / max(ns, 1):.1f}x the blocks of the single-variant run for "
                  f"{full['wall_s'] / single['wall_s']:.2f}x its wall time"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        from megapuzzle.fileio import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
