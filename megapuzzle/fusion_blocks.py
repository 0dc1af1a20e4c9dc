"""Fused-run blocks (FFN Fusion inside the search, issue #16): init, BLD over a run, replace-the-run KL.

A run block replaces parent layers i..j by ONE layer: the parent's attention at i and an FFN of
width W, the run's other layers no-op / no-op. It is initialised by the exact fold of the
parent's FFNs i..j (megapuzzle.fusion.fold_ffns; W = their summed width), trained like a BLD
block but across the run: input = the parent's residual stream entering layer i, target = the
parent's stream leaving layer j (normalized MSE), and scored by replace-the-run KL: the parent
with layers i..j replaced by the block, against the parent.

What is here is single-process (TP = PP = 1) and file-free: `train_run_block` and
`score_run_block` take a parent checkpoint and datasets and return tensors / numbers. Library
storage, costs for the fused widths and the MIP stage wiring are the next steps (docs/design.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch
from megapuzzle.errors import UserError
from megapuzzle.fusion import fold_ffns

log = logging.getLogger(__name__).info


def run_block_layer(parent: Architecture, i: int, j: int) -> LayerArch:
    """The replacement layer of run [i, j]: the parent's attention at i, an MLP of the summed FFN width."""
    if not 0 <= i < j < parent.num_layers:
        raise UserError(f"run [{i}, {j}] is not a range of at least two of the parent's {parent.num_layers} layers")
    widths = [parent.layers[k].ffn.intermediate_size for k in range(i, j + 1) if parent.layers[k].ffn.parent_like]
    if not widths:
        raise UserError(f"run [{i}, {j}] has no MLP to fuse")
    return LayerArch(parent.layers[i].attention, FFNVariant("mlp", sum(widths)))


def run_arch(parent: Architecture, i: int, j: int, layer: LayerArch) -> Architecture:
    """The parent with layers i..j replaced by `layer` (at i) and no-op / no-op layers."""
    layers = list(parent.layers)
    layers[i] = layer
    for k in range(i + 1, j + 1):
        layers[k] = LayerArch(AttentionVariant("no_op"), FFNVariant("no_op"))
    return parent.with_layers(layers)


def init_run_block(parent: Architecture, tensors: Mapping[str, torch.Tensor], i: int, j: int,
                   ffn_locals: list[Mapping[str, torch.Tensor]] | None = None
                   ) -> tuple[LayerArch, dict[str, torch.Tensor]]:
    """(layer, layer-local canonical tensors) of run [i, j]: attention i copied, FFNs i..j folded.
    `ffn_locals`: per MLP layer of the run, in order, the layer-local FFN tensors to fold instead
    of the parent's (a narrower variant's library blocks); the width is then their sum."""
    p = f"model.layers.{i}."
    local = {n[len(p):]: tensors[n] for n in tensors.keys() if n.startswith(p) and
             (n.startswith(p + "self_attn.") or n == p + "input_layernorm.weight")}
    if ffn_locals is None:
        ffn_locals = [{n: tensors[f"model.layers.{k}.{n}"] for n in FFN_NAMES}
                      for k in range(i, j + 1) if parent.layers[k].ffn.parent_like]
        layer = run_block_layer(parent, i, j)
    else:
        widths = [int(f["mlp.gate_proj.weight"].shape[0]) for f in ffn_locals]
        layer = LayerArch(parent.layers[i].attention, FFNVariant("mlp", sum(widths)))
    parts = [(f["post_attention_layernorm.weight"], f["mlp.gate_proj.weight"], f["mlp.up_proj.weight"],
              f["mlp.down_proj.weight"]) for f in ffn_locals]
    norm, gate, up, down = fold_ffns(parts)
    local.update({"post_attention_layernorm.weight": norm, "mlp.gate_proj.weight": gate,
                  "mlp.up_proj.weight": up, "mlp.down_proj.weight": down})
    return layer, local


def narrower_starts(parent: Architecture, library, i: int, j: int) -> list[tuple[FFNVariant, list[dict], list[str]]]:
    """Per narrower parent-like FFN variant the library holds at every layer of run [i, j] (all its
    layers MLPs): (variant, its trained blocks' FFN tensors, layer by layer). A fused block of the
    run can start from these (width = their sum) as well as from the parent's own FFNs. Third: the
    library checksums of those blocks (a retrained block retrains the run blocks made from it)."""
    from megapuzzle.library import ffn_key

    entries = library.entries()
    common = None
    for k in range(i, j + 1):
        own = parent.layers[k].ffn
        names = {e["ffn"] for e in entries.values() if e["layer"] == k and e["kind"] == "ffn"}
        vs = {FFNVariant.from_name(n) for n in names}
        vs = {v for v in vs if v.parent_like and v.intermediate_size < own.intermediate_size}
        common = vs if common is None else common & vs
    out = []
    for v in sorted(common or (), key=lambda v: -v.intermediate_size):
        blocks = [library.load_block(ffn_key(k, v)) for k in range(i, j + 1)]
        out.append((v, [{n: b[n] for n in FFN_NAMES} for b in blocks],
                    [entries[ffn_key(k, v)].get("sha256", "") for k in range(i, j + 1)]))
    return out


