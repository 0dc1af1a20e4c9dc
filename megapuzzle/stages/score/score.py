"""`megapuzzle score`: replace-1-block scoring of every library block.

    megapuzzle score --config examples/cpu_demo.yaml --run-dir runs/demo
    torchrun --nproc-per-node 8 -m megapuzzle.cli score --config ... --run-dir ...   # blocks split over ranks

For every block of RUN/library: the parent with only that block swapped in, on held-out
tokens, against the parent's own next-token distribution: KL(parent || child) (the default
score), LM loss, top-1 agreement and top-k overlap. Results in RUN/scores.json.

Why it is fast (docs/design.md, "Scoring dominates naive pipelines"): the parent's residual stream at
every layer input and its log-probabilities are computed once per batch and kept; a block at
layer l then runs only its own layer and the parent's layers l+1..L-1 plus the head, and all
candidates of one layer go through those shared layers stacked into one batch.
`naive=True` (benchmarks only) re-runs the whole model per candidate instead. A fused-run block
(`BlockRef.last`, megapuzzle.fusion_blocks.score_runs) runs on the stream entering its first
layer and continues after its last.

Resumable: each rank appends finished blocks to RUN/state/score/rank{r}.json (atomic); a
restart skips them. Rank 0 merges all ranks' files into scores.json.

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
from typing import Any

import torch
import torch.nn.functional as F

from megapuzzle.train import faults
from megapuzzle.config.score import ScoreConfig  # noqa: F401 (the stage's config)
from megapuzzle.arch import Architecture, AttentionVariant, FFNVariant, LayerArch
from megapuzzle.config import RunDir, load_config, section, section_dict
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json
from megapuzzle.metrics import kl_per_token, nll_per_token, top1_matches, topk_overlap

log = logging.getLogger(__name__).info

FORMAT = "megapuzzle-scores/1"


@dataclass
class BlockRef:
    key: str
    layer: int
    la: LayerArch  # the whole layer the block makes (its own subblock + the parent's other one)
    last: int | None = None
    """A fused-run block (megapuzzle.fusion_blocks): it replaces layers layer..last; its FFN is
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


class ParentRunner:
    """The parent GPTModel, run layer by layer so a pass can start at any layer."""

    def __init__(self, model):
        from megapuzzle.model.gpt import unwrap_model

        self.m = unwrap_model(model)
        self.m.eval()
        self.dtype = self.m.config.params_dtype
        self.layers = {l.layer_number - 1: l for l in self.m.decoder.layers}

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor):
        pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        h = self.m.embedding(input_ids=tokens, position_ids=pos)  # [s, b, h]
        rot = None
        if getattr(self.m, "rotary_pos_emb", None) is not None:
            rot = self.m.rotary_pos_emb(self.m.rotary_pos_emb.get_rotary_seq_len(None, self.m.decoder, h,
                                                                                 self.m.config, None))
        return h, rot

    @torch.no_grad()
    def run_from(self, h: torch.Tensor, start: int, rot, first_layer=None) -> torch.Tensor:
        """Layers start..L-1 (layer `start` replaced by `first_layer` when given), final norm,
        head: full-vocab log-probs [b, s, V] (gathered over TP)."""
        from megapuzzle.model.forward import gather_vocab

        for i in range(start, len(self.layers)):
            layer = first_layer if (i == start and first_layer is not None) else self.layers[i]
            h, _ = layer(hidden_states=h, attention_mask=None, rotary_pos_emb=rot)
        h = self.m.decoder.final_layernorm(h)
        w = self.m.shared_embedding_or_output_weight() if self.m.share_embeddings_and_output_weights else None
        logits, _ = self.m.output_layer(h, weight=w)
        return F.log_softmax(gather_vocab(logits.transpose(0, 1).contiguous()).float(), dim=-1)


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
    """What every candidate of every layer shares for one batch: computed once."""

    targets: torch.Tensor
    streams: list[torch.Tensor]  # residual stream entering each layer, [s, b, h]
    rot: Any
    log_probs: torch.Tensor      # the parent's [b, s, V]


@torch.no_grad()
def parent_pass(runner: ParentRunner, tokens: torch.Tensor) -> ParentPass:
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    h, rot = runner.embed(inp)
    streams = []
    for i in range(len(runner.layers)):
        streams.append(h)
        h, _ = runner.layers[i](hidden_states=h, attention_mask=None, rotary_pos_emb=rot)
    return ParentPass(tgt, streams, rot, runner.run_from(h, len(runner.layers), rot))


