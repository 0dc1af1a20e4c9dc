"""Slow tier: the weights path scales. On a random Llama (hidden 1024, 8 layers, vocab 32k,
~190M parameters, bf16; built with transformers, nothing downloaded):

* `import-hf --max-shard-size 64MB` and `export-hf --max-shard-size 64MB` peak at about one
  shard + the largest tensor above the interpreter's own footprint, not at a multiple of the model;
* loading the parent as the stages do (load_checkpoint in fp32 as score / evaluate ask,
  build_gpt_model, load_canonical_into_model) costs each TP=2 rank about half of what TP=1
  costs: every rank reads only its own slices.

Peaks are ru_maxrss inside the process that does the work, minus its ru_maxrss just before
(imports, Megatron, the process group), so the numbers are what the weights path itself adds.

Measured here (2-core CI machine, MB added over each process's baseline; model 365 MB bf16):

    path                        import-hf   export-hf   load TP=1     load TP=2, per rank
    40b40ab (whole-file loads)    1,089        484      1,482-1,522   1,125-1,181   -> fails
    sharded + lazy reads            211-232    210-223    919-935       478-510     (owned 730 / 365)

The old numbers come from running this file at commit 40b40ab (a second worktree; import-hf
without --max-shard-size, which it did not have then): each rank read the whole file and cast
all of it to fp32 before taking its slice, import-hf held the model three times, and export-hf
loaded the whole checkpoint before writing its shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist import run_distributed

pytestmark = pytest.mark.slow

MB = 1 << 20
SHARD = 64 * MB
ALLOWANCE = 150 * MB  # allocator slack, one tensor in flight, safetensors' per-file handles
REPO = Path(__file__).resolve().parents[1]


def make_hf_llama(out: Path) -> None:
    """A random Llama-shaped HF directory (bf16, HF's own shards), in a child process so this
    process's memory stays small."""
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained({str(out)!r}, max_shard_size="100MB")
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def peak_of_cli(args: list[str]) -> dict:
    """Run `megapuzzle ARGS` in a fresh interpreter; its ru_maxrss before and after, in bytes."""
    code = f"""
import json, resource, sys
import torch, megapuzzle.cli
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc = megapuzzle.cli.main({args!r})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"rc": rc, "before": before * 1024, "after": after * 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_parent_like_a_stage(info, ckpt: str) -> dict:
    """One rank: what score / evaluate do with the parent; ru_maxrss before and after (bytes)."""
    import resource

    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.model import ModelOptions, build_gpt_model, load_canonical_into_model

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arch, tensors, _ = load_checkpoint(ckpt, dtype=torch.float32)
    model = build_gpt_model(arch, options=ModelOptions(perform_initialization=False))
    load_canonical_into_model(model, tensors, arch)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    owned = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"rank": info.rank, "before": before, "after": after, "owned": owned}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mem")
    make_hf_llama(tmp / "hf")
    imp = peak_of_cli(["import-hf", "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "parent"),
                       "--max-shard-size", "64MB", "--tp", "2"])
    assert imp["rc"] == 0
    return tmp / "parent", imp


def test_import_hf_peak_is_one_shard_not_the_model(parent):
    ckpt, imp = parent
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    model_bytes = index["metadata"]["total_size"]
    largest = 32000 * 1024 * 2  # the embedding / head, bf16
    added = imp["after"] - imp["before"]
    print(f"import-hf: model {model_bytes / MB:.0f} MB, peak added {added / MB:.0f} MB")
    assert len(set(index["weight_map"].values())) >= 5
    assert added <= SHARD + largest + ALLOWANCE, f"import-hf added {added / MB:.0f} MB"


def test_export_hf_streams_shards(parent, tmp_path):
    ckpt, _ = parent
    exp = peak_of_cli(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--dtype", "bf16",
                       "--max-shard-size", "64MB"])
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    added = exp["after"] - exp["before"]
    print(f"export-hf: model {index['metadata']['total_size'] / MB:.0f} MB, peak added {added / MB:.0f} MB")
    assert exp["rc"] == 0 and len(set(index["weight_map"].values())) >= 5
    assert added <= SHARD + 32000 * 1024 * 2 + ALLOWANCE, f"export-hf added {added / MB:.0f} MB"


def test_tp2_rank_loads_about_half_of_tp1(parent):
    ckpt, _ = parent
    (one,) = run_distributed(load_parent_like_a_stage, world=1, args=(str(ckpt),), timeout=600)
    two = run_distributed(load_parent_like_a_stage, world=2, tp=2, args=(str(ckpt),), timeout=600)
    d1 = one["after"] - one["before"]
    print(f"TP=1: owned {one['owned'] / MB:.0f} MB, added {d1 / MB:.0f} MB")
    for r in two:
        d2 = r["after"] - r["before"]
        print(f"TP=2 rank {r['rank']}: owned {r['owned'] / MB:.0f} MB, added {d2 / MB:.0f} MB")
        assert d2 <= 0.5 * d1 + ALLOWANCE, f"rank {r['rank']} added {d2 / MB:.0f} MB vs TP=1's {d1 / MB:.0f} MB"
        assert d2 <= 1.25 * r["owned"] + ALLOWANCE
    assert d1 <= 1.25 * one["owned"] + ALLOWANCE
