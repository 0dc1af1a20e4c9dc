"""`megapuzzle evaluate`: the child next to its parent, quality and measured speed.

    megapuzzle evaluate --config CFG --run-dir RUN        # -> RUN/eval.json, RUN/report.md, RUN/pareto.png

The child is RUN/gkd/checkpoint when GKD ran, else the realized RUN/child (`--child` picks
another checkpoint). For parent and child, side by side:

* quality on RUN/data/heldout: LM loss, next-token top-1 accuracy, KL(parent || model) and
  top-1 agreement with the parent; retention = child accuracy / parent accuracy (the paper's
  "98.4%"). When GKD ran, the realized child before healing is scored too.
* speed: end-to-end greedy generation (prefill `prefill_len` tokens, then `gen_len` new ones,
  KV cache on) at `batch_size` on the cost runtime (megapuzzle.costs.timing), timed like
  costs.json was measured (threads, clock, dtype), parent and child alternating, medians.
* memory: parameter bytes + KV cache for batch_size x (prefill_len + gen_len) tokens.
* predicted vs measured speedup: costs.json's prediction for the same scenario
  (costs.table.predict_generation_time) and the MIP's own recorded prediction.

The scenario defaults to the MIP's (mip/solutions.json: its best batch size, prefill_len,
gen_len), so the measured speedup checks the MIP's promise like for like.

Parallel (evaluate.tensor_parallel / pipeline_parallel, or --tp / --pp; world = TP x PP x DP):

    torchrun --nproc-per-node 8 -m megapuzzle.cli evaluate --config CFG --run-dir RUN --tp 1 --pp 8
    megapuzzle run CFG          # launches exactly that itself when evaluate's TP x PP > 1

Parent and child are built on the same TP x PP layout; each rank builds only its pipeline stage's
layers and reads only its stage's tensors, and of those its TP rows / columns, from the lazy
checkpoint readers, so no rank holds a whole model. Quality: the held-out batches run through
Megatron's forward-only pipeline schedule (one sequence per micro-batch); only the last stage
gets the logits (gathered over the vocabulary before the fp32 log-softmax), holds one batch's
log-probs of the parent and of one other model at a time, and sums the metrics, which then go to
every rank; DP replicas split the batches. The metrics equal TP = PP = 1's up to fp32
reduction order. Timing: the same layout, for parent and child alike (a PP model generates with
the hidden state passed stage to stage and the next tokens sent back from the last stage; one
micro-batch, so the stages run in turn): the measured speedup compares the two models on one
deployment layout, which at PP > 1 is not the single-GPU deployment the MIP's costs describe
(eval.json records `tensor_parallel` / `pipeline_parallel`). vLLM timing (evaluate.vllm) needs
TP = PP = 1 and is refused otherwise. Rank 0 writes the outputs.
"""

from __future__ import annotations

import logging
import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from megapuzzle.config.evaluate import EvaluateConfig  # noqa: F401 (the stage's config)
from megapuzzle.arch import Architecture
from megapuzzle.config import RunDir, load_config, section, section_dict
from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json, atomic_write_text, save_figure_atomic
from megapuzzle.metrics import kl_per_token, nll_per_token, top1_matches

log = logging.getLogger(__name__).info


# ----------------------------------------------------------------------------- quality

def build_model(arch: Architecture, tensors, dtype: torch.dtype = torch.float32):
    """This rank's share of the model `arch` with `tensors` (lazily read) in `dtype`, in eval mode."""
    from megapuzzle.model import ModelOptions, build_gpt_model, load_canonical_into_model

    m = build_gpt_model(arch, params_dtype=dtype, options=ModelOptions(perform_initialization=False))
    load_canonical_into_model(m, tensors, arch)
    return m.eval()


