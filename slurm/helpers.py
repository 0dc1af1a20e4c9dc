"""Small helpers the sbatch scripts call (plain python3 + PyYAML; no torch import: fast).

    python3 slurm/helpers.py get CONFIG gkd.tensor_parallel 1
        print a config value (dotted path), or the default when absent
    python3 slurm/helpers.py bld-shard CONFIG RUN I N
        write RUN/state/slurm/bld_shard{I}of{N}.yaml: CONFIG with bld.layers = shard I of N of
        the layers (bld.layers if the config restricts them, else all layers of RUN/parent),
        contiguous and balanced; print its path, or nothing when the shard has no layers.

Why a per-shard config file rather than a flag: `megapuzzle bld` already takes bld.layers
from the config, and BLD keys its resumable state by block set (RUN/state/bld/<hash>/), so
shard I always maps to the same state as long as N and the config stay the same.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml


def get(config: str, dotted: str, default: str = "") -> str:
    v = yaml.safe_load(Path(config).read_text()) or {}
    for part in dotted.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return default if v is None else str(v)


def shard_layers(layers: list[int], i: int, n: int) -> list[int]:
    """Contiguous shard i of n (sizes differ by at most one)."""
    return layers[i * len(layers) // n:(i + 1) * len(layers) // n]


def bld_shard(config: str, run: str, i: int, n: int) -> str:
    if not 0 <= i < n:
        raise SystemExit(f"helpers.py bld-shard: shard {i} of {n} is out of range (0 <= I < N); when resubmitting "
                         f"some array tasks, pass the total shard count N as the third argument")
    cfg = yaml.safe_load(Path(config).read_text()) or {}
    bld = dict(cfg.get("bld") or {})
    if bld.get("layers") is not None:
        layers = [int(x) for x in bld["layers"]]
    else:
        arch = Path(run) / "parent" / "arch.json"
        if not arch.is_file():
            raise SystemExit(f"helpers.py bld-shard: {arch} missing; the parent job must run first")
        layers = list(range(len(json.loads(arch.read_text())["layers"])))
    mine = shard_layers(layers, i, n)
    if not mine:
        return ""
    out = Path(run) / "state" / "slurm" / f"bld_shard{i}of{n}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text("# written by slurm/helpers.py bld-shard from " + str(Path(config).resolve()) + "\n"
                   + yaml.safe_dump({**cfg, "bld": {**bld, "layers": mine}}, sort_keys=False))
    tmp.replace(out)  # atomic: a concurrent reader never sees half a file
    return str(out)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "get":
        print(get(*argv[1:4]))
    elif len(argv) == 5 and argv[0] == "bld-shard":
        print(bld_shard(argv[1], argv[2], int(argv[3]), int(argv[4])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
