"""`megapuzzle train-parent`: the embedded parent, a small Llama trained on the Python stdlib.

    megapuzzle train-parent --out runs/parent                      # default flavour, ~8 min on 2 cores
    megapuzzle train-parent --out /tmp/p --flavour debug           # seconds; what the tests use
    torchrun --nproc-per-node 2 -m megapuzzle.cli train-parent --out runs/parent   # data parallel

Every later stage and the README demo start from this parent, so no model is downloaded.
Steps: sentencepiece tokenizer on the corpus' train split -> indexed datasets (train, held-out)
-> Megatron-core GPTModel pre-training (AdamW, warmup + cosine, grad clipping, checkpoints every
N steps, resumable after a kill with the same data order) -> held-out loss vs the corpus'
unigram entropy -> a HF Llama directory and a megapuzzle checkpoint.

Output directory:
    OUT/tokenizer/  OUT/data/{train,heldout}.{bin,idx,json}  OUT/train_state/  OUT/tb/
    OUT/hf/ (HF Llama dir)  OUT/checkpoint/ (megapuzzle checkpoint)  OUT/result.json
"""

from __future__ import annotations

import logging
import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from megapuzzle.config.parent import ParentConfig  # noqa: F401 (the stage's config)
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json

log = logging.getLogger(__name__).info


FLAVOURS = {
    "default": ParentConfig(),
    # what the tests and the SLURM CI chain use: trains in seconds, same code path
    "debug": ParentConfig(vocab_size=512, hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                          intermediate_size=256, seq_len=64, batch_size=8, steps=30, lr=3e-3, min_lr=3e-4,
                          warmup_steps=5, checkpoint_every=10, log_every=5, eval_batches=4, max_files=40),
    # debug at head dim 32 and FFN 512: the smallest parent vLLM's CPU kernels run (head dims >= 32)
    # whose FFN leaves a 256 variant under the vllm search-space preset; the serving tests use it
    "debug-vllm": ParentConfig(vocab_size=512, hidden_size=128, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                               intermediate_size=512, seq_len=64, batch_size=8, steps=30, lr=3e-3, min_lr=3e-4,
                               warmup_steps=5, checkpoint_every=10, log_every=5, eval_batches=4, max_files=40),
}


def corpus_files(corpus: str, split: str) -> list[Path]:
    """The text files of one split of `corpus` ("stdlib" or a directory), sorted."""
    from megapuzzle.data.corpus import is_heldout, stdlib_files
    from megapuzzle.data.datasets import TEXT_SUFFIXES

    if corpus == "stdlib":
        return stdlib_files(split)
    root = Path(corpus)
    if not root.is_dir():
        raise UserError(f"parent corpus {corpus!r} is neither 'stdlib' nor a directory (for the Python docs: "
                        f"apt-get install -y python3-doc)")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"{root}: no {'/'.join(TEXT_SUFFIXES)} files")
    return [f for f in files if split == "all" or is_heldout(f.relative_to(root).as_posix()) == (split == "heldout")]


