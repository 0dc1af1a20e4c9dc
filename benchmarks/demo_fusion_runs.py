"""Fused-run blocks on a debug run: `stages.fusion_runs.run_bld` + `score_runs` (the pipeline's own calls)
on a copy of RUN (from `megapuzzle run examples/debug.yaml --run-dir RUN --until bld`), windows of up
to 3 layers, 40 BLD steps of 4 x 32 tokens at lr 2e-3, scored on 4 held-out batches of 4 x 32.
Prints held-out NMSE fold -> trained and replace-the-run KL / top-1 agreement per run block.

    python benchmarks/demo_fusion_runs.py RUN OUT
Results: benchmarks/results/fusion.md."""
import shutil
import sys
import time

import torch

from megapuzzle.stages.bld.bld import BLDConfig
from megapuzzle.config import section
from megapuzzle.stages.fusion_runs import run_bld, score_runs
from megapuzzle.stages.score.score import ScoreConfig

torch.set_num_threads(1)
src, out = sys.argv[1], sys.argv[2]
shutil.rmtree(out, ignore_errors=True)
shutil.copytree(src, out, ignore=shutil.ignore_patterns("library_runs", "state"))
cfg = {"bld": {"tokens_per_block": 40 * 4 * 32, "batch_size": 4, "seq_len": 32, "lr": 2e-3, "eval_batches": 2,
               "checkpoint_every": 100, "log_every": 100},
       "score": {"batch_size": 4, "seq_len": 32, "num_batches": 4}}
t0 = time.perf_counter()
run_bld(out, section(cfg, "bld", BLDConfig), 3)
t1 = time.perf_counter()
idx = score_runs(out, section(cfg, "score", ScoreConfig))
t2 = time.perf_counter()
print(f"bld {t1 - t0:.1f}s, score {t2 - t1:.1f}s")
print("| block | start | NMSE fold -> trained | KL | LM loss delta | top-1 agree |")
print("|---|---|---|---:|---:|---:|")
for k, e in sorted(idx["blocks"].items()):
    print(f"| {k} | {e['start']} | {e['nmse_init']:.4f} -> {e['nmse_final']:.4f} | {e['kl']:.4f} | "
          f"{e['lm_loss_delta']:+.4f} | {e['top1']:.3f} |")
