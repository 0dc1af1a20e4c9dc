"""The two GKD trainers (`gkd.optimizer`) and the resume rule that goes with their state.

- `LocalTrainer` ("local"; "auto" on CPU): torch AdamW on every rank, the DP gradient all-reduce
  (summed, / DP), PP tied-embedding all-reduce, under sequence parallelism the norms' TP all-reduce,
  and a TP / PP-aware global grad-norm clip, all by hand. State: safetensors per rank (train_state/rankNNN; megapuzzle.train.state), no pickles.
- `MegatronTrainer` ("megatron"; "auto" on CUDA): Megatron-core's DistributedDataParallel (fp32
  grad buffers, grads scaled by 1 / DP and reduce-scattered) + the distributed optimizer (fp32
  main params sharded over DP, Megatron's grad clip, params all-gathered after the step), as
  Megatron-LM trains. `finalize_model_grads` also sums the tied embedding's grads over the PP
  stages. State: one Megatron dist-checkpoint per step shared by all ranks (train_state/dist;
  its metadata is pickled, which is why "auto" keeps the local trainer on CPU). Runs on CPU over
  gloo too (megapuzzle.runtime.cpu_compat), which is how the tests cover it.

Both: AdamW (0.9, 0.95, eps 1e-8), decoupled weight decay on matrices only (1-d params and
biases get none), clip coefficient grad_clip / (norm + 1e-6) when below 1.

Why two, and not one: they differ in more than a format. The megatron trainer is the one that
scales: its distributed optimizer shards the fp32 main params and Adam moments over DP (12 bytes
per parameter / DP, against 12 on every rank for the local one), which decides whether a 70B
child's GKD fits a node; and its state is what Megatron-LM / NeMo users resume. Its dist-checkpoint
metadata is pickled, and we never unpickle what we did not write in this run directory, so the
local trainer (safetensors only) is the default wherever that saving does not matter (CPU, small
children). Both give the same losses (tests/test_gkd_megatron.py).
"""

from __future__ import annotations

import logging
import contextlib
import json
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megapuzzle.fileio import atomic_write_json, atomic_write_text
from megapuzzle.train.distill import all_reduce_if, tp_group_rank_size

from megapuzzle.config.gkd import TRAINERS  # noqa: E402,F401 (re-exported)

log = logging.getLogger(__name__).info


def resolve_trainer(name: str) -> str:
    """"auto" -> "megatron" on CUDA, "local" on CPU; the others as given."""
    if name == "auto":
        return "megatron" if torch.cuda.is_available() else "local"
    return name


def legacy_trainer() -> str:
    """The trainer this machine used before `gkd.optimizer` existed (its signatures omit it)."""
    return resolve_trainer("auto")


def tp_grad_norm(params) -> float:
    """Global grad L2 norm as Megatron computes it: TP-split grads summed over the TP group,
    replicated ones (norms) counted once (on TP rank 0); under PP summed over the stages, the
    last stage's copy of a tied embedding (`shared`) left out."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    group, _, _ = tp_group_rank_size()
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False):
            sq = sq + p.grad.detach().double().pow(2).sum().cpu()
    if group is not None:
        dev = next(iter(params)).device
        sq = all_reduce_if(sq.to(dev), group).cpu()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        sq = all_reduce_if(sq.to(next(iter(params)).device), ps.get_pipeline_model_parallel_group()).cpu()
    return math.sqrt(sq.item())


def allreduce_sequence_parallel_grads(params) -> None:
    """Under sequence parallelism the norms' weights are replicated but each TP rank's grad covers only
    its own tokens: sum them over TP (what finalize_model_grads does for the params Megatron marks
    `sequence_parallel`), so every rank steps with the whole batch's grad."""
    group, _, _ = tp_group_rank_size()
    grads = [p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if group is None or not grads:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


class LocalTrainer:
    """torch AdamW on every rank, DP gradient all-reduce, TP-aware clip; resumable state in
    safetensors (megapuzzle.train.state), bitwise on resume."""

    def __init__(self, model, cfg, info, state_dir: Path):
        from megapuzzle.stages.parent.train_parent import _param_groups

        self.model, self.cfg, self.info, self.state_dir = model, cfg, info, state_dir
        self.params = dict(model.named_parameters())
        self.opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def no_sync(self, last: bool):
        """The DP all-reduce runs in step(): nothing to defer between micro-batches."""
        return contextlib.nullcontext()

    def step(self, lr: float) -> float:
        from megatron.core import parallel_state as ps
        from megapuzzle.train.schedule import set_lr

        if self.info.pp_size > 1:
            from megapuzzle.stages.gkd.pipeline import allreduce_tied_embedding_grads

            allreduce_tied_embedding_grads(self.model)
        allreduce_sequence_parallel_grads(self.params.values())
        if self.info.dp_size > 1:
            group = ps.get_data_parallel_group()
            for p in self.params.values():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=group)
                    p.grad /= self.info.dp_size
        norm = tp_grad_norm(self.params.values())
        if self.cfg.grad_clip > 0:
            coef = self.cfg.grad_clip / (norm + 1e-6)
            if coef < 1.0:
                for p in self.params.values():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        set_lr(self.opt, lr)
        self.opt.step()
        return norm

    def save(self, step: int, extra: dict) -> None:
        from megapuzzle.train.state import save_train_state

        save_train_state(self.state_dir, step, self.params, self.opt, extra)

    def load(self) -> dict | None:
        from megapuzzle.train.state import load_train_state

        return load_train_state(self.state_dir, self.params, self.opt)