def _corpus_texts(split: str, max_files: int, corpus: str = "stdlib"):
    files = corpus_files(corpus, split)
    if max_files:
        files = files[:max_files] if split == "train" else files[: max(2, max_files // 10)]
    for f in files:
        text = f.read_text(encoding="utf-8")
        if text.strip():
            yield text


def prepare_tokenizer_and_data(cfg: ParentConfig, out: Path) -> None:
    """Tokenizer + indexed datasets; skipped when already there (their files are atomic)."""
    from megapuzzle.data.datasets import write_indexed_dataset
    from megapuzzle.data.tokenizer import load_tokenizer, train_sentencepiece

    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.model").is_file():
        t0 = time.perf_counter()
        train_sentencepiece(_corpus_texts("train", cfg.max_files, cfg.corpus), tok_dir, vocab_size=cfg.vocab_size, seed=cfg.seed)
        log(f"[train-parent] sentencepiece BPE {cfg.vocab_size} trained in {time.perf_counter() - t0:.1f}s")
    tok = load_tokenizer(tok_dir)
    for split in ("train", "heldout"):
        prefix = out / "data" / split
        if (prefix.with_suffix(".idx")).is_file() and (prefix.with_suffix(".bin")).is_file():
            continue
        t0 = time.perf_counter()
        docs = (tok.encode(t) + [tok.eos_id] for t in _corpus_texts(split, cfg.max_files, cfg.corpus))
        stats = write_indexed_dataset(prefix, docs, tok.vocab_size, meta={"split": split, "tokenizer": tok.fingerprint()})
        log(f"[train-parent] {split}: {stats} ({time.perf_counter() - t0:.1f}s)")


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate_lm_loss(model, data, cfg: ParentConfig) -> tuple[float, int]:
    """Mean next-token loss (nats) over held-out windows, and the token count."""
    from megapuzzle.model.forward import forward_logits

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in data.eval_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches or None):
            logits = forward_logits(model, batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     batch[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            n += batch[:, 1:].numel()
    model.train()
    return total / max(n, 1), n


def _finished(out: Path, cfg: ParentConfig) -> dict | None:
    """result.json's content when `out` already holds this parent; a one-line error for another config's."""
    result_file = out / "result.json"
    if not result_file.is_file():
        return None
    res = json.loads(result_file.read_text())
    if {"corpus": "stdlib", **(res.get("config") or {})} == dataclasses.asdict(cfg):  # pre-corpus results
        log(f"[train-parent] {out} is already trained (result.json); nothing to do")
        return res
    raise UserError(f"{out} holds a parent trained with another config; use a new --out or delete {out}")


def _inputs(out: Path, cfg: ParentConfig, info):
    """Rank 0 writes the config, tokenizer and token files; every rank then opens them: (tokenizer, train, heldout)."""
    from megapuzzle.data.datasets import PackedSequenceDataset
    from megapuzzle.data.tokenizer import load_tokenizer

    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
        prepare_tokenizer_and_data(cfg, out)
    if info.world_size > 1:
        torch.distributed.barrier()
    tok = load_tokenizer(out / "tokenizer")
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} ids but vocab_size is {cfg.vocab_size}; delete {out}/tokenizer")
    return (tok, PackedSequenceDataset.from_prefix(out / "data" / "train"),
            PackedSequenceDataset.from_prefix(out / "data" / "heldout"))


def _step_fn(model, opt, train, cfg: ParentConfig, info):
    """One optimizer step on global batch i (this DP rank's rows; grads averaged over DP)."""
    from megapuzzle.train.schedule import set_lr

    dp_group = _dp_group()

    def step(i: int, lr: float) -> dict:
        batch = train.batch(i, cfg.batch_size, cfg.seq_len, cfg.seed, rank=info.dp_rank, world_size=info.dp_size)
        set_lr(opt, lr)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        if info.dp_size > 1:
            for p in model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, group=dp_group)
                    p.grad /= info.dp_size
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"lm loss": loss.item(), "grad norm": gnorm}

    return step


