"""`megapuzzle score`: replace-1-block scoring of every library block.

    megapuzzle score --config examples/cpu_demo.yaml --run-dir runs/demo
    torchrun --nproc-per-node 8 -m megapuzzle.cli score --config ... --run-dir ...   # blocks split over ranks
    torchrun --nproc-per-node 8 -m megapuzzle.cli score --pp 8 --config ... --run-dir ...  # a 70B parent:
        # each GPU holds 10 of its 80 layers (world = TP x PP x DP; score.tensor_parallel / pipeline_parallel)

For every block of RUN/library: the parent with only that block swapped in, on held-out
tokens, against the parent's own next-token distribution: KL(parent || child) (the default
score), LM loss, top-1 agreement and top-k overlap. Results in RUN/scores.json.

Why it is fast (docs/design.md, "Scoring dominates naive pipelines"): the parent's residual stream at
every layer input and its log-probabilities are computed once per batch and kept; a block at
layer l then runs only its own layer and the parent's layers l+1..L-1 plus the head, and all
candidates of one layer go through those shared layers stacked into one batch.
(tests/test_search.py checks it against the whole model per candidate.) A fused-run block
(`BlockRef.last`, megapuzzle.stages.fusion_runs.score_runs) runs on the stream entering its first
layer and continues after its last.

Pipeline parallel (PP > 1): each stage builds and reads only its own layers (megapuzzle.model.runner
runs them), keeps only the streams entering them and, on the last stage, the parent's log-probs:
per batch, tokens x (stage layers + 1) x hidden in `dtype` + (last stage) tokens x vocab x 4 bytes,
bounded by score.cache_gb per rank. A candidate runs on the stage owning its layer, the stacked
stream [s, n x b, h] is sent on stage to stage and the last stage computes the metrics; every rank
of a pipeline follows one deterministic schedule (`score_blocks`). The scores equal PP=1's bitwise.

Resumable: the rank holding the metrics (TP rank 0 of the last stage) appends finished blocks to
RUN/state/score/rank{r}.json (atomic); a restart skips them (the pipeline's ranks agree on which).
Rank 0 merges all ranks' files into scores.json.

`--shard I/N` (a SLURM array task, slurm/score.sbatch): score only every N-th block starting
at I (this job's DP ranks split that further), into RUN/state/score/shard{I}of{N}_rank{r}.json,
without merging; a later run without --shard finds every block done and only merges.
"""

from __future__ import annotations

import logging
import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megapuzzle.train import faults
from megapuzzle.config.score import ScoreConfig  # noqa: F401 (the stage's config)
from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch
from megapuzzle.config import RunDir, load_config, section, section_dict
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json
from megapuzzle.metrics import kl_per_token, nll_per_token, top1_matches, topk_overlap

if TYPE_CHECKING:
    from megapuzzle.model.runner import StageRunner

log = logging.getLogger(__name__).info

FORMAT = "megapuzzle-scores/1"
LAYOUT = ("tensor_parallel", "pipeline_parallel")  # how the parent is split: not part of a score's identity


@dataclass
class BlockRef:
    key: str
    layer: int
    la: LayerArch  # the whole layer the block makes (its own subblock + the parent's other one)
    last: int | None = None
    """A fused-run block (megapuzzle.stages.fusion_runs): it replaces layers layer..last; its FFN is
    the library's block, its attention the parent's at `layer`. None: one layer."""

    @property
    def end(self) -> int:
        return self.layer if self.last is None else self.last


def library_blocks(parent, library) -> list[BlockRef]:
    """Every library block as the full layer it would make in the parent, in key order."""
    out = []
    for key, e in sorted(library.entries().items()):
        own = parent.layers[e["layer"]]
        if e["kind"] == "attention":
            la = LayerArch(AttentionVariant.from_name(e["attention"]), own.ffn)
        elif e["kind"] == "ffn":
            la = LayerArch(own.attention, FFNVariant.from_name(e["ffn"]))
        else:
            la = LayerArch(AttentionVariant.from_name(e["attention"]), FFNVariant.from_name(e["ffn"]))
        out.append(BlockRef(key, e["layer"], la))
    return out