# Megatron-LM's default layout of the distributed optimizer's state in a dist-checkpoint
# (one ShardedTensor per grad-buffer bucket; reshardable over DP only, and GKD resumes only
# on the same TP x PP x DP grid anyway: the world is part of the run's signature).
_DIST_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronTrainer:
    """Megatron-core DistributedDataParallel (fp32 grad buffers, reduce-scatter) + the
    distributed optimizer (fp32 main params sharded over DP, Megatron's grad clip), as
    Megatron-LM trains; state in Megatron dist-checkpoints (one per step, `latest` file).

    Without Apex / TE (always on CPU) Megatron's optimizer falls back to torch's AdamW, and
    resuming it from a dist-checkpoint needs two fixes in `load` (megatron-core 0.16.1 bugs on
    that path). On CPU, megapuzzle.runtime.cpu_compat bridges DDP, the optimizer and the save."""

    def __init__(self, module, cfg, info, state_dir: Path):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.module, self.cfg, self.info, self.state_dir = module, cfg, info, state_dir
        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.overlap_grad_reduce,
                                            use_distributed_optimizer=True)
        self.model = DistributedDataParallel(config=module.config, ddp_config=ddp, module=module)
        if cfg.overlap_grad_reduce:  # as Megatron-LM: the PP schedules reduce with the last micro-batch only
            module.config.no_sync_func = self.model.no_sync
        dtype = module.config.params_dtype
        oc = OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                             adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=cfg.grad_clip,
                             bf16=dtype == torch.bfloat16, params_dtype=dtype, use_distributed_optimizer=True)
        self.opt = get_megatron_optimizer(oc, [self.model])

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.opt.zero_grad()

    def no_sync(self, last: bool):
        """Micro-batches before the last one only accumulate; with overlap_grad_reduce the last
        one's backward launches each bucket's reduce-scatter as the bucket fills."""
        return contextlib.nullcontext() if last else self.model.no_sync()

    def step(self, lr: float) -> float:
        from megatron.core.distributed import finalize_model_grads

        # DP reduce-scatter of the grad buffers (averaged over DP) and, under PP, the tied
        # embedding's grads over the first / last stage: what Megatron-LM's schedules call.
        finalize_model_grads([self.model])
        for g in self.opt.param_groups:  # as Megatron-LM's OptimizerParamScheduler: norms get wd_mult 0
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = self.cfg.weight_decay * g.get("wd_mult", 1.0)
        ok, norm, _ = self.opt.step()
        return float(norm) if ok and norm is not None else float("nan")  # Megatron-LM: skipped iteration

    def _sharded_state_dict(self, is_loading: bool) -> dict:
        msd = self.module.sharded_state_dict()
        return {"model": msd, "optimizer": self.opt.sharded_state_dict(msd, is_loading=is_loading,
                                                                        metadata=_DIST_OPT_METADATA)}

    def save(self, step: int, extra: dict) -> None:
        from megatron.core import dist_checkpointing

        d = self.state_dir / f"step_{step:08d}"
        if self.info.rank == 0:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state_dict(False), str(d))
        dist.barrier()
        if self.info.rank == 0:
            atomic_write_json(d / "state.json", {"step": step, "extra": extra})
            atomic_write_text(self.state_dir / "latest", d.name + "\n")  # the commit point
            for old in sorted(self.state_dir.glob("step_*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _torch_adamw(self) -> list[torch.optim.AdamW]:
        """The inner torch AdamW of each distributed optimizer (none when Apex / TE provide it)."""
        inner = [o.optimizer for o in getattr(self.opt, "chained_optimizers", [self.opt])]
        return [o for o in inner if isinstance(o, torch.optim.AdamW)]

    def load(self) -> dict | None:
        from megatron.core import dist_checkpointing
        from megapuzzle.train.state import latest_step_dir

        d = latest_step_dir(self.state_dir)
        if d is None:
            return None
        for inner in self._torch_adamw():
            # Without Apex / TE the inner optimizer is torch's AdamW, and the distributed
            # optimizer's state_dict() (which sharded_state_dict(is_loading=True) calls) reads
            # a "step" from every param's state: before its first step there is none. Zero
            # state, as AdamW creates it; the checkpoint replaces all of it.
            if not inner.state:
                for g in inner.param_groups:
                    for p in g["params"]:
                        inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                          "exp_avg_sq": torch.zeros_like(p)}
        loaded = dist_checkpointing.load(self._sharded_state_dict(True), str(d))
        with torch.no_grad():  # fp32 params: the main params are views of them (leaves that need grad)
            self.module.load_state_dict(loaded["model"])
            self.opt.load_state_dict(loaded["optimizer"])
        for inner in self._torch_adamw():
            # ... and its load_state_dict() then sets every param's "step" from the LOCAL,
            # non-persistent placeholder above (0), all as one shared tensor that torch's AdamW
            # would increment once per param per step: wrong bias correction after a resume.
            # The checkpoint's step is in the param groups: one tensor per param, as AdamW keeps.
            for g in inner.param_groups:
                for p in g["params"]:
                    inner.state[p]["step"] = torch.tensor(float(g["step"]), dtype=torch.float32)
        st = json.loads((d / "state.json").read_text())
        return {"step": st["step"], "extra": st.get("extra", {})}


def make_trainer(name: str, model, cfg, info, state_dir: Path):
    return {"megatron": MegatronTrainer, "local": LocalTrainer}[name](model, cfg, info, state_dir)


def resume_point(state_dir: Path, info, sig: str, shared: bool) -> None:
    """Make every rank resume from the newest step ALL ranks saved completely (a kill during a
    save can leave the per-rank local states one checkpoint apart; each keeps two) by repointing
    `latest`; start over when the ranks share none or the state was written for other inputs
    (as BLD does). `shared`: one state dir for all ranks (the Megatron trainer's
    dist-checkpoints), decided by rank 0; else one per rank, decided collectively so that every
    rank reaches the same verdict."""
    from megapuzzle.train.state import latest_step_dir

    if shared and info.rank != 0:
        if info.world_size > 1:
            dist.barrier()  # rank 0 decides for the shared state dir (and may delete it meanwhile)
        return
    cur = latest_step_dir(state_dir)
    saved = json.loads((cur / "state.json").read_text()).get("extra", {}).get("signature") if cur else None
    mine = sorted(int(p.name[5:]) for p in state_dir.glob("step_*") if (p / "state.json").is_file()) if cur else []
    every = [(mine, saved)]
    if info.world_size > 1 and not shared:  # one state dir per rank: every rank must agree
        from megapuzzle.runtime.distributed import all_gather_json

        every = all_gather_json([mine, saved])  # JSON, not pickle
    common = set(mine).intersection(*(set(m) for m, _ in every))
    if any(s not in (None, sig) for _, s in every):
        log(f"[gkd] {state_dir.parent} was written for another config / child / world size; starting over")
        common = set()
    if not common:
        shutil.rmtree(state_dir, ignore_errors=True)
    elif cur.name != f"step_{max(common):08d}":
        atomic_write_text(state_dir / "latest", f"step_{max(common):08d}\n")
    if shared and info.world_size > 1:
        dist.barrier()  # rank 0 decided for the shared state dir