@torch.no_grad()
def quality_metrics(parent, models: dict[str, Any], batches) -> dict[str, dict[str, float]]:
    """{name: lm_loss, accuracy, kl_to_parent, top1_agreement, tokens} on the same batches.
    The parent's log-probs are computed once per batch and every model compares against them;
    a model that IS the parent gets exactly KL 0 and agreement 1.

    Every model runs through megapuzzle.model.runner (the layer-by-layer runner scoring uses);
    under PP the stream goes stage to stage and only the last stage gets the (TP-gathered) fp32
    log-probs and sums the metrics; the sums go to every rank at the end, so no rank holds more
    than one batch's log-probs of the parent and one other model. Under DP (world > TP x PP) each
    replica takes every DP-th batch and the sums are added up."""
    from megatron.core import parallel_state as ps

    from megapuzzle.model.runner import StageRunner

    dp = ps.get_data_parallel_world_size()
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    runners = {name: StageRunner(m) for name, m in models.items()}
    parent_runner = next((r for name, r in runners.items() if models[name] is parent), None) or StageRunner(parent)
    sums = torch.zeros(len(models), 4, dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    for batch in list(batches)[ps.get_data_parallel_rank()::dp]:
        inp, tgt = batch[:, :-1], batch[:, 1:]
        tokens += tgt.numel()
        lp = parent_runner.log_probs(inp)  # [b, s, V] fp32 on the last stage, None elsewhere
        tgt = tgt.to(lp.device) if last else tgt
        p_top = lp.argmax(-1) if last else None  # token ids: top1_matches compares against them
        for i, (name, m) in enumerate(models.items()):
            lq = lp if m is parent else runners[name].log_probs(inp)
            if last:
                sums[i] += torch.stack([
                    nll_per_token(lq, tgt).sum(), top1_matches(lq, tgt).sum(),
                    kl_per_token(lp, lq).sum(), top1_matches(lq, p_top).sum()]).double().cpu()
            del lq
        del lp
    sums, tokens = _reduce_sums(sums, tokens)
    if not tokens:
        raise UserError("no held-out batch to evaluate on; lower evaluate.seq_len or add held-out data")
    return {n: {"lm_loss": s[0].item() / tokens, "accuracy": s[1].item() / tokens,
                "kl_to_parent": s[2].item() / tokens, "top1_agreement": s[3].item() / tokens, "tokens": tokens}
            for n, s in zip(models, sums)}


def _reduce_sums(sums: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The last pipeline stage's metric sums on every stage, added up over the DP replicas."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    flat = torch.cat([sums.flatten(), tokens.reshape(1)]).to(dev)  # NCCL reduces device tensors
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(flat, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(flat, group=ps.get_data_parallel_group())
    flat = flat.cpu()
    return flat[:-1].reshape(sums.shape), int(flat[-1].item())


# ----------------------------------------------------------------------------- speed + memory

def scenario(run: RunDir, cfg: EvaluateConfig) -> dict[str, Any]:
    """Timing scenario: the config's values, else the MIP's, else 1 x (128 + 64)."""
    sols = _solutions(run)
    mcfg = (sols or {}).get("config", {})
    mip = {"batch_size": (sols or {}).get("best_batch_size"), "prefill_len": mcfg.get("prefill_len"),
           "gen_len": mcfg.get("gen_len")}
    out, src = {}, {}
    for k, default in (("batch_size", 1), ("prefill_len", 128), ("gen_len", 64)):
        v = getattr(cfg, k)
        out[k], src[k] = (v, "config") if v is not None else (mip[k], "mip") if mip[k] else (default, "default")
    out["source"] = src
    return out


def _solutions(run: RunDir) -> dict | None:
    f = run.mip / "solutions.json"
    return json.loads(f.read_text()) if f.is_file() else None


def measure_pair(archs: dict[str, Architecture], tensors: dict[str, Any], sc: dict, cfg: EvaluateConfig,
                 settings: dict) -> dict[str, dict]:
    """Median generation throughput of each model, `rounds` rounds in alternating order."""
    from megapuzzle.costs.timing import measure_model_throughput

    samples: dict[str, list] = {n: [] for n in archs}
    names = list(archs)
    threads0 = torch.get_num_threads()
    try:
        for r in range(cfg.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                res = measure_model_throughput(archs[n], tensors[n], sc["batch_size"], sc["prefill_len"],
                                               sc["gen_len"], repeats=cfg.repeats, warmup=cfg.warmup, **settings)
                samples[n].append(res)
    finally:
        torch.set_num_threads(threads0)  # timing pins threads; leave the process as it was
    out = {}
    for n, res in samples.items():
        # pool every repeat of every round: one disturbed generation on a shared machine moves a
        # median of rounds x repeats samples far less than a median of per-round medians
        pre = [x["prefill_s"] for r in res for x in r.samples]
        dec = [x["decode_s"] for r in res for x in r.samples]
        total = statistics.median(a + b for a, b in zip(pre, dec))
        out[n] = {"tokens_per_s": sc["batch_size"] * sc["gen_len"] / total, "total_s": total,
                  "prefill_s": statistics.median(pre), "decode_s": statistics.median(dec),
                  "timed_generations": len(pre), "_totals": [a + b for a, b in zip(pre, dec)]}
    return out


def paired_speedup(base: dict, other: dict) -> float:
    """Median of base / other generation time over the generations timed side by side."""
    return statistics.median(b / o for b, o in zip(base.pop("_totals"), other.pop("_totals")))


def memory(arch: Architecture, sc: dict, bytes_per_param: int) -> dict[str, int]:
    kv_tok = arch.kv_cache_bytes_per_token(bytes_per_param)
    kv = sc["batch_size"] * (sc["prefill_len"] + sc["gen_len"]) * kv_tok
    p = arch.num_params()
    return {"params": p, "param_bytes": p * bytes_per_param, "kv_bytes_per_token": kv_tok, "kv_cache_bytes": kv,
            "memory_bytes": p * bytes_per_param + kv}


def _chosen_solution(sols: dict | None, child: Architecture, meta: dict) -> tuple[int | None, dict | None]:
    """The MIP candidate this child was realized from (checkpoint meta, else by its layers)."""
    if not sols:
        return None, None
    k = meta.get("solution", (meta.get("child_meta") or {}).get("solution"))
    layers = [{"attention": l.attention.name, "ffn": l.ffn.name} for l in child.layers]
    cands = sols.get("solutions", [])
    if isinstance(k, int) and 0 <= k < len(cands) and cands[k]["layers"] == layers:
        return k, cands[k]
    return next(((i, s) for i, s in enumerate(cands) if s["layers"] == layers), (None, None))


# ----------------------------------------------------------------------------- the stage

def _child_dir(run: RunDir, child: str | Path | None) -> Path:
    """The child to evaluate: `child`, else GKD's checkpoint when it exists, else the realized child."""
    from megapuzzle.checkpoints.canonical import is_checkpoint

    gkd_ckpt = run.gkd / "checkpoint"
    child_dir = Path(child) if child is not None else gkd_ckpt if is_checkpoint(gkd_ckpt) else run.child
    if not is_checkpoint(child_dir):
        raise UserError(f"{child_dir} holds no child checkpoint; run `megapuzzle realize` (and `megapuzzle gkd`) first")
    return child_dir


def _start_ranks(cfg: EvaluateConfig, tp: int, pp: int) -> bool:
    """Join the TP x PP launch (or, TP = PP = 1, set up the timing runtime); True on the writing rank."""
    from megapuzzle.costs.timing import ensure_runtime

    if tp * pp == 1:
        ensure_runtime(None)  # whole models, as the timing runtime serves them
        return torch.distributed.get_rank() == 0  # (a torchrun launch: DP replicas)
    from megapuzzle.runtime import DistributedError, init_distributed

    if cfg.vllm:
        raise UserError(f"evaluate.vllm times whole models in vLLM; run it at tensor_parallel = "
                        f"pipeline_parallel = 1, not {tp} x {pp}")
    try:
        return init_distributed(tp=tp, pp=pp).rank == 0  # each rank builds its share of every model
    except DistributedError as e:
        raise UserError(f"evaluate (tensor_parallel {tp}, pipeline_parallel {pp}): {e}") from None


def _check_split(parent_arch: Architecture, child_arch: Architecture, child_dir: Path, tp: int, pp: int) -> None:
    """One-line errors for a child that is no child of this parent, or models the layout cannot split."""
    if tp * pp > 1:
        from megapuzzle.arch import ArchitectureError
        from megapuzzle.model import ModelConfigError, pipeline_split

        for who, a in (("parent", parent_arch), ("child", child_arch)):
            try:
                a.validate_tensor_parallel(tp)
                pipeline_split(a.num_layers, pp)
            except (ArchitectureError, ModelConfigError) as e:
                raise UserError(f"evaluate --tp {tp} --pp {pp}: the {who} cannot be split: {e}") from None
    if (child_arch.vocab_size, child_arch.hidden_size) != (parent_arch.vocab_size, parent_arch.hidden_size):
        raise UserError(f"{child_dir} does not share the parent's vocabulary / hidden size; it is no child of it")


def _quality(run: RunDir, cfg: EvaluateConfig, dirs: dict[str, Path], heldout) -> dict:
    """Held-out quality of the models in `dirs` (parent first; "child_realized": the realized child
    before GKD healed it). Each model's tensors are read in the quality dtype: a tensor costs its
    own bytes while it loads, not an fp32 copy next to them (exact: fp32 -> dtype is the same cast)."""
    from megapuzzle.checkpoints.canonical import load_checkpoint
    from megapuzzle.costs.timing import resolve_dtype

    qdt = resolve_dtype(cfg.quality_dtype)
    models = {name: build_model(*load_checkpoint(d, dtype=qdt)[:2], qdt) for name, d in dirs.items()}
    batches = list(heldout.eval_batches(cfg.quality_batch_size, cfg.seq_len, max_batches=cfg.eval_batches or None))
    return quality_metrics(models["parent"], models, batches)  # dropped on return: timing builds its own


def timing_settings(costs: dict | None, cfg: EvaluateConfig) -> dict:
    """How to time: as costs.json was measured, with evaluate's own threads / dtype where set."""
    from megapuzzle.costs.table import throughput_settings

    settings = throughput_settings(costs) if costs else {"threads": None, "clock": "wall", "dtype": "auto",
                                                         "fp8": False, "fp8_recipe": "delayed"}
    if cfg.threads is not None:
        settings["threads"] = cfg.threads
    if cfg.dtype is not None:
        settings["dtype"] = cfg.dtype
    return settings


def _vllm_speed(run: RunDir, cfg: EvaluateConfig, archs: dict, sc: dict, costs: dict | None, tp: int, pp: int):
    """The paired speedup in vLLM when asked for (or when costs.json came from vLLM at TP = PP = 1)."""
    engine = (costs or {}).get("engine", "megatron")
    if cfg.vllm or (cfg.vllm is None and engine == "vllm" and tp * pp == 1):
        from megapuzzle.serving.vllm_costs import measure_speedup_vllm

        v = measure_speedup_vllm(archs, sc, rounds=cfg.rounds, warmup=cfg.warmup,
                                 dtype=(costs or {}).get("dtype", "float32"), workdir=run.state / "evaluate_vllm")
        log(f"[evaluate] vLLM {v['vllm']}: parent {v['parent']['tokens_per_s']:.1f}, child "
            f"{v['child']['tokens_per_s']:.1f} tokens/s, speedup {v['speedup']:.2f}x")
        return v
    if engine == "vllm" and tp * pp > 1:
        log(f"[evaluate] costs.json was measured in vLLM, which times whole models: at TP {tp} x PP {pp} the "
            f"speedup is measured in Megatron only")
    return None


def _predicted_tokens_per_s(costs: dict | None, out: dict, archs: dict, sc: dict) -> None:
    """costs.json's predicted tokens/s of each model, where costs.json measured every variant it has."""
    from megapuzzle.costs.table import predict_generation_time

    if not costs:
        return
    for name, arch in archs.items():
        try:
            out[name]["predicted_tokens_per_s"] = predict_generation_time(
                costs, arch, sc["batch_size"], sc["prefill_len"], sc["gen_len"])["tokens_per_s"]
        except KeyError as e:  # a variant costs.json never measured (uniform width at any size)
            log(f"[evaluate] no costs.json prediction for the {name}: {e.args[0]}")


def _speedups(out: dict, measured: float, engine: str, by_engine: dict, sol: dict | None, k: int | None) -> dict:
    """Measured vs predicted speedup; the prediction is checked against the engine the costs came from."""
    predicted = (out["child"]["predicted_tokens_per_s"] / out["parent"]["predicted_tokens_per_s"]
                 if "predicted_tokens_per_s" in out["child"] else None)
    return {"measured": measured, "predicted": predicted, "engine": engine, "measured_by_engine": by_engine,
            "ratio_of_median_tokens_per_s": out["child"]["tokens_per_s"] / out["parent"]["tokens_per_s"],
            "prediction_error_pct": (100 * (predicted / by_engine[engine] - 1)
                                     if predicted and engine in by_engine else None),
            "mip_predicted": sol.get("predicted_speedup") if sol else None,
            "mip_batch_size": sol.get("batch_size") if sol else None, "mip_solution": k}


def run_evaluate(run_dir: str | Path, cfg: EvaluateConfig, *, child: str | Path | None = None,
                 tp: int | None = None, pp: int | None = None) -> dict:
    """Evaluate, write RUN/eval.json, RUN/report.md and RUN/pareto.png; returns eval.json's content.
    `tp` / `pp` (default: evaluate.tensor_parallel / pipeline_parallel): every model split over
    the TP x PP ranks of a torchrun launch (world = TP x PP x DP); rank 0 writes."""
    from megapuzzle.checkpoints.canonical import is_checkpoint, load_checkpoint, require_parent
    from megapuzzle.costs.table import load_costs
    from megapuzzle.costs.timing import resolve_dtype
    from megapuzzle.data.datasets import PackedSequenceDataset

    t0 = time.perf_counter()
    run = RunDir(run_dir)
    child_dir = _child_dir(run, child)
    heldout = PackedSequenceDataset.from_prefix(run.require_data("heldout"))
    tp = cfg.tensor_parallel if tp is None else tp
    pp = cfg.pipeline_parallel if pp is None else pp
    writer = _start_ranks(cfg, tp, pp)
    parent_arch = load_checkpoint(require_parent(run))[0]
    child_arch, _, child_meta = load_checkpoint(child_dir)
    _check_split(parent_arch, child_arch, child_dir, tp, pp)
    gkd_ckpt = run.gkd / "checkpoint"
    dirs = {"parent": require_parent(run), "child": child_dir}
    if child is None and child_dir == gkd_ckpt and is_checkpoint(run.child):
        dirs["child_realized"] = run.child
    quality = _quality(run, cfg, dirs, heldout)
    log(f"[evaluate] quality on {quality['parent']['tokens']} held-out tokens in {time.perf_counter() - t0:.1f}s")

    # speed + memory, timed like costs.json was measured
    costs = load_costs(run.costs) if run.costs.is_file() else None
    settings = timing_settings(costs, cfg)
    sc = scenario(run, cfg)
    archs = {"parent": parent_arch, "child": child_arch}
    # lazy readers, each tensor read straight in the timed models' dtype (as the quality models are)
    tdt = resolve_dtype(settings["dtype"])
    speed = measure_pair(archs, {"parent": load_checkpoint(require_parent(run), dtype=tdt)[1],
                                 "child": load_checkpoint(child_dir, dtype=tdt)[1]}, sc, cfg, settings)
    measured = paired_speedup(speed["parent"], speed["child"])
    engine = (costs or {}).get("engine", "megatron")
    by_engine = {"megatron": measured}
    vllm_speed = _vllm_speed(run, cfg, archs, sc, costs, tp, pp)
    if vllm_speed:
        by_engine["vllm"] = vllm_speed["speedup"]
    bpp = 1 if settings.get("fp8") else torch.empty((), dtype=resolve_dtype(settings["dtype"])).element_size()
    sols = _solutions(run)
    k, sol = _chosen_solution(sols, child_arch, child_meta)
    out: dict[str, Any] = {"config": section_dict(cfg), "scenario": sc, "timing": settings, "bytes_per_param": bpp,
                           "tensor_parallel": tp, "pipeline_parallel": pp, "parent_dir": str(run.parent),
                           "child_dir": str(child_dir)}
    for name, arch in archs.items():
        out[name] = {**quality[name], **memory(arch, sc, bpp), **speed[name]}
    _predicted_tokens_per_s(costs, out, archs, sc)
    if "child_realized" in quality:
        out["child_realized"] = quality["child_realized"]
    if vllm_speed:
        out["vllm"] = {"version": vllm_speed["vllm"], "speedup": vllm_speed["speedup"],
                       **{n: vllm_speed[n] for n in ("parent", "child")}}
    out["speedup"] = _speedups(out, measured, engine, by_engine, sol, k)
    pa = out["parent"]["accuracy"]
    out["quality_retention_pct"] = 100.0 * out["child"]["accuracy"] / pa if pa > 0 else None
    out["memory_ratio"] = out["child"]["memory_bytes"] / out["parent"]["memory_bytes"]
    gkd_res = run.gkd / "result.json"
    out["gkd"] = {k2: v for k2, v in json.loads(gkd_res.read_text()).items() if k2 in ("steps", "tokens", "initial",
                                                                                          "final")} \
        if gkd_res.is_file() and child_dir == gkd_ckpt else None
    png = run.root / "pareto.png"
    out["pareto_png"] = str(png) if (plot_pareto(sols, sol, out, png) if writer else png.is_file()) else None
    out["wall_s"] = time.perf_counter() - t0
    if writer:
        atomic_write_json(run.root / "eval.json", out)
        atomic_write_text(run.report, report_markdown(out, parent_arch, child_arch, sols))
    ret = out["quality_retention_pct"]  # None when the parent's accuracy is 0 (an untrained parent)
    predicted = out["speedup"]["predicted"]
    log(f"[evaluate] child: {'n/a' if ret is None else f'{ret:.1f}'}% of the parent's accuracy, KL "
        f"{out['child']['kl_to_parent']:.4f}; speedup measured {measured:.2f}x"
        + (f", predicted {predicted:.2f}x" if predicted else "") + f" -> {run.root / 'eval.json'}, {run.report}")
    return out


# ----------------------------------------------------------------------------- outputs

def plot_pareto(sols: dict | None, chosen: dict | None, ev: dict, path: Path) -> bool:
    """The MIP's predicted quality/throughput frontier with the parent, the chosen candidate and
    the child at its MEASURED speedup. False (no file) without mip/solutions.json."""
    if not sols or not sols.get("solutions"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sols.get("config", {}).get("metric", "kl")
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    front = sorted((p["predicted_speedup"], p["objective"]) for p in sols.get("pareto", []) if p.get("feasible"))
    if front:
        ax.plot(*zip(*front), "o-", color="tab:blue", label="MIP frontier (predicted)")
    # a child whose blocks have no library score (a baseline) has objective None: nothing to place
    others = [(s["predicted_speedup"], s["objective"]) for s in sols["solutions"]
              if s is not chosen and s.get("objective") is not None]
    if others:
        ax.scatter(*zip(*others), marker="x", color="grey", label="other MIP candidates")
    ax.scatter([1.0], [0.0], marker="s", s=70, color="black", label="parent (1x, 0)", zorder=5)
    if chosen and chosen.get("objective") is not None:
        cx, cy = chosen["predicted_speedup"], chosen["objective"]
        ax.scatter([cx], [cy], marker="*", s=220, color="tab:orange", label=f"chosen ({cx:.2f}x predicted)", zorder=6)
        mx, ret = ev["speedup"]["measured"], ev["quality_retention_pct"]  # ret None: parent accuracy 0
        ax.scatter([mx], [cy], marker="D", s=70, color="tab:red", zorder=7,
                   label=f"child measured ({mx:.2f}x, KL {ev['child']['kl_to_parent']:.3g}, "
                         f"{'n/a' if ret is None else f'{ret:.1f}'}% acc.)")
        ax.annotate("", xy=(mx, cy), xytext=(cx, cy), arrowprops={"arrowstyle": "->", "color": "tab:red"})
    ax.set_xlabel(f"throughput speedup vs parent (batch {ev['scenario']['batch_size']}, "
                  f"{ev['scenario']['prefill_len']}+{ev['scenario']['gen_len']} tokens)")
    ax.set_ylabel(f"estimated quality loss (sum of block {metric})")
    ax.set_title("Puzzle: quality / throughput frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return True


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def report_markdown(ev: dict, parent: Architecture, child: Architecture, sols: dict | None) -> str:
    from megapuzzle.arch_table import architecture_table

    p, c, s, sc = ev["parent"], ev["child"], ev["speedup"], ev["scenario"]
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    rows = [
        ("parameters", f"{p['params']:,}", f"{c['params']:,}", f"{c['params'] / p['params']:.2f}x"),
        ("memory (params + KV cache)", _fmt_bytes(p["memory_bytes"]), _fmt_bytes(c["memory_bytes"]),
         f"{ev['memory_ratio']:.2f}x"),
        ("KV cache / token", _fmt_bytes(p["kv_bytes_per_token"]), _fmt_bytes(c["kv_bytes_per_token"]), ""),
        ("held-out LM loss (nats)", f"{p['lm_loss']:.4f}", f"{c['lm_loss']:.4f}",
         f"{c['lm_loss'] - p['lm_loss']:+.4f}"),
        ("top-1 accuracy", f"{p['accuracy']:.4f}", f"{c['accuracy']:.4f}", f"{f(ev['quality_retention_pct'], '.1f')}%"),
        ("KL(parent ‖ model)", f"{p['kl_to_parent']:.4f}", f"{c['kl_to_parent']:.4f}", ""),
        ("top-1 agreement with parent", f"{p['top1_agreement']:.4f}", f"{c['top1_agreement']:.4f}", ""),
        ("measured tokens/s (medians, megatron)", f"{p['tokens_per_s']:.1f}", f"{c['tokens_per_s']:.1f}",
         f"{s.get('ratio_of_median_tokens_per_s', s['measured']):.2f}x"),
        ("predicted tokens/s (costs.json)", f(p.get("predicted_tokens_per_s"), ".1f"),
         f(c.get("predicted_tokens_per_s"), ".1f"), f"{f(s['predicted'], '.2f')}x"),
    ]
    if ev.get("vllm"):
        v = ev["vllm"]
        rows.append((f"measured tokens/s (medians, vLLM {v['version']})", f"{v['parent']['tokens_per_s']:.1f}",
                     f"{v['child']['tokens_per_s']:.1f}",
                     f"{v['child']['tokens_per_s'] / v['parent']['tokens_per_s']:.2f}x"))
    lines = [
        "# Puzzle run report", "",
        f"Parent `{ev['parent_dir']}` vs child `{ev['child_dir']}`. Timing scenario: batch {sc['batch_size']}, "
        f"prefill {sc['prefill_len']} + generate {sc['gen_len']} tokens, KV cache on "
        f"({ev['timing'].get('dtype')}, {ev['timing'].get('threads') or 'all'} threads, {ev['timing'].get('clock')} clock; "
        f"scenario from {', '.join(f'{k}: {v}' for k, v in sc['source'].items())}).", "",
        f"**Quality retention: {f(ev['quality_retention_pct'], '.1f')}%** of the parent's top-1 accuracy; "
        f"**measured speedup {s.get('measured_by_engine', {}).get(s.get('engine'), s['measured']):.2f}x in "
        f"{s.get('engine', 'megatron')}**, the engine the MIP optimized for (predicted {f(s['predicted'], '.2f')}x from costs.json, "
        f"the MIP's own prediction {f(s['mip_predicted'], '.2f')}x"
        + (f" at batch {s['mip_batch_size']}" if s.get("mip_batch_size") else "") + ").", "",
        "| | parent | child | child / parent |", "|---|---:|---:|---:|",
        *[f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows], "",
        "## Speedup: predicted vs measured", "",
        "| source | speedup |", "|---|---:|",
        f"| MIP (mip/solutions.json, solution {f(s['mip_solution'], 'd')}) | {f(s['mip_predicted'], '.3f')}x |",
        f"| costs.json at this scenario (measured in {s.get('engine', 'megatron')}) | {f(s['predicted'], '.3f')}x |",
        *[f"| measured in {eng}{' (the MIP optimized for this engine)' if eng == s.get('engine', 'megatron') else ''}"
          f"; median of paired parent / child generation times | {x:.3f}x |"
          for eng, x in s.get("measured_by_engine", {"megatron": s["measured"]}).items()],
        f"| prediction error (vs {s.get('engine', 'megatron')}) | {f(s['prediction_error_pct'], '+.1f')}% |", "",
    ]
    if ev.get("gkd") or ev.get("child_realized"):
        lines += ["## Global knowledge distillation", ""]
        if ev.get("gkd"):
            g = ev["gkd"]
            lines += [f"{g['steps']} steps, {g['tokens']:,} tokens. Held-out, before -> after:", "",
                      "| metric | before | after |", "|---|---:|---:|",
                      *[f"| {k} | {g['initial'][k]:.4f} | {g['final'][k]:.4f} |" for k in ("kl", "cosine", "lm_loss")],
                      ""]
        if ev.get("child_realized"):
            r = ev["child_realized"]
            lines += [f"Realized child before GKD: LM loss {r['lm_loss']:.4f}, accuracy {r['accuracy']:.4f} "
                      f"({100 * r['accuracy'] / p['accuracy']:.1f}% retention), KL {r['kl_to_parent']:.4f}.", ""]
    lines += ["## Child architecture", "",
              f"{child.num_layers} layers; the parent's layers are all {parent.layers[0].name} "
              f"({parent.layer_params(0):,} params each).", "", architecture_table(child), ""]
    if ev.get("pareto_png"):
        lines += ["## Quality / throughput frontier", "", "![pareto](pareto.png)", "",
                  "Blue: the MIP's Pareto sweep (predicted speedup vs summed block score); star: the chosen "
                  "candidate; red diamond: the child at its measured speedup.", ""]
    return "\n".join(lines)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML with an evaluate: section (defaults otherwise)")
    p.add_argument("--run-dir", required=True, help="run directory (parent/, child/ or gkd/checkpoint, data/)")
    p.add_argument("--child", help="evaluate this checkpoint instead of RUN/gkd/checkpoint or RUN/child")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default: evaluate.tensor_parallel); torchrun TP x PP processes")
    p.add_argument("--pp", type=int, default=None,
                   help="pipeline-parallel size (default: evaluate.pipeline_parallel): each rank builds its stage")


def run_cli(args: argparse.Namespace) -> int:
    import os

    cfg = section(load_config(args.config) if args.config else {}, "evaluate", EvaluateConfig)
    for flag, v in (("--tp", args.tp), ("--pp", args.pp)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    run_evaluate(args.run_dir, cfg, child=args.child, tp=args.tp, pp=args.pp)
    if int(os.environ.get("RANK", "0")) == 0:
        print(RunDir(args.run_dir).report.read_text())
    return 0