def block_layer_module(parent, ref: BlockRef, library, parent_tensors, tp: int,
                       dtype: torch.dtype = torch.float32):
    """A Megatron TransformerLayer computing the block's full layer: the block's own subblock(s)
    plus, for a decoupled block, the parent's other subblock of that layer."""
    from megapuzzle.stages.bld.blocks import StudentBlock
    from megapuzzle.init import attention_part, ffn_part, local_layer_tensors

    kind = ref.key.split(".")[1] if ref.last is None else "ffn"
    parent_local = local_layer_tensors(parent_tensors, ref.layer)
    local = dict(ffn_part(parent_local) if kind == "attention" else
                 attention_part(parent_local) if kind == "ffn" else {})
    local.update(library.load_block(ref.key))  # checksum-verified
    block = StudentBlock(ref.key, "layer", ref.layer, parent, ref.la, teacher=None, tp=tp, params_dtype=dtype)
    block.load_canonical(local)
    block.eval()
    return block.layer


def _metrics(parent_lp: torch.Tensor, child_lp: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, float]:
    """Sums over tokens (divided by the token count at the end)."""
    kl, nll = kl_per_token(parent_lp, child_lp), nll_per_token(child_lp, targets)
    top1, overlap = top1_matches(child_lp, parent_lp), topk_overlap(parent_lp, child_lp, k)
    return {"kl": kl.sum().item(), "lm_loss": nll.sum().item(), "top1": top1.sum().item(),
            "topk": overlap.sum().item()}


@dataclass
class ParentPass:
    """What every candidate of every layer shares for one batch on this stage: computed once."""

    targets: torch.Tensor
    streams: dict[int, torch.Tensor]  # residual stream entering each of THIS stage's layers, [s, b, h]
    rot: Any
    log_probs: torch.Tensor | None    # the parent's [b, s, V]; on the last stage only