def _write_parent(out: Path, cfg: ParentConfig, arch, canonical, heldout, heldout_loss: float, n_eval: int,
                  logger, last_loss: float, start: int, t_start: float) -> dict:
    """Rank 0: the canonical checkpoint, the HF Llama dir, then result.json (last: its presence means done)."""
    from megapuzzle.checkpoints.canonical import save_checkpoint
    from megapuzzle.checkpoints.hf_io import write_llama_dir
    from megapuzzle.data.datasets import unigram_entropy

    h_uni = unigram_entropy(heldout.tokens)
    logger.scalar("heldout/lm_loss", heldout_loss, cfg.steps)
    logger.close()
    save_checkpoint(out / "checkpoint", arch, canonical, tokenizer_dir=out / "tokenizer", force=True,
                    meta={"source": "train-parent", "steps": cfg.steps, "heldout_loss": heldout_loss})
    write_llama_dir(arch, canonical, out / "hf", tokenizer_dir=out / "tokenizer", force=True, dtype=torch.float32)
    result = {
        "config": dataclasses.asdict(cfg),
        "num_params": arch.num_params(),
        "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "final_train_loss": last_loss,
        "heldout_loss": heldout_loss,
        "heldout_tokens": n_eval,
        "heldout_unigram_entropy": h_uni,
        "heldout_perplexity": math.exp(heldout_loss),
        "wall_seconds_this_run": time.perf_counter() - t_start,
        "resumed_from_step": start,
    }
    atomic_write_json(out / "result.json", result)
    log(f"[train-parent] held-out loss {heldout_loss:.4f} nats/token vs unigram entropy {h_uni:.4f} "
        f"({n_eval} tokens); {arch.num_params() / 1e6:.2f}M params; "
        f"{time.perf_counter() - t_start:.0f}s; HF Llama dir {out / 'hf'}")
    return result


def train_parent(out: str | Path, cfg: ParentConfig = FLAVOURS["default"], *, threads: int | None = None) -> dict:
    """Run (or resume) the whole recipe; returns result.json's content."""
    from megapuzzle.model.gpt import build_gpt_model
    from megapuzzle.model.weights import gather_canonical_from_model
    from megapuzzle.runtime.distributed import init_distributed
    from megapuzzle.train.loop import TrainLoop
    from megapuzzle.train.schedule import LRSchedule
    from megapuzzle.train.state import load_train_state, save_train_state
    from megapuzzle.train.train_logger import TrainLogger

    out = Path(out)
    done = _finished(out, cfg)
    if done is not None:
        return done
    if threads:
        torch.set_num_threads(threads)
    info = init_distributed(seed=cfg.seed)
    main = info.rank == 0
    t_start = time.perf_counter()
    tok, train, heldout = _inputs(out, cfg, info)

    arch = cfg.architecture(bos=tok.bos_id, eos=tok.eos_id)
    model = build_gpt_model(arch)
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = LRSchedule(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr)
    # each rank keeps its own shard state (TP/PP slices) under its own name
    state_dir = out / "train_state" / f"rank{info.rank:03d}"
    resumed = load_train_state(state_dir, params, opt)
    start = resumed["step"] if resumed else 0
    if resumed and main:
        log(f"[train-parent] resumed from step {start}")
    logger = TrainLogger(out / "tb" if main else None, cfg.steps, enabled=main)
    model.train()
    loop = TrainLoop("train-parent", cfg.steps, sched, logger, cfg.log_every, cfg.checkpoint_every,
                     cfg.batch_size * cfg.seq_len)
    stopped = loop.run(start, _step_fn(model, opt, train, cfg, info),
                       save=lambda n: save_train_state(state_dir, n, params, opt, {"loss": loop.last["lm loss"]}))
    if stopped is not None:
        return {"stopped_at": stopped}  # tests: behave like a kill (no save)
    heldout_loss, n_eval = evaluate_lm_loss(model, heldout, cfg)
    canonical = gather_canonical_from_model(model, arch)
    if not main:
        return {}
    return _write_parent(out, cfg, arch, canonical, heldout, heldout_loss, n_eval, logger,
                         loop.last.get("lm loss", float("nan")), start, t_start)


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (resumes if it holds a partial run)")
    p.add_argument("--flavour", choices=sorted(FLAVOURS), default="default", help="size preset")
    p.add_argument("--steps", type=int, help="override the flavour's optimizer steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--corpus", default="stdlib", help="'stdlib' (default) or a directory of text files, e.g. "
                                                      "/usr/share/doc/python3-doc/html/_sources (apt python3-doc)")


def run_cli(args: argparse.Namespace) -> int:
    cfg = FLAVOURS[args.flavour]
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.corpus != "stdlib":
        cfg = dataclasses.replace(cfg, corpus=args.corpus)
    train_parent(args.out, cfg, threads=args.threads)
    return 0
