"""`megapuzzle info PATH`: an architecture, layer by layer, with exact sizes.

    megapuzzle info runs/demo/child          # checkpoint dir, arch.json, or HF config.json / dir
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megapuzzle.arch import Architecture, load_architecture
from megapuzzle.arch_table import architecture_table
from megapuzzle.errors import UserError


def resolve_architecture(path: str | Path) -> Architecture:
    p = Path(path)
    for cand in (p / "arch.json", p / "config.json", p):
        if cand.is_file():
            return load_architecture(str(cand))
    raise UserError(f"{p}: no arch.json or config.json there; give a checkpoint, HF dir or json file")


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint dir, arch.json, or HF config.json / dir")


def run_cli(args: argparse.Namespace) -> int:
    arch = resolve_architecture(args.path)
    print(f"vocab {arch.vocab_size}, hidden {arch.hidden_size}, heads {arch.num_attention_heads} x {arch.kv_channels}, "
          f"{arch.num_layers} layers, {arch.num_params():,} params, KV cache {arch.kv_cache_bytes_per_token(2):,} B/token (bf16)")
    print(architecture_table(arch))
    problems = arch.engine_compatible()
    print("TensorRT-LLM/vLLM loadable: " + ("yes" if not problems else "no (" + "; ".join(problems) + ")"))
    return 0