def cache_plan(arch: Architecture, cfg: ScoreConfig, dtype: torch.dtype, n_batches: int) -> tuple[int, int]:
    """(bytes one batch's kept parent pass costs, batches per group under score.cache_gb). At
    least one batch per group: a batch bigger than the budget is still scored, alone."""
    tokens = cfg.batch_size * cfg.seq_len
    per_batch = tokens * ((arch.num_layers + 1) * arch.hidden_size * torch.empty((), dtype=dtype).element_size()
                          + arch.vocab_size * 4)
    return per_batch, max(1, min(n_batches, int(cfg.cache_gb * (1 << 30)) // per_batch))


@torch.no_grad()
def score_blocks(parent, parent_tensors, model, library, refs: list[BlockRef], batches: list[torch.Tensor],
                 cfg: ScoreConfig, tp: int, done: dict[str, Any], on_done=None, naive: bool = False,
                 progress=None) -> dict[str, Any]:
    """Score `refs` (skipping keys in `done`); returns {key: metrics}.

    Default: one parent pass per batch (streams + log-probs, kept), then per layer the
    candidates' layers run on the kept stream and are stacked along the batch through the
    shared suffix. naive=True: the whole model per candidate per batch (the benchmark's baseline)."""
    runner = ParentRunner(model)
    todo = [r for r in refs if r.key not in done]
    by_layer: dict[tuple[int, int], list[BlockRef]] = {}  # by (first, last) layer: one shared suffix each
    for r in todo:
        by_layer.setdefault((r.layer, r.end), []).append(r)
    results = dict(done)
    per_pass = 1 if naive else cfg.candidates_per_pass
    # Parent passes are kept for one group of batches at a time (score.cache_gb); every block
    # still adds up its batches in order, so the scores do not depend on the grouping.
    per_group = len(batches) if naive else cache_plan(parent, cfg, runner.dtype, len(batches))[1]
    sums = {r.key: dict.fromkeys(("kl", "lm_loss", "top1", "topk"), 0.0) for r in todo}
    n_tok = 0
    for g0 in range(0, len(batches), per_group):
        group_batches = batches[g0:g0 + per_group]
        last = g0 + per_group >= len(batches)
        passes = None if naive else [parent_pass(runner, t) for t in group_batches]
        n_tok += sum(t[:, 1:].numel() for t in group_batches)
        for layer, end in sorted(by_layer):
            group = by_layer[layer, end]
            for c0 in range(0, len(group), per_pass):
                chunk = group[c0:c0 + per_pass]
                modules = [block_layer_module(parent, r, library, parent_tensors, tp, runner.dtype) for r in chunk]
                for bi, tokens in enumerate(group_batches):
                    if naive:
                        pp = parent_pass(runner, tokens)  # the parent again, every candidate
                        h, _ = runner.embed(tokens[:, :-1])
                        for i in range(layer):
                            h, _ = runner.layers[i](hidden_states=h, attention_mask=None, rotary_pos_emb=pp.rot)
                        outs = [runner.run_from(h, layer, pp.rot, first_layer=modules[0]) if end == layer else
                                runner.run_from(modules[0](hidden_states=h, attention_mask=None,
                                                           rotary_pos_emb=pp.rot)[0], end + 1, pp.rot)]
                    else:
                        pp = passes[bi]
                        ys = [mod(hidden_states=pp.streams[layer], attention_mask=None, rotary_pos_emb=pp.rot)[0]
                              for mod in modules]
                        lp = runner.run_from(torch.cat(ys, dim=1), end + 1, pp.rot)  # [n*b, s, V]
                        outs = list(lp.split(pp.targets.shape[0], dim=0))
                    for r, lp in zip(chunk, outs):
                        s = sums[r.key]
                        for k, v in _metrics(pp.log_probs, lp, pp.targets, cfg.top_k).items():
                            s[k] += v
                if not last:
                    continue
                for r in chunk:
                    results[r.key] = {"layer": r.layer, "attention": r.la.attention.name, "ffn": r.la.ffn.name,
                                      **{k: v / n_tok for k, v in sums[r.key].items()}}
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
    runner = ParentRunner(model)
    tot, n = {"lm_loss": 0.0, "accuracy": 0.0}, 0
    for tokens in batches:
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        h, rot = runner.embed(inp)
        lp = runner.run_from(h, 0, rot)
        tot["lm_loss"] += nll_per_token(lp, tgt).sum().item()
        tot["accuracy"] += top1_matches(lp, tgt).sum().item()
        n += tgt.numel()
    return {k: v / n for k, v in tot.items()}


def run_score(run_dir: str | Path, cfg: ScoreConfig, *, tp: int = 1, progress: bool = True,
              naive: bool = False, shard: tuple[int, int] = (0, 1)
              ) -> dict[str, Any]:
    from tqdm import tqdm

    from megapuzzle.checkpoints.canonical import checkpoint_fingerprint, load_checkpoint, require_parent
    from megapuzzle.library import BlockLibrary
    from megapuzzle.model.config import ModelOptions
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import load_canonical_into_model
    from megapuzzle.runtime.distributed import init_distributed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(run_dir)
    info = init_distributed(tp=tp)
    from megapuzzle.runtime.dtypes import resolve_dtype

    dtype = resolve_dtype(cfg.dtype)
    parent, tensors, _ = load_checkpoint(require_parent(run), dtype=dtype)  # lazy: a layer's tensors at a time
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
    # no random init: every weight is loaded right after (CPU init builds each full tensor first)
    model = build_gpt_model(parent, params_dtype=dtype, options=ModelOptions(perform_initialization=False))
    load_canonical_into_model(model, tensors, parent)
    batches = heldout_batches(run, cfg)
    per_batch, per_group = cache_plan(parent, cfg, dtype, len(batches))
    if per_group < len(batches) and info.rank == 0 and not naive:
        log(f"[score] parent activations cost {per_batch / (1 << 30):.2f} GiB per batch; scoring {len(batches)} "
            f"batches in groups of {per_group} (score.cache_gb={cfg.cache_gb})")
    name = f"rank{info.rank:03d}.json" if shards == 1 else f"shard{shard_i:03d}of{shards:03d}_rank{info.rank:03d}.json"
    state = run.state / "score" / name
    # a saved score is reused only for the same settings, parent and block file (checksum)
    conf = section_dict(cfg)
    conf.pop("cache_gb")  # grouping the batches does not change a score
    if cfg.dtype == "float32":
        conf.pop("dtype")  # the default, as before the field existed: earlier scores stay valid
    settings = {"config": conf, "data": str(run.heldout_data), "naive": naive,
                "parent": checkpoint_fingerprint(run.parent)}
    entries = library.entries()
    done: dict[str, Any] = {}
    keys = {r.key for r in mine}
    for f in sorted((run.state / "score").glob("*.json")):  # any rank's / shard's finished blocks count
        saved = json.loads(f.read_text())
        if saved.get("settings") == settings:
            done.update({k: v for k, v in saved["blocks"].items()
                         if k in keys and v.get("sha256") == entries[k].get("sha256")})
    t0 = time.perf_counter()
    counter = {"n": 0}

    class _Stop(Exception):
        pass

    def on_done(key, res):
        done[key] = {**res, "sha256": entries[key].get("sha256")}
        if info.tp_rank == 0:
            atomic_write_json(state, {"settings": settings, "blocks": done})
        counter["n"] += 1
        if faults.reached("score", counter["n"]):
            raise _Stop

    bar = tqdm(total=len(mine), initial=sum(r.key in done for r in mine), desc="score", unit="block",
               disable=not (progress and info.rank == 0))
    try:
        score_blocks(parent, tensors, model, library, mine, batches, cfg, tp, dict(done), on_done,
                     naive=naive, progress=bar)
    except _Stop:
        return {"stopped_after": counter["n"]}
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if info.world_size > 1:
        torch.distributed.barrier()
    result: dict[str, Any] = {}
    # under TP the parent's forward is collective: every rank runs it, rank 0 keeps it
    parent_m = parent_metrics(model, batches, cfg.top_k) if shards == 1 else None
    if shards > 1:
        if info.rank == 0:
            log(f"[score] shard {shard_i}/{shards}: {len(mine)} block(s) in {wall:.1f}s -> {state.parent}")
    elif info.rank == 0:
        merged: dict[str, Any] = {}
        for f in sorted((run.state / "score").glob("*.json")):
            saved = json.loads(f.read_text())
            if saved.get("settings") == settings:
                merged.update({k: v for k, v in saved["blocks"].items()
                               if k in entries and v.get("sha256") == entries[k].get("sha256")})
        missing = [r.key for r in refs if r.key not in merged]
        if missing:
            raise UserError(f"scores for {len(missing)} block(s) missing after scoring (e.g. {missing[0]}); re-run")
        tokens = sum(b[:, 1:].numel() for b in batches)
        result = {"format": FORMAT, "metric_default": "kl", "data": str(run.heldout_data), "tokens": tokens,
                  "config": section_dict(cfg), "parent": parent_m,
                  "blocks": {k: merged[k] for k in sorted(merged)}, "wall_s": wall, "naive": naive}
        atomic_write_json(run.scores, result)
        log(f"[score] {len(refs)} blocks on {tokens} held-out tokens in {wall:.1f}s -> {run.scores}")
    return result


def scores_table(scores: dict[str, Any]) -> str:
    rows = ["| block | KL | LM loss | top-1 agree | top-k overlap |", "|---|---:|---:|---:|---:|"]
    for key, b in scores["blocks"].items():
        rows.append(f"| {key} | {b['kl']:.4f} | {b['lm_loss']:.4f} | {b['top1']:.3f} | {b['topk']:.3f} |")
    return "\n".join(rows)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="run directory (parent/, library/, data/heldout)")
    p.add_argument("--config", help="YAML with a score: section (defaults otherwise)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="score only blocks I, I+N, I+2N, ... (a SLURM array task); a later run without it merges")


def run_cli(args: argparse.Namespace) -> int:
    cfg = section(load_config(args.config) if args.config else {}, "score", ScoreConfig)
    i, _, n = args.shard.partition("/")
    if not (i.isdigit() and n.isdigit()):
        raise UserError(f"--shard {args.shard!r}: expected I/N, e.g. 0/4")
    res = run_score(args.run_dir, cfg, tp=args.tp, progress=not args.no_progress, shard=(int(i), int(n)))
    if res:
        print(scores_table(res))
    return 0