def run_state_dict(parent: Architecture, tensors: Mapping[str, torch.Tensor], i: int, j: int, layer: LayerArch,
                   local: Mapping[str, torch.Tensor]) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """Whole-model canonical tensors of the parent with run [i, j] replaced (small models: scoring, tests)."""
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes

    arch = run_arch(parent, i, j, layer)
    p = f"model.layers.{i}."
    out = {}
    for n in expected_canonical_shapes(arch):
        out[n] = local[n[len(p):]] if n.startswith(p) else tensors[n]
    return arch, out


@dataclass
class RunBlockResult:
    layer: LayerArch
    tensors: dict[str, torch.Tensor]
    """Layer-local canonical tensors (names without the `model.layers.{i}.` prefix): attention + FFN."""
    nmse_init: float
    nmse_final: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _nmse(student, teacher, batches, i: int, j: int) -> float:
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            t = teacher.forward(b[:, :-1])
            out, y = student(t).float(), t.y[j].float()
            num += (out - y).pow(2).sum().item()
            den += y.pow(2).sum().item()
    return num / den


def train_run_block(parent_dir, train_prefix, heldout_prefix, i: int, j: int, *, steps: int = 20,
                    batch_size: int = 4, seq_len: int = 64, lr: float = 1e-3, eval_batches: int = 2, seed: int = 1234,
                    train_attention: bool = False, ffn_locals: list[Mapping[str, torch.Tensor]] | None = None) -> RunBlockResult:
    """BLD over a run: the fused block on the parent's input to layer i learns the parent's output of
    layer j (normalized MSE, AdamW, cosine LR). The parent stays frozen. Only the fused FFN trains
    (the parent's attention at i is frozen, so the block combines with any attention variant at i,
    scores adding up as in decoupled BLD) unless `train_attention`."""
    from megapuzzle.stages.bld.blocks import StudentBlock, Teacher
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.costs.timing import ensure_runtime
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.stages.evaluate.evaluate import _build

    t0 = time.perf_counter()
    ensure_runtime(None)
    parent, tensors, _ = load_checkpoint(parent_dir, dtype=torch.float32)
    layer, local = init_run_block(parent, tensors, i, j, ffn_locals)
    teacher = Teacher(_build(parent, tensors), layers={i, j}, mid_layers=set())
    student = StudentBlock(f"run{i}-{j}", "layer", i, parent, layer, teacher, tp=1)
    student.load_canonical(local)
    train = PackedSequenceDataset.from_prefix(train_prefix)
    held = list(PackedSequenceDataset.from_prefix(heldout_prefix).eval_batches(batch_size, seq_len,
                                                                              max_batches=eval_batches))
    student.eval()
    init = _nmse(student, teacher, held, i, j)
    own = student.trainable()
    if train_attention:
        params = list(own.values())
    else:  # decoupled, like BLD's FFN blocks: the parent's attention at i stays frozen
        params = [p for n, p in own.items() if "mlp" in n]
        for n, p in own.items():
            if "mlp" not in n:
                p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = []
    student.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        t = teacher.forward(train.batch(step, batch_size, seq_len, seed)[:, :-1])
        y = t.y[j]
        loss = (student(t) - y).pow(2).sum() / y.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
    student.eval()
    final = _nmse(student, teacher, held, i, j)
    log(f"[fusion-bld] run {i}-{j} ({layer.name}): held-out NMSE {init:.4f} -> {final:.4f} in {steps} steps")
    return RunBlockResult(layer, student.gather_canonical(), init, final, history, time.perf_counter() - t0)


def score_run_block(parent_dir, heldout_prefix, i: int, j: int, layer: LayerArch, local: Mapping[str, torch.Tensor],
                    *, batch_size: int = 4, seq_len: int = 64, num_batches: int = 2, with_parent: bool = False
                    ) -> dict[str, float]:
    """Replace-the-run quality: the parent with layers i..j replaced by the block, against the parent
    (KL(parent || model), LM loss, accuracy, top-1 agreement) on held-out batches."""
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.costs.timing import ensure_runtime
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.stages.evaluate.evaluate import _build, quality_metrics

    ensure_runtime(None)
    parent, tensors, _ = load_checkpoint(parent_dir, dtype=torch.float32)
    arch, sd = run_state_dict(parent, tensors, i, j, layer, local)
    batches = list(PackedSequenceDataset.from_prefix(heldout_prefix).eval_batches(batch_size, seq_len,
                                                                                 max_batches=num_batches))
    pm = _build(parent, tensors)
    q = quality_metrics(pm, {"parent": pm, "run": _build(arch, sd)}, batches)
    return q if with_parent else q["run"]