@torch.no_grad()
def parent_pass(runner: StageRunner, tokens: torch.Tensor) -> ParentPass:
    """The parent on one batch through this pipeline (every stage calls it, in the same order)."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:].to(runner.device)
    h = runner.stage_input(inp)
    rot = runner.rotary(h)
    streams = {}
    for i in range(runner.first, runner.stop):
        streams[i] = h
        h = runner.layers_from(h, rot, start=i, stop=i + 1)
    return ParentPass(tgt, streams, rot, runner.stage_output(h))


def stage_cache_bytes(arch: Architecture, cfg: ScoreConfig, dtype: torch.dtype, pp: int = 1) -> list[int]:
    """Bytes one batch's kept parent pass costs on each pipeline stage: tokens x (the stage's layers
    + 1, for the stream in flight) x hidden in `dtype`, and on the last stage the parent's fp32
    log-probs, tokens x vocab x 4."""
    from megapuzzle.model.config import stage_layer_ranges

    tokens = cfg.batch_size * cfg.seq_len
    elt = torch.empty((), dtype=dtype).element_size()
    return [tokens * ((len(r) + 1) * arch.hidden_size * elt + (arch.vocab_size * 4 if s == pp - 1 else 0))
            for s, r in enumerate(stage_layer_ranges(arch.num_layers, pp))]


def cache_plan(arch: Architecture, cfg: ScoreConfig, dtype: torch.dtype, n_batches: int, pp: int = 1
               ) -> tuple[int, int]:
    """(bytes one batch's kept parent pass costs on the costliest stage, batches per group under
    score.cache_gb, a per-rank budget). Every stage groups the batches alike (one schedule for the
    whole pipeline), so the costliest stage sets the group. At least one batch per group: a batch
    bigger than the budget is still scored, alone."""
    per_batch = max(stage_cache_bytes(arch, cfg, dtype, pp))
    return per_batch, max(1, min(n_batches, int(cfg.cache_gb * (1 << 30)) // per_batch))


@torch.no_grad()
def score_blocks(parent, parent_tensors, model, library, refs: list[BlockRef], batches: list[torch.Tensor],
                 cfg: ScoreConfig, tp: int, done: dict[str, Any], on_done=None,
                 progress=None) -> dict[str, Any]:
    """Score `refs` (skipping keys in `done`); returns {key: metrics} (metrics on the last
    pipeline stage; None for this call's blocks elsewhere). `on_done(key, metrics or None)` runs
    on every rank at the same point of the schedule.

    Default: one parent pass per batch (streams + log-probs, kept), then per layer the
    candidates' layers run on the kept stream and are stacked along the batch through the
    shared suffix.

    Under PP every rank of the pipeline walks the same (group, layer, chunk, batch) schedule: the
    stage owning the layer builds the candidates, runs them and its remaining layers, and sends
    the stacked stream [s, n x b, h] on; each later stage receives it, runs its layers and sends on;
    the last stage computes the metrics; earlier stages skip the step. So every send has its
    receive and the TP collectives of a stage run on all its TP ranks."""
    from megatron.core import parallel_state as ps

    from megapuzzle.model.runner import StageRunner

    runner = StageRunner(model)
    pp = ps.get_pipeline_model_parallel_world_size()
    todo = [r for r in refs if r.key not in done]
    by_layer: dict[tuple[int, int], list[BlockRef]] = {}  # by (first, last) layer: one shared suffix each
    for r in todo:
        by_layer.setdefault((r.layer, r.end), []).append(r)
    results = dict(done)
    per_pass = cfg.candidates_per_pass
    # Parent passes are kept for one group of batches at a time (score.cache_gb); every block
    # still adds up its batches in order, so the scores do not depend on the grouping.
    per_group = cache_plan(parent, cfg, runner.dtype, len(batches), pp)[1]
    sums = {r.key: dict.fromkeys(("kl", "lm_loss", "top1", "topk"), 0.0) for r in todo}
    n_tok = 0
    for g0 in range(0, len(batches), per_group):
        group_batches = batches[g0:g0 + per_group]
        last = g0 + per_group >= len(batches)
        passes = [parent_pass(runner, t) for t in group_batches]
        n_tok += sum(t[:, 1:].numel() for t in group_batches)
        for layer, end in sorted(by_layer):
            group = by_layer[layer, end]
            for c0 in range(0, len(group), per_pass):
                chunk = group[c0:c0 + per_pass]
                modules = ([block_layer_module(parent, r, library, parent_tensors, tp, runner.dtype) for r in chunk]
                           if runner.owns(layer) else [])
                for bi, tokens in enumerate(group_batches):
                    if layer < runner.stop:  # the owner of the layer and every stage after it
                        cached = passes[bi]
                        if runner.owns(layer):
                            ys = [mod(hidden_states=cached.streams[layer], attention_mask=None,
                                      rotary_pos_emb=cached.rot)[0] for mod in modules]
                            h = torch.cat(ys, dim=1)
                        else:
                            h = runner.recv(tokens.shape[1] - 1, len(chunk) * tokens.shape[0])
                        h = runner.layers_from(h, cached.rot, start=end + 1)  # a run block replaces layer..end
                        lp = runner.stage_output(h)  # [n*b, s, V] on the last stage
                        outs = None if lp is None else list(lp.split(cached.targets.shape[0], dim=0))
                    else:
                        outs = None
                    for r, lp in zip(chunk, outs or []):
                        s = sums[r.key]
                        for k, v in _metrics(cached.log_probs, lp, cached.targets, cfg.top_k).items():
                            s[k] += v
                if not last:
                    continue
                for r in chunk:
                    results[r.key] = ({"layer": r.layer, "attention": r.la.attention.name, "ffn": r.la.ffn.name,
                                       **{k: v / n_tok for k, v in sums[r.key].items()}} if runner.is_last else None)
                    if on_done:
                        on_done(r.key, results[r.key])
                    if progress:
                        progress.update(1)
        del passes
    return results


def heldout_batches(run: RunDir, cfg: ScoreConfig) -> list[torch.Tensor]:
    from megapuzzle.data.datasets import PackedSequenceDataset

    data = PackedSequenceDataset.from_prefix(run.require_data("heldout"))
    batches = list(data.eval_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.num_batches))
    if not batches:
        raise UserError(f"held-out data {run.heldout_data} is shorter than one batch of {cfg.batch_size} x "
                        f"{cfg.seq_len + 1} tokens; lower score.batch_size / score.seq_len")
    return batches


@torch.no_grad()
def parent_metrics(model, batches, k: int) -> dict[str, float]:
    """The parent's LM loss and next-token accuracy on `batches`. Collective over the pipeline
    (and TP): every rank runs it and gets the result (PP: broadcast from the last stage)."""
    from megatron.core import parallel_state as ps

    from megapuzzle.model.runner import StageRunner

    runner = StageRunner(model)
    tot, n = [0.0, 0.0], 0
    for tokens in batches:
        lp, tgt = runner.log_probs(tokens[:, :-1]), tokens[:, 1:]
        n += tgt.numel()
        if lp is not None:
            tgt = tgt.to(lp.device)
            tot[0] += nll_per_token(lp, tgt).sum().item()
            tot[1] += top1_matches(lp, tgt).sum().item()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        t = torch.tensor(tot, dtype=torch.float64, device=runner.device)  # the python floats, exactly
        group = ps.get_pipeline_model_parallel_group()
        dist.broadcast(t, src=dist.get_process_group_ranks(group)[-1], group=group)
        tot = t.tolist()
    return {"lm_loss": tot[0] / n, "accuracy": tot[1] / n}


def build_parent_stage(parent: Architecture, tensors, dtype: torch.dtype):
    """This rank's share of the parent as a Megatron GPTModel: its pipeline stage's layers (the
    embedding on the first stage, final norm + head on the last), its TP slice of each, read
    lazily from the checkpoint reader `tensors` (only those layers, only those rows / columns)."""
    from megapuzzle.model.config import ModelOptions
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import load_canonical_into_model

    # no random init: every weight is loaded right after (CPU init builds each full tensor first)
    model = build_gpt_model(parent, params_dtype=dtype, options=ModelOptions(perform_initialization=False))
    load_canonical_into_model(model, tensors, parent)
    return model


def agree_on_done(mine: list[BlockRef], done: dict[str, Any], device) -> dict[str, Any]:
    """Keep only the blocks every rank of this pipeline (TP x PP) found finished: their schedules
    must be the same, and a state file can be written between two ranks' reads."""
    from megatron.core import parallel_state as ps

    if ps.get_model_parallel_group() is None or dist.get_world_size(ps.get_model_parallel_group()) == 1 or not mine:
        return done
    flags = torch.tensor([r.key in done for r in mine], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=ps.get_model_parallel_group())
    return {r.key: done[r.key] for r, f in zip(mine, flags.tolist()) if f}


def _score_settings(run: RunDir, cfg: ScoreConfig) -> dict[str, Any]:
    """What a saved score depends on: it is reused only for the same settings, parent and block file."""
    from megapuzzle.checkpoints.canonical import checkpoint_fingerprint

    conf = section_dict(cfg)
    for k in ("cache_gb", *LAYOUT):
        conf.pop(k)  # grouping the batches or splitting the model does not change a score (beyond rounding)
    if cfg.dtype == "float32":
        conf.pop("dtype")  # the default, as before the field existed: earlier scores stay valid
    return {"config": conf, "data": str(run.heldout_data), "naive": False,  # kept: scores saved before stay valid
            "parent": checkpoint_fingerprint(run.parent)}


def _saved_scores(run: RunDir, settings: dict, entries: dict, keys: set[str] | None = None) -> dict[str, Any]:
    """Finished blocks of any rank / shard with these settings and the library's block file (checksum);
    only `keys` when given."""
    done: dict[str, Any] = {}
    for f in sorted((run.state / "score").glob("*.json")):
        saved = json.loads(f.read_text())
        if saved.get("settings") == settings:
            done.update({k: v for k, v in saved["blocks"].items()
                         if (k in keys if keys is not None else k in entries)
                         and v.get("sha256") == entries[k].get("sha256")})
    return done


def _write_scores(run: RunDir, cfg: ScoreConfig, settings: dict, entries: dict, refs: list[BlockRef],
                  batches: list[torch.Tensor], parent_m: dict, wall: float) -> dict[str, Any]:
    """Rank 0: merge every rank's saved scores into RUN/scores.json (all blocks, or a one-line error)."""
    merged = _saved_scores(run, settings, entries)
    missing = [r.key for r in refs if r.key not in merged]
    if missing:
        raise UserError(f"scores for {len(missing)} block(s) missing after scoring (e.g. {missing[0]}); re-run")
    tokens = sum(b[:, 1:].numel() for b in batches)
    result = {"format": FORMAT, "metric_default": "kl", "data": str(run.heldout_data), "tokens": tokens,
              "config": {k: v for k, v in section_dict(cfg).items() if k not in LAYOUT}, "parent": parent_m,
              "blocks": {k: merged[k] for k in sorted(merged)}, "wall_s": wall}
    atomic_write_json(run.scores, result)
    log(f"[score] {len(refs)} blocks on {tokens} held-out tokens in {wall:.1f}s -> {run.scores}")
    return result


class _Stop(Exception):
    pass


def _score_and_save(parent, tensors, model, library, mine: list[BlockRef], batches, cfg: ScoreConfig, info,
                    done: dict[str, Any], entries: dict, settings: dict, state: Path, progress: bool) -> int | None:
    """Score this rank's blocks not yet `done`, saving the rank's state file after each block; the
    number of blocks when `faults.kill_after("score", n)` (tests) stopped it, as after a kill, else None."""
    from tqdm import tqdm

    counter = {"n": 0}

    def on_done(key, res):  # every rank of the pipeline, at the same point; the metrics on the last stage
        if res is not None:
            done[key] = {**res, "sha256": entries[key].get("sha256")}
            if info.tp_rank == 0:  # one writer per pipeline: its last stage's TP rank 0
                atomic_write_json(state, {"settings": settings, "blocks": done})
        counter["n"] += 1
        if faults.reached("score", counter["n"]):
            raise _Stop

    bar = tqdm(total=len(mine), initial=sum(r.key in done for r in mine), desc="score", unit="block",
               disable=not (progress and info.rank == 0))
    try:
        score_blocks(parent, tensors, model, library, mine, batches, cfg, info.tp_size, dict(done), on_done,
                     progress=bar)
    except _Stop:
        if info.tp_size * info.pp_size > 1:  # as after a kill: nothing of this pipeline still in flight
            from megatron.core import parallel_state as ps

            dist.barrier(group=ps.get_model_parallel_group())
        return counter["n"]
    finally:
        bar.close()
    return None


def run_score(run_dir: str | Path, cfg: ScoreConfig, *, tp: int | None = None, pp: int | None = None,
              progress: bool = True, shard: tuple[int, int] = (0, 1)
              ) -> dict[str, Any]:
    """Score this rank's share of the library (see the module docstring); rank 0 returns (and
    writes) scores.json's content, the other ranks {}. tp / pp: None = score.tensor_parallel /
    score.pipeline_parallel."""

    from megapuzzle.checkpoints.canonical import load_checkpoint, require_parent
    from megapuzzle.library import BlockLibrary
    from megapuzzle.model.config import ModelConfigError, stage_layer_ranges
    from megapuzzle.runtime.distributed import DistributedError, init_distributed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(run_dir)
    tp = cfg.tensor_parallel if tp is None else tp
    pp = cfg.pipeline_parallel if pp is None else pp
    try:
        info = init_distributed(tp=tp, pp=pp)
    except DistributedError as e:
        raise UserError(f"score (tensor_parallel={tp}, pipeline_parallel={pp}): {e}") from None
    from megapuzzle.runtime.dtypes import resolve_dtype

    dtype = resolve_dtype(cfg.dtype)
    parent, tensors, _ = load_checkpoint(require_parent(run), dtype=dtype)  # lazy: a layer's tensors at a time
    try:
        stage_layer_ranges(parent.num_layers, pp)
    except ModelConfigError as e:
        raise UserError(f"score.pipeline_parallel={pp}: {e}") from None
    library = BlockLibrary(run.library)
    refs = library_blocks(parent, library)
    if not refs:
        raise UserError(f"{run.library} holds no blocks; run `megapuzzle bld` first")
    shard_i, shards = shard
    if not 0 <= shard_i < shards:
        raise UserError(f"--shard {shard_i}/{shards}: need 0 <= I < N")
    # worker w of W: the DP ranks of shard I are workers I*dp .. I*dp+dp-1
    workers, me = shards * info.dp_size, shard_i * info.dp_size + info.dp_rank
    mine = [r for i, r in enumerate(refs) if i % workers == me]
    model = build_parent_stage(parent, tensors, dtype)
    batches = heldout_batches(run, cfg)
    per_batch, per_group = cache_plan(parent, cfg, dtype, len(batches), pp)
    if per_group < len(batches) and info.rank == 0:
        log(f"[score] parent activations cost {per_batch / (1 << 30):.2f} GiB per batch"
            f"{' on the costliest pipeline stage' if pp > 1 else ''}; scoring {len(batches)} "
            f"batches in groups of {per_group} (score.cache_gb={cfg.cache_gb})")
    name = f"rank{info.rank:03d}.json" if shards == 1 else f"shard{shard_i:03d}of{shards:03d}_rank{info.rank:03d}.json"
    state = run.state / "score" / name
    settings = _score_settings(run, cfg)
    entries = library.entries()
    done = _saved_scores(run, settings, entries, {r.key for r in mine})
    done = agree_on_done(mine, done, info.device)
    t0 = time.perf_counter()
    stopped = _score_and_save(parent, tensors, model, library, mine, batches, cfg, info, done, entries,
                              settings, state, progress)
    if stopped is not None:
        return {"stopped_after": stopped}
    wall = time.perf_counter() - t0
    if info.world_size > 1:
        torch.distributed.barrier()
    result: dict[str, Any] = {}
    # under TP / PP the parent's forward is collective: every rank runs it, rank 0 keeps it
    parent_m = parent_metrics(model, batches, cfg.top_k) if shards == 1 else None
    if shards > 1:
        if info.rank == 0:
            log(f"[score] shard {shard_i}/{shards}: {len(mine)} block(s) in {wall:.1f}s -> {state.parent}")
    elif info.rank == 0:
        result = _write_scores(run, cfg, settings, entries, refs, batches, parent_m, wall)
    return result


def scores_table(scores: dict[str, Any]) -> str:
    rows = ["| block | KL | LM loss | top-1 agree | top-k overlap |", "|---|---:|---:|---:|---:|"]
    for key, b in scores["blocks"].items():
        rows.append(f"| {key} | {b['kl']:.4f} | {b['lm_loss']:.4f} | {b['top1']:.3f} | {b['topk']:.3f} |")
    return "\n".join(rows)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="run directory (parent/, library/, data/heldout)")
    p.add_argument("--config", help="YAML with a score: section (defaults otherwise)")
    p.add_argument("--tp", type=int, default=None, help="override score.tensor_parallel")
    p.add_argument("--pp", type=int, default=None, help="override score.pipeline_parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="score only blocks I, I+N, I+2N, ... (a SLURM array task); a later run without it merges")


def run_cli(args: argparse.Namespace) -> int:
    cfg = section(load_config(args.config) if args.config else {}, "score", ScoreConfig)
    i, _, n = args.shard.partition("/")
    if not (i.isdigit() and n.isdigit()):
        raise UserError(f"--shard {args.shard!r}: expected I/N, e.g. 0/4")
    res = run_score(args.run_dir, cfg, tp=args.tp, pp=args.pp, progress=not args.no_progress,
                    shard=(int(i), int(n)))
    if res:
        print(scores_table(res))
    return 0
