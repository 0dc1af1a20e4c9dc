"""Memory benchmark: per-rank peak RSS of the stages that touch the whole parent (not a unit test).

    python benchmarks/bench_memory.py                       # Llama-3.2-1B shape, -> benchmarks/results/memory.md
    python benchmarks/bench_memory.py --shape small --out /tmp/memory.md   # hidden 1024, 8 layers, vocab 32k
    python benchmarks/bench_memory.py --shape mid --gkd-only --out benchmarks/results/memory_mid.md  # gkd, 0.62B
    python benchmarks/bench_memory.py --shape small --gkd-only --layouts 1x1,1x2 --gkd-seq-len 2048 \
        --gkd-recompute none,selective,full --out benchmarks/results/gkd_recompute.md   # gkd.recompute
    python benchmarks/bench_memory.py --stages score,evaluate --merge   # re-measure two stages in memory.md

`--stages` runs only the named stages (and, unrecorded, what they need: the parent, its blocks, the
child); `--merge` keeps OUT's rows of every (stage, layout) not re-run and replaces the others, and
the md lists at its top each command that produced a part of the table.

Builds a random Llama with transformers in a temp dir (bf16; nothing downloaded), then runs the
real commands, each in fresh processes, and records every rank's peak RSS (ru_maxrss inside the
rank, at exit) and the bytes of model weights that rank owns:

* `import-hf` and `export-hf` (one process; `--max-shard-size`), target: one shard + the largest
  tensor + 1.5 GB;
* `bld` with a search space holding only the parent's own variants (it writes the parent's
  blocks into the library layer by layer; no student trains, so this is the read path only);
* `score` (bf16 weights, KL in fp32) under torchrun at TP x PP = 1x1, 2x1 and 1x2 (`score --tp --pp`;
  each pipeline stage builds and reads only its own layers);
* `evaluate` (bf16 quality and timing) at every layout (`evaluate --tp --pp`: parent and child on
  one TP x PP layout);
* `bld` with trained students: two per layer (GQA with half the parent's KV heads, and a SwiGLU at
  25 % of the parent's width), 2 steps, bf16 params under Megatron's mixed-precision optimizer
  (fp32 master weights, main grads and AdamW moments: the recipes' 20 B per trainable parameter),
  at every layout (TP and PP are BLD's own).

Besides the markdown table, the run writes the same rows machine-readably next to it
(`--out` with `.json`): `megapuzzle.memory_model` fits its per-stage coefficients (bytes added per
owned byte, the interpreter's baseline) to those files and scales them to the H100 recipes
(tests/test_examples.py).

Target for a stage: peak RSS <= 1.25 x owned + 1.5 GB, owned = this rank's share of each
model's weights in their dtype (for training stages: plus the optimizer's state for the rank's
trainable parameters). The table marks each miss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1 << 30
MB = 1 << 20
ALLOW = 1.5 * GB
BLD_STATE_BYTES = 20  # per trained parameter: bf16 param + grad, fp32 master + main grad + 2 AdamW moments
SHAPES = {  # Llama-3.2-1B: 1.24B params, tied embeddings, llama3 RoPE
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # between the two: for gkd, whose fp32 state at the 1b shape does not fit this machine
    "mid": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False),
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def worker(out: str, args: list[str]) -> None:
    """One rank (or the only process): run `megapuzzle ARGS`, then record this rank's RSS."""
    import resource

    import megapuzzle.cli

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    rc = megapuzzle.cli.main(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"rank": rank, "rc": rc, "baseline": before, "peak": peak,
                                                          "wall_s": time.perf_counter() - t0}))


def run_ranks(work: Path, tag: str, nproc: int, args: list[str]) -> list[dict]:
    out = work / "rss" / tag
    out.parent.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--"]
    if nproc > 1:
        from megapuzzle.runtime import free_port

        me = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
              str(free_port()), *me[1:]]
    print(f"[bench-memory] {tag}: megapuzzle {' '.join(args)}", flush=True)
    subprocess.run([*me, *args], check=True, env=_env(), cwd=REPO)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