# ----------------------------------------------------------------------------- the run library

RUNS_DIR = "library_runs"
FORMAT = "megapuzzle-run-blocks/1"
FFN_NAMES = ("post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def run_key(i: int, j: int, ffn: FFNVariant) -> str:
    return f"R{i:03d}-{j:03d}.{ffn.name}"


def run_windows(parent: Architecture, max_run: int) -> list[tuple[int, int]]:
    """Every [i, j] of 2..max_run layers whose FFNs are all MLPs."""
    L = parent.num_layers
    return [(i, i + n - 1) for n in range(2, max_run + 1) for i in range(L - n + 1)
            if all(parent.layers[k].ffn.parent_like for k in range(i, i + n))]


def _index_path(run_root) -> Path:
    return Path(run_root) / RUNS_DIR / "index.json"


def load_run_index(run_root) -> dict:
    import json

    p = _index_path(run_root)
    if not p.is_file():
        return {"format": FORMAT, "blocks": {}}
    d = json.loads(p.read_text())
    if d.get("format") != FORMAT:
        raise UserError(f"{p} is not a {FORMAT} index; delete {p.parent} and re-run bld")
    return d


def run_bld(run_root, bld_cfg, max_run: int) -> dict:
    """Train (and store) the fused FFN of every run window of 2..max_run layers: RUN/library_runs/.
    Each window gets one block started from the fold of the parent's FFNs (the summed width) and
    one per narrower FFN variant the library holds at all its layers, started from the fold of
    those trained blocks (width = n x the variant's: FFN Fusion of an already-pruned run).
    Steps = bld.tokens_per_block / (batch_size * seq_len), bld's batch / seq_len / lr / seed.
    Blocks already stored under the same settings are kept (resumable, one block at a time)."""
    import hashlib
    import json

    from megapuzzle.checkpoints.canonical import load_arch, require_parent
    from megapuzzle.config import RunDir
    from megapuzzle.fileio import atomic_write_json, save_safetensors_atomic, sha256_file

    run = RunDir(run_root)
    parent = load_arch(require_parent(run))
    steps = max(1, bld_cfg.tokens_per_block // (bld_cfg.batch_size * bld_cfg.seq_len))
    settings = {"steps": steps, "batch_size": bld_cfg.batch_size, "seq_len": bld_cfg.seq_len, "lr": bld_cfg.lr,
                "seed": bld_cfg.seed, "eval_batches": bld_cfg.eval_batches, "parent": parent.to_dict()}
    sig = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    index = load_run_index(run.root)
    if index.get("signature") != sig:
        index = {"format": FORMAT, "signature": sig, "settings": settings, "blocks": {}}
    root = run.root / RUNS_DIR
    (root / "blocks").mkdir(parents=True, exist_ok=True)
    from megapuzzle.library import BlockLibrary

    library = BlockLibrary(run.library)
    for i, j in run_windows(parent, max_run):
        starts = [(None, None, None)] + narrower_starts(parent, library, i, j)
        for start, ffn_locals, sources in starts:
            width = (run_block_layer(parent, i, j).ffn if start is None else
                     FFNVariant("mlp", start.intermediate_size * (j - i + 1)))
            key = run_key(i, j, width)
            if key in index["blocks"] and index["blocks"][key].get("sources") == sources:
                continue
            res = train_run_block(run.parent, run.require_data("train"), run.require_data("heldout"), i, j,
                                  steps=steps, batch_size=bld_cfg.batch_size, seq_len=bld_cfg.seq_len, lr=bld_cfg.lr,
                                  eval_batches=bld_cfg.eval_batches, seed=bld_cfg.seed, ffn_locals=ffn_locals)
            f = root / "blocks" / f"{key}.safetensors"
            save_safetensors_atomic({n: res.tensors[n].contiguous() for n in FFN_NAMES}, f)
            index["blocks"][key] = {"first": i, "last": j, "ffn": res.layer.ffn.name, "file": f"blocks/{f.name}",
                                    "start": "parent" if start is None else start.name, "sources": sources,
                                    "sha256": sha256_file(f), "nmse_init": res.nmse_init,
                                    "nmse_final": res.nmse_final, "seconds": res.seconds}
            atomic_write_json(_index_path(run.root), index)
    atomic_write_json(_index_path(run.root), index)
    return index


def run_block_ffn(run_root, key: str) -> dict[str, torch.Tensor]:
    """The stored fused FFN of one run block (layer-local names), checksum verified."""
    from megapuzzle.fileio import read_safetensors, sha256_file

    e = load_run_index(run_root)["blocks"][key]
    f = _index_path(run_root).parent / e["file"]
    if sha256_file(f) != e["sha256"]:
        raise UserError(f"{f} does not match its checksum in the run-block index; re-run bld")
    return read_safetensors(f, fix="re-run bld")


def score_runs(run_root, score_cfg) -> dict:
    """Replace-the-run scores of every stored run block (with the parent's attention at i), on
    score's batch size / seq_len / batches: kl, lm_loss_delta (vs the parent, same batches), top1."""
    from megapuzzle.checkpoints.canonical import load_checkpoint, require_parent
    from megapuzzle.config import RunDir
    from megapuzzle.fileio import atomic_write_json

    run = RunDir(run_root)
    index = load_run_index(run.root)
    parent, tensors, _ = load_checkpoint(require_parent(run), dtype=torch.float32)
    settings = {"batch_size": score_cfg.batch_size, "seq_len": score_cfg.seq_len, "num_batches": score_cfg.num_batches}
    if index.get("score_settings") != settings:  # other scoring batches: every block is scored again
        index["score_settings"] = settings
        for e in index["blocks"].values():
            for k in ("kl", "lm_loss_delta", "top1"):
                e.pop(k, None)
    for key, e in index["blocks"].items():
        if "kl" in e:
            continue
        i, j = e["first"], e["last"]
        p = f"model.layers.{i}."  # the parent's attention at i + the stored fused FFN (of the entry's width)
        local = {n[len(p):]: tensors[n] for n in tensors.keys() if n.startswith(p) and
                 (n.startswith(p + "self_attn.") or n == p + "input_layernorm.weight")}
        local.update(run_block_ffn(run.root, key))
        layer = LayerArch(parent.layers[i].attention, FFNVariant.from_name(e["ffn"]))
        q = score_run_block(run.parent, run.require_data("heldout"), i, j, layer, local,
                            batch_size=score_cfg.batch_size, seq_len=score_cfg.seq_len, num_batches=score_cfg.num_batches,
                            with_parent=True)
        e.update(kl=q["run"]["kl_to_parent"], lm_loss_delta=q["run"]["lm_loss"] - q["parent"]["lm_loss"],
                 top1=q["run"]["top1_agreement"])
        log(f"[fusion-score] {key}: KL {e['kl']:.4f}, LM loss {e['lm_loss_delta']:+.4f}, top-1 agreement {e['top1']:.3f}")
        atomic_write_json(_index_path(run.root), index)
    return index


def run_score_value(e: dict, metric: str) -> float:
    if "kl" not in e:
        raise UserError(f"run block {e.get('first')}-{e.get('last')} has no score; re-run score")
    if metric == "kl":
        return max(0.0, float(e["kl"]))
    if metric == "lm_loss":
        return float(e["lm_loss_delta"])
    return 1.0 - float(e["top1"])


def iter_child_with_runs(lib, run_root, parent: Architecture, parent_tensors, layers: list[LayerArch],
                         runs: list[tuple[int, int]]):
    """A child's canonical (name, tensor) pairs where run layers come from the run library: the
    library streams everything else (a run's first layer with a no-op FFN, its other layers
    no-op / no-op) and the stored fused FFN is spliced in at the run's first layer."""
    from megapuzzle.checkpoints.canonical import expected_canonical_shapes

    lib_layers = list(layers)
    for i, j in runs:
        lib_layers[i] = LayerArch(layers[i].attention, FFNVariant("no_op"))
        for k in range(i + 1, j + 1):
            lib_layers[k] = LayerArch(AttentionVariant("no_op"), FFNVariant("no_op"))
    stream = lib.iter_assembled(parent, parent_tensors, lib_layers)
    starts = {i: j for i, j in runs}
    child = parent.with_layers(layers)
    ffn: dict[str, torch.Tensor] = {}
    for name in expected_canonical_shapes(child):
        parts = name.split(".")
        if name.startswith("model.layers.") and int(parts[2]) in starts and ".".join(parts[3:]) in FFN_NAMES:
            i = int(parts[2])
            if not ffn or next(iter(ffn)) != i:
                ffn = {i: run_block_ffn(run_root, run_key(i, starts[i], layers[i].ffn))}
            yield name, ffn[i][".".join(parts[3:])]
            continue
        got, t = next(stream)
        if got != name:
            raise UserError(f"realize with runs: expected {name} from the library, got {got}")
        yield name, t
