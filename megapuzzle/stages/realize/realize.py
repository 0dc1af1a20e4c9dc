"""`megapuzzle realize`: stitch a MIP solution's library blocks into a child checkpoint.

    megapuzzle realize --run-dir runs/demo [--solution 0]        # -> runs/demo/child
    megapuzzle export-hf --checkpoint runs/demo/child --out runs/demo/export

The child is the parent's embeddings, final norm and head plus, per layer, the chosen
(attention, FFN) blocks from RUN/library (checksums verified). No training happens here. It
streams: a layer's blocks are loaded, written into the current shard, and dropped.
"""

from __future__ import annotations

import logging
import argparse
import json
from pathlib import Path

from megapuzzle.arch import AttentionVariant, FFNVariant, LayerArch
from megapuzzle.config import RunDir
from megapuzzle.errors import UserError

log = logging.getLogger(__name__).info


def solution_layers(run: RunDir, k: int) -> tuple[list[LayerArch], dict]:
    path = run.mip / "solutions.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `megapuzzle mip --run-dir {run.root}` first")
    sols = json.loads(path.read_text())["solutions"]
    if not 0 <= k < len(sols):
        raise UserError(f"--solution {k} out of range: {path} has {len(sols)} solution(s) (0..{len(sols) - 1})")
    s = sols[k]
    return [LayerArch(AttentionVariant.from_name(l["attention"]), FFNVariant.from_name(l["ffn"]))
            for l in s["layers"]], s


def realize(run_dir: str | Path, solution: int = 0, *, out: str | Path | None = None, force: bool = True,
            layers: list[LayerArch] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write the child checkpoint (RUN/child by default); `layers` overrides the MIP solution."""
    from megapuzzle.checkpoints.canonical import load_checkpoint, tokenizer_path, write_checkpoint, require_parent
    from megapuzzle.checkpoints.shards import DEFAULT_MAX_SHARD_BYTES
    from megapuzzle.library import BlockLibrary

    run = RunDir(run_dir)
    parent_arch, parent_tensors, _ = load_checkpoint(require_parent(run))
    meta: dict = {"source": "realize"}
    if layers is None:
        layers, sol = solution_layers(run, solution)
        meta.update(solution=solution, objective=sol["objective"], predicted_speedup=sol.get("predicted_speedup"))
        if sol.get("runs"):
            meta["runs"] = sol["runs"]
    lib = BlockLibrary(run.library)
    arch = lib.child_arch(parent_arch, layers)
    dest = Path(out) if out is not None else run.child
    runs = [tuple(r) for r in (meta.get("runs") or [])]
    if runs:  # fused-run blocks (FFN Fusion) come from RUN/library_runs
        from megapuzzle.stages.fusion_runs import iter_child_with_runs

        items = iter_child_with_runs(lib, run.root, parent_arch, parent_tensors, layers, runs)
    else:
        # streamed: one layer's blocks (and the parent's embedding / head, read lazily) at a time
        items = lib.iter_assembled(parent_arch, parent_tensors, layers)
    write_checkpoint(dest, arch, items, meta=meta,
                     tokenizer_dir=tokenizer_path(run.parent), force=force,
                     max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    log(f"[realize] child with {arch.num_params() / 1e6:.2f}M params ({arch.num_params() / parent_arch.num_params():.1%} "
        f"of the parent) -> {dest}")
    return dest


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="run directory (parent/, library/, mip/solutions.json)")
    p.add_argument("--solution", type=int, default=0, help="which MIP candidate (0 = best)")
    p.add_argument("--out", help="checkpoint dir to write (default RUN/child)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="start a new safetensors shard above this size (layer-aligned; index file written)")


def run_cli(args: argparse.Namespace) -> int:
    from megapuzzle.checkpoints.shards import parse_size

    realize(args.run_dir, args.solution, out=args.out, max_shard_bytes=parse_size(args.max_shard_size))
    from megapuzzle.arch_table import architecture_table
    from megapuzzle.checkpoints.canonical import load_arch

    print(architecture_table(load_arch(args.out or RunDir(args.run_dir).child)))
    return 0