def make_parent(work: Path, shape: str) -> None:
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(max_position_embeddings=2048, **{SHAPES[shape]!r})
LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16).save_pretrained({str(work / "hf")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())


def make_data(work: Path, vocab: int, doc_len: int = 600) -> None:
    import numpy as np

    from megapuzzle.data.datasets import write_indexed_dataset

    rng = np.random.default_rng(0)
    for split, docs in (("train", 8), ("heldout", 4)):
        write_indexed_dataset(work / "run" / "data" / split, [rng.integers(0, vocab, doc_len) for _ in range(docs)],
                              vocab)


def owned_bytes(arch, tp: int, bytes_per: int, replicas: int = 1, pp: int = 1, stage: int = 0) -> int:
    """This rank's weights: its PP stage's layers (+ the embedding on the first stage, the final
    norm and the head on the last; a tied head is a copy there), TP-split matrices / tp, norms whole."""
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes
    from megapuzzle.model.config import stage_layer_ranges

    mine = stage_layer_ranges(arch.num_layers, pp)[stage]
    n = 0
    for name, shape in expected_canonical_shapes(arch).items():
        numel = 1
        for s in shape:
            numel *= s
        if name.startswith("model.layers."):
            held = int(name.split(".")[2]) in mine
        elif name == "model.embed_tokens.weight":
            held = stage == 0
            n += (numel // tp) if (arch.tie_word_embeddings and pp > 1 and stage == pp - 1) else 0
        else:
            held = stage == pp - 1
        if held:
            n += numel if len(shape) == 1 else numel // tp
    return n * bytes_per * replicas


STAGES = ("import-hf", "bld-read", "score", "realize", "gkd", "evaluate", "export-hf", "bld-train")
NEEDS = {"score": {"bld-read"}, "realize": {"bld-read"}, "gkd": {"bld-read", "realize"}}  # import-hf: always


def parse_stages(text: str) -> set[str]:
    got = {s.strip() for s in text.split(",") if s.strip()}
    bad = got - set(STAGES)
    if bad or not got:
        raise SystemExit(f"--stages: unknown {sorted(bad)}; choose from {','.join(STAGES)}")
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--max-shard-size", default="1GB", help="import-hf / export-hf shard size")
    ap.add_argument("--layouts", default="1x1,2x1,1x2", help="TPxPP layouts for score and gkd")
    ap.add_argument("--gkd", choices=("auto", "yes", "no"), default="auto",
                    help="run gkd (2 steps, fp32 AdamW) at each layout; auto: only for the small shape (a 1.24B "
                         "child's fp32 Adam state next to its parent does not fit a shared 24 GB machine)")
    ap.add_argument("--gkd-only", action="store_true",
                    help="only what gkd needs (import-hf, bld of the parent's blocks, realize) and gkd itself")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma-separated stages to measure (what they need runs too, unrecorded)")
    ap.add_argument("--merge", action="store_true",
                    help="merge the new rows into OUT's existing json / md (rows of (stage, layout) not re-run stay)")
    ap.add_argument("--gkd-seq-len", type=int, default=32,
                    help="gkd's seq_len (long ones make the activations, not the weights, dominate)")
    ap.add_argument("--gkd-recompute", default="none", help="comma-separated gkd.recompute values, each run")
    ap.add_argument("--bld-train", action=argparse.BooleanOptionalAction, default=True,
                    help="run bld with two trained students per layer at each layout")
    ap.add_argument("--work", default=None, help="work dir (default: a temp dir, removed afterwards)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory.md"))
    ap.add_argument("--render", action="store_true", help="only re-write OUT (markdown) from OUT's json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.rest)
        return 0
    if a.render:
        from megapuzzle.fileio import atomic_write_text

        atomic_write_text(Path(a.out), render(json.loads(Path(a.out).with_suffix(".json").read_text())))
        return 0
    import shutil

    from megapuzzle.arch import AttentionVariant, FFNVariant, round_up
    from megapuzzle.checkpoints.canonical import load_arch
    from megapuzzle.checkpoints.shards import parse_size
    from megapuzzle.model.config import stage_layer_ranges

    stages = {"import-hf", "bld-read", "realize", "gkd"} if a.gkd_only else parse_stages(a.stages)
    if a.gkd_only:
        a.stages = ",".join(s for s in STAGES if s in stages)
    runs = set(stages).union(*(NEEDS.get(s, set()) for s in stages))
    previous = load_previous(Path(a.out), a.shape) if a.merge else None
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_memory_"))
    run = work / "run"
    shard = parse_size(a.max_shard_size)
    rows: list[tuple] = []
    t0 = time.perf_counter()
    try:
        make_parent(work, a.shape)
        (r,) = run_ranks(work, "import", 1, ["import-hf", "--hf-dir", str(work / "hf"), "--out", str(run / "parent"),
                                              "--max-shard-size", a.max_shard_size])
        arch = load_arch(run / "parent")
        from megapuzzle.checkpoints.shards import SafetensorsReader

        reader = SafetensorsReader(run / "parent")
        model_bytes = sum(reader.nbytes(n) for n in reader)
        largest = max(reader.nbytes(n) for n in reader)
        io_target = shard + largest + ALLOW
        if "import-hf" in stages:
            rows.append(("import-hf", "1 process", 0, r, None, io_target, "", "import-hf"))
        make_data(work, arch.vocab_size, max(600, a.gkd_seq_len + 1))
        cfg = work / "bench.yaml"
        kv = arch.layers[0].attention.num_kv_heads
        cfg.write_text(json.dumps({  # YAML is a superset of json
            "search_space": {"kv_heads": [kv], "ffn_fractions": [1.0], "attention_linear": False,
                             "attention_no_op": False, "ffn_linear": False, "ffn_no_op": False},
            "bld": {"tokens_per_block": 64, "batch_size": 1, "seq_len": 32, "eval_batches": 1,
                    "calibration_batches": 1},
            "score": {"batch_size": 1, "seq_len": 32, "num_batches": 1, "dtype": "bfloat16"},
            "gkd": {"steps": 2, "batch_size": 1, "seq_len": 32, "eval_batches": 1, "checkpoint_every": 2,
                    "log_every": 1, "dtype": "float32", "optimizer": "local"},
            "evaluate": {"quality_dtype": "bfloat16", "dtype": "bfloat16", "batch_size": 1, "prefill_len": 8,
                         "gen_len": 2, "rounds": 1, "repeats": 1, "warmup": 0, "quality_batch_size": 1,
                         "seq_len": 32, "eval_batches": 1}}))
        if "bld-read" in runs:
            (r,) = run_ranks(work, "bld", 1, ["bld", "--config", str(cfg), "--run-dir", str(run), "--no-progress"])
            if "bld-read" in stages:
                rows.append(("bld (parent blocks only)", "1x1", 0, r, None, None, "", "bld-read"))
        for lay in (a.layouts.split(",") if "score" in stages else []):
            tp, pp = (int(x) for x in lay.split("x"))
            world = tp * pp
            (run / "scores.json").unlink(missing_ok=True)
            shutil.rmtree(run / "state" / "score", ignore_errors=True)
            res = run_ranks(work, f"score_{lay}", world, ["score", "--run-dir", str(run), "--config", str(cfg),
                                                           "--tp", str(tp), "--pp", str(pp), "--no-progress"])
            for rr in res:  # Megatron's rank order: TP fastest, then the pipeline stage
                rows.append(("score", lay, rr["rank"], rr, owned_bytes(arch, tp, 2, pp=pp, stage=rr["rank"] // tp),
                             None, stage_note(arch, pp, rr["rank"] // tp), "score"))
        # the MIP's choice, fixed here: the parent's own variants (a 1.24B child from the library)
        run.joinpath("mip").mkdir(exist_ok=True)
        (run / "mip" / "solutions.json").write_text(json.dumps({"solutions": [{
            "layers": [{"attention": la.attention.name, "ffn": la.ffn.name} for la in arch.layers],
            "objective": 0.0, "predicted_speedup": 1.0}]}))
        if "realize" in runs:
            (r,) = run_ranks(work, "realize", 1, ["realize", "--run-dir", str(run), "--max-shard-size",
                                                  a.max_shard_size])
            if "realize" in stages:
                rows.append(("realize", "1 process", 0, r, None, io_target, "", "realize"))
        if "gkd" in stages and (a.gkd == "yes" or a.gkd_only or (a.gkd == "auto" and a.shape == "small")):
            for lay, rc in [(lay, rc) for lay in a.layouts.split(",") for rc in a.gkd_recompute.split(",")]:
                tp, pp = (int(x) for x in lay.split("x"))
                shutil.rmtree(run / "gkd", ignore_errors=True)
                gcfg = work / f"bench_gkd_{rc}.yaml"
                gcfg.write_text(json.dumps({"gkd": {**json.loads(cfg.read_text())["gkd"], "seq_len": a.gkd_seq_len,
                                                    "recompute": rc}}))
                res = run_ranks(work, f"gkd_{lay}_{rc}", tp * pp, ["gkd", "--config", str(gcfg), "--run-dir",
                                                                   str(run), "--tp", str(tp), "--pp", str(pp),
                                                                   "--no-progress"])
                plain = a.gkd_seq_len == 32 and rc == "none"  # what memory_model's gkd-fp32 is fitted to
                for rr in res:
                    st = rr["rank"] // tp  # ranks are TP-fastest
                    # frozen parent + child, its grads and AdamW's two moments, all fp32 on CPU
                    own = owned_bytes(arch, tp, 4, pp=pp, stage=st) * 5
                    rows.append(("gkd (2 steps)" if plain else f"gkd (2 steps, seq {a.gkd_seq_len}, recompute {rc})",
                                 lay, rr["rank"], rr, own, None, "parent + child, grads, AdamW",
                                 "gkd-fp32" if plain else f"gkd-fp32-seq{a.gkd_seq_len}-{rc}"))
        for lay in (a.layouts.split(",") if "evaluate" in stages else []):
            tp, pp = (int(x) for x in lay.split("x"))
            res = run_ranks(work, f"evaluate_{lay}", tp * pp, ["evaluate", "--run-dir", str(run), "--config",
                                                                str(cfg), "--child", str(run / "parent"),
                                                                "--tp", str(tp), "--pp", str(pp)])
            for rr in res:
                st = rr["rank"] // tp  # ranks are TP-fastest
                rows.append(("evaluate (parent vs itself)", lay, rr["rank"], rr,
                             owned_bytes(arch, tp, 2, replicas=2, pp=pp, stage=st), None,
                             stage_note(arch, pp, st), "evaluate"))
        if "export-hf" in stages:
            (r,) = run_ranks(work, "export", 1, ["export-hf", "--checkpoint", str(run / "parent"), "--out",
                                                  str(work / "export"), "--dtype", "bf16", "--max-shard-size",
                                                  a.max_shard_size])
            rows.append(("export-hf", "1 process", 0, r, None, io_target, "", "export-hf"))
        if a.bld_train and "bld-train" in stages:
            # two students per layer: GQA at half the KV heads, SwiGLU at 25 %; bf16 + fp32 master state
            student_attn = AttentionVariant("gqa", max(1, kv // 2))
            student_ffn = FFNVariant("mlp", round_up(arch.layers[0].ffn.intermediate_size // 4, 256))
            cfg_train = work / "bench_bld.yaml"
            cfg_train.write_text(json.dumps({
                "search_space": {"kv_heads": [student_attn.num_kv_heads], "ffn_fractions": [0.25],
                                 "attention_linear": False, "attention_no_op": False, "ffn_linear": False,
                                 "ffn_no_op": False},
                "bld": {"tokens_per_block": 64, "batch_size": 1, "seq_len": 32, "eval_batches": 1,
                        "calibration_batches": 1, "checkpoint_every": 2, "dtype": "bfloat16"}}))
            per_layer = arch.attention_params(student_attn) + arch.ffn_params(student_ffn)
            for lay in a.layouts.split(","):
                tp, pp = (int(x) for x in lay.split("x"))
                shutil.rmtree(run / "library", ignore_errors=True)
                shutil.rmtree(run / "state" / "bld", ignore_errors=True)
                res = run_ranks(work, f"bld_train_{lay}", tp * pp, ["bld", "--config", str(cfg_train), "--run-dir",
                                                                     str(run), "--tp", str(tp), "--pp", str(pp),
                                                                     "--no-progress"])
                for rr in res:
                    st = rr["rank"] // tp
                    layers = len(stage_layer_ranges(arch.num_layers, pp)[st])
                    own = owned_bytes(arch, tp, 2, pp=pp, stage=st) + BLD_STATE_BYTES * per_layer * layers // tp
                    rows.append(("bld (2 students/layer, 2 steps)", lay, rr["rank"], rr, own, None,
                                 "bf16 teacher + students, 20 B/trained param", "bld-train"))
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write_report(Path(a.out), a, arch, model_bytes, largest, shard, rows, time.perf_counter() - t0, previous)
    return 0


def stage_note(arch, pp: int, stage: int) -> str:
    """Which layers a PP rank holds (empty at PP = 1)."""
    from megapuzzle.model.config import stage_layer_ranges

    if pp == 1:
        return ""
    r = stage_layer_ranges(arch.num_layers, pp)[stage]
    extra = " + embedding" if stage == 0 else ""
    extra += " + final norm, head" if stage == pp - 1 else ""
    return f"PP stage {stage}: layers {r[0]}-{r[-1]}{extra}"


def load_previous(out: Path, shape: str) -> dict | None:
    """OUT's json, to merge into (None when there is none yet); it must be the same shape."""
    p = out.with_suffix(".json")
    if not p.exists():
        return None
    prev = json.loads(p.read_text())
    if prev.get("shape") != shape:
        raise SystemExit(f"--merge: {p} is shape {prev.get('shape')!r}, this run {shape!r}")
    return prev


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """old's rows with every (key, layout) that `new` measured replaced by new's rows, in old's order
    (a (key, layout) old lacks goes after old's last row of that key, else at the end)."""
    measured = {(r["key"], r["layout"]) for r in new}
    out: list[dict] = []
    placed: set = set()
    for r in old:
        k = (r["key"], r["layout"])
        if k not in measured:
            out.append(r)
        elif k not in placed:
            placed.add(k)
            out += [n for n in new if (n["key"], n["layout"]) == k]
    for k in dict.fromkeys((n["key"], n["layout"]) for n in new):
        if k in placed:
            continue
        rows = [n for n in new if (n["key"], n["layout"]) == k]
        at = max((i + 1 for i, r in enumerate(out) if r["key"] == k[0]), default=len(out))
        out[at:at] = rows
    return out


# Measured once on this shape with the code before sharded, lazily read checkpoints (40b40ab);
# that code cannot run this script (no --max-shard-size, no score.dtype), so the figures are fixed.
BEFORE = """Before (commit 40b40ab, whole-file loads), same parent: `import-hf` peaked at 7.10 GiB (it held
every HF shard in one dict, then the whole model as one file: 3.1x the model). Loading the parent
as the stages did (whole file per rank, cast to fp32, then sliced) cost 4.6-7.6 GB per TP=2 rank
(issue 14's measurement): 3.7-6.2x the rank's bf16 share, against about 2.1 GiB now for score at 2x1.

Misses, each with its cause (not rows of this table):

* gkd at this shape: the 1.24B-parameter child's fp32 state (params, grads, two AdamW moments) next to
  its fp32 parent is ~23 GiB at 1x1, more than this 2-core, 24 GB machine shared with test runs holds.
  gkd is measured at every layout at the `mid` shape instead (0.62B: hidden 2048, 8 layers, vocab 32k;
  memory_mid.md, 1x1 peak 13.2 GiB for 11.5 GiB owned, all within target) and at `small`
  (memory_small.md); the memory model (megapuzzle.memory_model) scales its coefficient from `mid`.

Every other stage is within its target at 1x1, 2x1 and 1x2. Score and evaluate run 1x2 as a real
pipeline (part 1; before it, score's 1x2 rows were two data-parallel replicas of the whole model,
3.16 / 3.20 GiB, and evaluate had no PP): each rank owns its stage's share, 8 of the 16 layers plus
the embedding (stage 0) or the final norm and the tied head's copy (stage 1), 1.40 GiB for score and
2.79 GiB (parent + child) for evaluate, against 2.30 / 4.60 GiB at 1x1. Score's stages peak at 2.49 /
2.78 GiB. Evaluate's stages peaked at 3.79 / 4.73 GiB in part 1 (the last stage 4.73 of 4.99 GiB,
0.94 GiB above the first at the same owned bytes). Cause (RSS probed around each model build and load,
same run dir): evaluate read its checkpoints through fp32 readers (load_checkpoint(dtype=float32))
and load_canonical_into_model cast each tensor to the bf16 parameter, so the [vocab, hidden] tied
head cost 0.98 GiB fp32 + 0.49 GiB bf16 for a moment (1.47 GiB); the last stage loads the head last,
on top of its 8 layers, and again for the second model. Evaluate now reads each tensor straight in
the quality (and the timing) dtype, the same values (part 2): its stages peak at 3.28 / 4.16 GiB
(1x1: 5.19 -> 5.08 GiB). The last stages set the memory model's k (bytes added per owned byte):
score 1.69 -> 1.83, evaluate 1.14 -> 1.62 in part 1 (memory_recipes.md has today's).

The figures are stored machine-readably in memory.json (same rows); megapuzzle.memory_model fits
bytes added per owned byte and the baseline to them and tests/test_examples.py scales them to the
8B / 70B / 405B H100 recipes: memory_recipes.md (`python benchmarks/memory_recipes.py`)."""


def command_line(a) -> str:
    """The canonical command that reproduces this run (defaults left out)."""
    return "python benchmarks/bench_memory.py" + ("" if a.shape == "1b" else f" --shape {a.shape}") + \
        ("" if a.max_shard_size == "1GB" else f" --max-shard-size {a.max_shard_size}") + \
        (" --gkd-only" if a.gkd_only else "") + \
        ("" if a.gkd_only or a.stages == ",".join(STAGES) else f" --stages {a.stages}") + \
        ("" if a.layouts == "1x1,2x1,1x2" else f" --layouts {a.layouts}") + \
        ("" if a.gkd_seq_len == 32 else f" --gkd-seq-len {a.gkd_seq_len}") + \
        ("" if a.gkd_recompute == "none" else f" --gkd-recompute {a.gkd_recompute}") + \
        (" --merge" if a.merge else "")


def write_report(out: Path, a, arch, model_bytes: int, largest: int, shard: int, rows: list[tuple],
                 wall: float, previous: dict | None = None) -> None:
    """OUT.json from this run's rows, merged into `previous` (OUT's json) when given (each row records
    the part, i.e. the command, that measured it), then OUT (markdown) rendered from it."""
    from megapuzzle.fileio import atomic_write_json, atomic_write_text

    parts = list(previous.get("parts") or [{"command": previous["command"], "cpus": previous["cpus"]}]) \
        if previous else []
    part = len(parts)
    parts.append({"command": command_line(a), "cpus": os.cpu_count(), "wall_s": round(wall, 1),
                  "date": time.strftime("%Y-%m-%d", time.gmtime())})
    records = []
    for row in rows:
        stage, lay, rank, r, owned, target, note, key = row
        if target is None and owned is not None:
            target = 1.25 * owned + ALLOW
        records.append({"key": key, "stage": stage, "layout": lay, "rank": rank, "owned": owned,
                        "baseline": r["baseline"], "peak": r["peak"], "target": target,
                        "within": None if target is None else bool(r["peak"] <= target), "note": note,
                        "part": part})
    if previous:
        records = merge_rows([{"part": 0, **r} for r in previous["rows"]], records)
    res = {"format": "megapuzzle-bench-memory/1", "command": parts[-1]["command"], "parts": parts, "shape": a.shape,
           "cpus": os.cpu_count(), "params": arch.num_params(), "num_layers": arch.num_layers,
           "hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size, "tied": arch.tie_word_embeddings,
           "model_bytes": model_bytes, "largest_tensor_bytes": largest, "shard_bytes": shard,
           "allowance_bytes": ALLOW, "rows": records}
    text = render(res)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), res)
    atomic_write_text(out, text)


def render(res: dict) -> str:
    """The markdown of a results json (`--render` re-writes OUT from OUT.json alone)."""
    parts, records = res.get("parts") or [{"command": res["command"], "cpus": res["cpus"]}], res["rows"]
    fmt = (lambda b: "-" if b is None else f"{b / GB:.2f} GiB")
    many = len(parts) > 1
    used = {r.get("part", 0) for r in records}
    when = (lambda p: f" ({p['date']}, {p['cpus']} CPUs, wall {p['wall_s'] / 60:.1f} min)" if "wall_s" in p else "")
    lines = ["Measured in parts (the `part` column):", ""] + \
        [f"{i}. `{p['command']}`{when(p)}" + ("" if i in used else ": no row left") for i, p in enumerate(parts)] \
        if many else [f"`{parts[0]['command']}`{when(parts[0])}"]
    tied = res.get("tied", SHAPES.get(res["shape"], {}).get("tie_word_embeddings"))
    lines += ["", f"Random Llama, shape `{res['shape']}`: {res['params'] / 1e9:.2f}B parameters, {res['num_layers']} "
              f"layers, hidden {res['hidden_size']}, vocab {res['vocab_size']}, tied={tied}; "
              f"{res['model_bytes'] / GB:.2f} GiB in bf16, largest tensor {res['largest_tensor_bytes'] / MB:.0f} MiB, "
              f"shards of {res['shard_bytes'] / MB:.0f} MiB.", "",
              "Peak = ru_maxrss of the rank at exit (interpreter, torch and Megatron included); added = peak minus "
              "the rank's ru_maxrss before the command ran. Target: <= 1.25 x owned + 1.5 GiB for stages, "
              "<= one shard + the largest tensor + 1.5 GiB for import / export.", "",
              "| stage | TPxPP | rank | owned | peak RSS | added | target | within | note |" + (" part |" if many else ""),
              "|---|---|---:|---:|---:|---:|---:|---|---|" + ("---:|" if many else "")]
    for r in records:
        ok = "" if r["target"] is None else ("yes" if r["within"] else "**miss**")
        lines.append(f"| {r['stage']} | {r['layout']} | {r['rank']} | {fmt(r['owned'])} | {fmt(r['peak'])} | "
                     f"{fmt(r['peak'] - r['baseline'])} | {fmt(r['target'])} | {ok} | {r['note']} |" +
                     (f" {r.get('part', 0)} |" if many else ""))
    if res["shape"] == "1b":
        lines += ["", BEFORE]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
