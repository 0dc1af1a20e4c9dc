"""INTERIM: scoring as a SLURM job array until `megapuzzle score --shard I/N` exists.

    python3 slurm/score_shard.py --run-dir RUN [--config CFG] --shard I/N   # one array task
    python3 slurm/score_shard.py --run-dir RUN [--config CFG] --merge       # before `run --only score`

megapuzzle.score splits the library over data-parallel ranks (`info.dp_rank / dp_size`) and
keeps each rank's finished blocks in RUN/state/score/rank###.json; rank 0 merges them. An
array task is an independent job, so here task I poses as DP ranks I*dp .. I*dp+dp-1 of a
virtual N*dp-rank job (dp = its own torchrun ranks, usually 1), with global rank >= 1 so it
writes its own state file and never merges. `--merge` then unions every state file that has
the same settings into rank000.json, so the plain `megapuzzle run --only score` finds every
block done and only merges into scores.json (and records the stage in the manifest).

Delete this file once score.py takes `--shard` (slurm/score.sbatch then uses it directly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def _settings(run_dir: str, cfg) -> dict:
    # must equal what megapuzzle.score.run_score computes (else the merge job re-scores everything)
    from megapuzzle.config import RunDir, section_dict

    return {"config": section_dict(cfg), "data": str(RunDir(run_dir).heldout_data), "naive": False}


def merge(run_dir: str, cfg) -> None:
    from megapuzzle.fileio import atomic_write_json

    settings, blocks, files = _settings(run_dir, cfg), {}, 0
    for f in sorted((Path(run_dir) / "state" / "score").glob("rank*.json")):
        saved = json.loads(f.read_text())
        if saved.get("settings") == settings:
            blocks.update(saved["blocks"])
            files += 1
    atomic_write_json(Path(run_dir) / "state" / "score" / "rank000.json", {"settings": settings, "blocks": blocks})
    print(f"[score-shard] merged {len(blocks)} scored block(s) from {files} state file(s)")


def score_shard(run_dir: str, cfg, i: int, n: int) -> None:
    import megapuzzle.runtime.distributed as dist_mod
    from megapuzzle.score import run_score

    real = dist_mod.init_distributed

    def as_shard(*args, **kwargs):
        info = real(*args, **kwargs)
        return dataclasses.replace(info, dp_rank=i * info.dp_size + info.dp_rank, dp_size=n * info.dp_size,
                                   rank=1 + i * info.world_size + info.rank)

    dist_mod.init_distributed = as_shard  # run_score imports it at call time
    run_score(run_dir, cfg, progress=False)
    print(f"[score-shard] shard {i}/{n} done")


def main() -> int:
    from megapuzzle.config import load_config, section
    from megapuzzle.score import ScoreConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--config")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--shard", metavar="I/N")
    g.add_argument("--merge", action="store_true")
    a = p.parse_args()
    cfg = section(load_config(a.config) if a.config else {}, "score", ScoreConfig)
    if a.merge:
        merge(a.run_dir, cfg)
        return 0
    i, n = (int(x) for x in a.shard.split("/"))
    if not 0 <= i < n:
        p.error(f"--shard {a.shard}: need 0 <= I < N")
    score_shard(a.run_dir, cfg, i, n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
