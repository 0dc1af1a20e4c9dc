"""One BLD rank's training (megapuzzle.stages.bld.bld decides, this trains): build the teacher and the
rank's student blocks, initialise them from the parent (FFN channel calibration for pruned
MLPs), measure the init NMSE, train every block in lockstep on the same global batches
(one teacher forward per batch, one backward per block, a Megatron mixed-precision AdamW per
block: fp32 master weights for bf16 params, per-block gradient clipping; cosine schedule),
checkpoint every `checkpoint_every` steps, measure the final NMSE and write the blocks to the
library.

Resume: a rank restarts from its last checkpoint when the checkpoint belongs to the same plan
(signature + planned keys). TP ranks (and with PP > 1 every rank of the pipeline,
megapuzzle.stages.bld.pp_relay) agree on the step or all restart. With PP > 1 every stage of a
pipeline up to the deepest one with work runs the same teacher passes (relaying the boundary
hidden state), whether it trains blocks or not.
"""

from __future__ import annotations

import logging
import json
import shutil
import time
from pathlib import Path

import torch

from megapuzzle.arch import Architecture
from megapuzzle.stages.bld.plan import BLDConfig, BlockSpec, tensor_sig
from megapuzzle.checkpoints.canonical import first_dtype
from megapuzzle.config import RunDir
from megapuzzle.fileio import save_safetensors_atomic
from megapuzzle.library import BlockLibrary

log = logging.getLogger(__name__).info


def _saved_state(state_dir: Path) -> tuple[str, int, list[str]] | None:
    """(signature, step, block keys) of a rank's last checkpoint, or None."""
    from megapuzzle.train.state import latest_step_dir

    d = latest_step_dir(state_dir)
    if d is None:
        return None
    try:
        st = json.loads((d / "state.json").read_text())
        return st["extra"]["signature"], int(st["step"]), list(st["extra"]["keys"])
    except (json.JSONDecodeError, KeyError, OSError, TypeError, ValueError):
        return None


def _tp_agree(value: int) -> bool:
    """True when every rank of this TP group passes the same value."""
    from megatron.core import parallel_state as ps

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lo = torch.tensor([value], dtype=torch.int64, device=dev)
    hi = lo.clone()
    group = ps.get_tensor_model_parallel_group()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=group)
    return lo.item() == hi.item()


def _nmse_terms(student, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors, sum of squared targets) on the layer's update o = out - in (a
    fused-run block: on the run's update, the stream out of its last layer minus the one into its first)."""
    i = student.layer_index
    x = t.x[i].float()  # in fp32 whatever the params' dtype: bf16 differences would lose the small updates
    target = t.y[student.last].float() - x
    err = (student(t).float() - x) - target
    return err.pow(2).sum(), target.pow(2).sum()


def evaluate(teacher, students, heldout, cfg: BLDConfig) -> dict[str, float]:
    """NMSE per block over the fixed held-out batches (ratio of sums over all their tokens)."""
    num = {s.key: 0.0 for s in students}
    den = dict(num)
    with torch.no_grad():
        for batch in heldout.eval_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches):
            t = teacher.forward(batch[:, :-1])
            for s in students:
                a, b = _nmse_terms(s, t)
                num[s.key] += a.item()
                den[s.key] += b.item()
    return {k: num[k] / max(den[k], 1e-30) for k in num}


def _calibrate(teacher, train, cfg: BLDConfig, arch: Architecture, tensors: dict, layers: set[int]) -> dict:
    """C_i per channel of each layer's parent FFN, on the first calibration_batches training batches."""
    from megapuzzle.init import FFNChannelScorer, local_layer_tensors

    scorers = {i: FFNChannelScorer(local_layer_tensors(tensors, i), arch.rms_norm_eps) for i in layers}
    for k in range(cfg.calibration_batches):
        t = teacher.forward(train.batch(k, cfg.batch_size, cfg.seq_len, cfg.seed)[:, :-1])
        for i, s in scorers.items():
            s.update(t.m[i])
    return {i: s.scores() for i, s in scorers.items()}


def _init_tensors(arch: Architecture, b: BlockSpec, tensors: dict, scores: dict) -> tuple[dict, str]:
    from megapuzzle.init import init_attention, init_ffn, local_layer_tensors

    local = local_layer_tensors(tensors, b.layer)
    own = arch.layers[b.layer]
    out, methods = {}, []
    if b.kind in ("attention", "layer"):
        t, m = init_attention(arch, own.attention, b.variant.attention, local)
        out.update(t)
        methods.append(m)
    if b.kind in ("ffn", "layer"):
        t, m = init_ffn(own.ffn, b.variant.ffn, local, scores.get(b.layer))
        out.update(t)
        methods.append(m)
    return out, "+".join(methods)


def _resume_point(state_dir: Path, keys_sig: str, mine: list[BlockSpec], steps: int) -> tuple | None:
    """This rank's own saved state when it can resume it: same plan, and either the same blocks
    or a finished state holding them (a rank killed while writing its blocks)."""
    saved, mine_keys = _saved_state(state_dir), sorted(b.key for b in mine)
    ok = saved is not None and saved[0] == keys_sig and (
        saved[2] == mine_keys or (saved[1] == steps and set(mine_keys) <= set(saved[2])))
    return saved if ok else None


TIMINGS = ("setup_s", "calibration_s", "teacher_s", "students_s", "eval_s", "write_s")


def train_rank(rd: RunDir, cfg: BLDConfig, arch: Architecture, parent_tensors: dict, mine: list[BlockSpec],
               lib: BlockLibrary, info, *, state_dir: Path, signature: str, plan_keys: list[str],
               progress: bool = True, role=None, init=None) -> dict:
    """Train this rank's blocks in lockstep and write them to the library. `role` (PP > 1): this
    rank's megapuzzle.stages.bld.pp_relay.PipelineRole; every rank of a pipeline with work calls this,
    `mine` may then be empty (a relay-only stage, or a stage beyond the deepest one with work).
    `init(b)` -> (layer-local tensors, method): how blocks start when not the parent's usual init
    (fused-run blocks: the fold, megapuzzle.stages.fusion_runs); `lib` is then where they are written.

    The steps, in order (each a RankRun method): the saved state, the teacher share, the students,
    the start agreement (PP), the optimizers, the start point (resume or init + init NMSE), the
    training loop, then final NMSE + keep_best + writing."""
    t0 = time.perf_counter()
    r = RankRun(rd, cfg, arch, parent_tensors, mine, info, state_dir, signature, plan_keys, role)
    r.find_saved_state()
    r.read_teacher_share()
    r.build_students()
    if not r.agree_on_start():  # PP: a stage beyond the deepest one with work only built its shard
        return {"resumed_from": None, "timings": r.tim}
    r.build_optimizers()
    r.tim["setup_s"] = time.perf_counter() - t0
    r.start_blocks(init)
    resumed_from = r.start if r.resume else None
    stopped = r.train(progress)
    if stopped is not None:
        return {"stopped_at": stopped, "resumed_from": resumed_from, "timings": r.tim}
    final = r.finish(lib)
    return {"resumed_from": resumed_from, "timings": r.tim,
            "nmse": {k: (r.init_nmse[k], final[k]) for k in final}}


class RankRun:
    """What train_rank's steps share: one rank's teacher, students, optimizers and progress."""

    def __init__(self, rd: RunDir, cfg: BLDConfig, arch: Architecture, parent_tensors: dict,
                 mine: list[BlockSpec], info, state_dir: Path, signature: str, plan_keys: list[str], role):
        self.rd, self.cfg, self.arch, self.parent_tensors, self.mine = rd, cfg, arch, parent_tensors, mine
        self.info, self.state_dir, self.signature, self.role = info, state_dir, signature, role
        self.tim = dict.fromkeys(TIMINGS, 0.0)
        self.leader = info.tp_rank == 0
        self.talk = self.leader and info.dp_rank == 0  # per-block lines: one rank per stage (rank 0 without PP)
        # The state belongs to this rank's whole planned key set: a rank killed while writing its
        # finished blocks resumes the rest from the final checkpoint instead of retraining them.
        self.keys_sig = tensor_sig(signature + "|" + ",".join(sorted(plan_keys)))
        self.mine_keys = sorted(b.key for b in mine)
        self.spec = {b.key: b for b in mine}
        self.agreed_step: int | None = None  # PP: the step the pipeline starts from (-1: afresh)
        self.start, self.init_nmse, self.methods = 0, {}, {}

    # ------------------------------------------------------------------ setup

    def find_saved_state(self) -> None:
        """This rank's resumable state; TP ranks (without PP) resume only from one step."""
        self.saved = _resume_point(self.state_dir, self.keys_sig, self.mine, self.cfg.steps) if self.mine else None
        self.resume = self.saved is not None
        if self.role is None and self.info.tp_size > 1 and not _tp_agree(self.saved[1] if self.resume else -1):
            self.resume = False  # a kill mid-save left the TP ranks at different steps: restart together

    def read_teacher_share(self) -> None:
        """The datasets, this rank's shard of the parent (read lazily) and the teacher on it."""
        from megapuzzle.data.datasets import PackedSequenceDataset
        from megapuzzle.model.config import ModelOptions
        from megapuzzle.model.gpt import build_gpt_model
        from megapuzzle.model.weights import load_canonical_into_model
        from megapuzzle.stages.bld.blocks import Teacher

        cfg, arch, mine, role = self.cfg, self.arch, self.mine, self.role
        self.train_data = PackedSequenceDataset.from_prefix(self.rd.train_data)
        self.heldout = PackedSequenceDataset.from_prefix(self.rd.heldout_data)
        # PP: every stage builds its shard as Megatron does (tied embeddings: first and last stage
        # synchronise them at construction), even a stage that then has nothing to do.
        model = build_gpt_model(arch, params_dtype=cfg.params_dtype, options=ModelOptions(perform_initialization=False))
        if role is None or role.active:
            load_canonical_into_model(model, self.parent_tensors, arch)
        self.prune = {b.layer for b in mine if b.kind != "attention" and b.last is None
                      and b.variant.ffn.kind_spec.needs_calibration(arch.layers[b.layer].ffn, b.variant.ffn)}
        relay = None
        if role is not None and role.active:
            from megapuzzle.stages.bld.pp_relay import PipelineRelay

            relay = PipelineRelay(role, arch.hidden_size, model.config.params_dtype, next(model.parameters()).device)
        carry = set(role.carry_out) if role is not None else set()  # streams a later stage's run blocks need
        self.teacher = Teacher(model, {b.layer for b in mine} | {b.end for b in mine} | carry,
                               {b.layer for b in mine if b.kind == "ffn"} | self.prune | carry, relay)

    def build_students(self) -> None:
        """One StudentBlock per planned block (attention blocks share the teacher's frozen FFN)."""
        from megapuzzle.stages.bld.blocks import StudentBlock

        cfg, fp8 = self.cfg, self.cfg.fp8_recipe if self.cfg.fp8 else None
        self.students = [StudentBlock(b.key, b.kind, b.layer, self.arch, b.variant, self.teacher, self.info.tp_size,
                                      fp8, cfg.params_dtype, b.last) for b in self.mine]
        self.named = {f"{s.key}/{n}": p for s in self.students for n, p in s.trainable().items()}
        for p in self.named.values():
            p.requires_grad_(True)
        self.trainable = [s for s in self.students if s.owned]

    def agree_on_start(self) -> bool:
        """PP: the whole pipeline (TP x PP of this replica) starts at one step and learns whether
        any stage calibrates / trains (collective). False: this stage runs no teacher pass (beyond
        the deepest one with work). A rank that does not resume drops its old state."""
        self.any_prune, self.any_trainable = bool(self.prune), bool(self.trainable)
        if self.role is not None:
            from megatron.core import parallel_state as ps

            from megapuzzle.stages.bld.pp_relay import agree_on_step, any_flags

            group = ps.get_model_parallel_group()
            self.agreed_step = agree_on_step((self.saved[1] if self.resume else -1) if self.mine else None, group)
            self.resume = self.agreed_step >= 0
            self.any_prune, self.any_trainable = any_flags([self.any_prune, self.any_trainable], group)
            if not self.role.active:
                return False
        if not self.resume:
            shutil.rmtree(self.state_dir, ignore_errors=True)  # another plan / config: start these blocks afresh
        return True

    def build_optimizers(self) -> None:
        """A Megatron mixed-precision AdamW per trainable block (None: nothing of its own to train)."""
        from megapuzzle.train.block_optimizer import BlockOptimizers

        cfg = self.cfg
        self.opt = BlockOptimizers({s.key: {f"{s.key}/{n}": p for n, p in s.trainable().items()}
                                    for s in self.trainable},
                                   lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip) \
            if self.named else None

    # ------------------------------------------------------------------ start point

    def start_blocks(self, init) -> None:
        """Where the blocks start: the saved state, the pipeline's agreed step (a relay-only
        stage), or their init from the parent (`init`: train_rank's) and its held-out NMSE."""
        if self.resume and self.mine:
            self._load_saved()
        elif self.resume:  # relay-only stage: the step the pipeline agreed on
            self.start = self.agreed_step
        else:
            self._initialise(init)

    def _load_saved(self) -> None:
        from megapuzzle.train.state import load_train_state

        # optimizer moments only when every saved block is still to train (else training is over)
        moments = self.saved[2] == self.mine_keys
        st = load_train_state(self.state_dir, self.named, self.opt if moments else None)
        if self.opt is not None and not moments:
            self.opt.reload_model_params()
        self.start, self.init_nmse, self.methods = st["step"], st["extra"]["init_nmse"], st["extra"]["init"]
        if self.talk:
            log(f"[bld] resumed {len(self.mine)} block(s) from step {self.start}")

    def _initialise(self, init) -> None:
        cfg, arch, tensors = self.cfg, self.arch, self.parent_tensors
        t = time.perf_counter()
        # every stage of a pipeline runs the calibration passes when one of them prunes
        scores = _calibrate(self.teacher, self.train_data, cfg, arch, tensors, self.prune) if self.any_prune else {}
        self.tim["calibration_s"] = time.perf_counter() - t
        for s in self.students:
            b = self.spec[s.key]
            local, self.methods[s.key] = _init_tensors(arch, b, tensors, scores) if init is None else init(b)
            s.load_canonical(local)
        if self.opt is not None:
            self.opt.reload_model_params()  # the fp32 master weights start from the init just loaded
        t = time.perf_counter()
        self.init_nmse = evaluate(self.teacher, self.students, self.heldout, cfg)
        self.tim["eval_s"] += time.perf_counter() - t
        if cfg.keep_best and self.named:  # this rank's shards of the init weights, for keep_best
            save_safetensors_atomic(self.named, self.state_dir / INIT_PARAMS)

    # ------------------------------------------------------------------ training

    def train(self, progress: bool) -> int | None:
        """The lockstep loop from `start` (TrainLoop: LR schedule, log lines + tensorboard,
        checkpoints); the step a fault test stopped it at, else None."""
        from megapuzzle.train.loop import TrainLoop
        from megapuzzle.train.schedule import LRSchedule
        from megapuzzle.train.state import save_train_state
        from megapuzzle.train.train_logger import TrainLogger

        cfg, info = self.cfg, self.info
        extra = {"signature": self.keys_sig, "keys": self.mine_keys, "init_nmse": self.init_nmse, "init": self.methods}
        self.total = total = cfg.steps if self.any_trainable else 0
        sched = LRSchedule(cfg.lr, max(total, 1), min(cfg.warmup, max(total - 1, 0)), cfg.min_lr)
        tb = self.rd.tb / "bld" / (f"dp{info.dp_rank:03d}" if self.role is None
                                   else f"dp{info.dp_rank:03d}_pp{info.pp_rank:03d}")
        self.logger = TrainLogger(tb, total, prefix="bld/", enabled=self.leader and bool(self.mine))
        if self.leader and self.start == 0:
            for k, v in self.init_nmse.items():
                self.logger.scalar(f"eval_nmse/{k}", v, 0)
        self.window: dict[str, list[float]] = {s.key: [] for s in self.trainable}
        main = info.rank == 0
        self.loop = TrainLoop("bld", total, sched, self.logger, cfg.log_every, cfg.checkpoint_every,
                              cfg.tokens_per_step, console=main, progress=progress and main)
        save = (lambda n: save_train_state(self.state_dir, n, self.named, self.opt, extra)) if self.mine else None
        return self.loop.run(self.start, self.step, save=save, window=self.block_means)

    def step(self, i: int, lr: float) -> dict:
        """Training step i: one teacher pass, then one backward and optimizer step per block."""
        cfg = self.cfg
        tokens = self.train_data.batch(i, cfg.batch_size, cfg.seq_len, cfg.seed)[:, :-1]  # same batch on every rank
        t = time.perf_counter()
        tout = self.teacher.forward(tokens)  # PP: a relay-only stage just passes the boundary state on
        t1 = time.perf_counter()
        norms = []
        if self.trainable:
            self.opt.set_lr(lr)
            for s in self.trainable:  # one backward per block: no graph spans two blocks, activations freed early
                num, den = _nmse_terms(s, tout)
                loss = num / den
                loss.backward()
                self.window[s.key].append(loss.item())
            norms = self.opt.step()  # per block: fp32 main grads, clip on the block's TP-reduced norm, AdamW
            self.opt.zero_grad()
        self.tim["teacher_s"] += t1 - t
        self.tim["students_s"] += time.perf_counter() - t1
        return {"grad norm max": max(norms)} if norms else {}

    def block_means(self, n: int, done: int) -> dict | None:
        """The logging window's scalars: each block's mean training NMSE, their mean and max."""
        if not self.window:
            return None  # no block of its own trains here: nothing to log
        means = {k: sum(v) / len(v) for k, v in self.window.items()}
        for v in self.window.values():
            v.clear()
        return {"nmse mean": sum(means.values()) / len(means), "nmse max": max(means.values()),
                **self.loop.last, **{f"nmse/{k}": v for k, v in means.items()}}

    # ------------------------------------------------------------------ the end

    def finish(self, lib: BlockLibrary) -> dict[str, float]:
        """Final held-out NMSE, keep_best, every block into `lib`, the state removed; the final NMSEs."""
        t = time.perf_counter()
        final = evaluate(self.teacher, self.students, self.heldout, self.cfg)
        self.tim["eval_s"] += time.perf_counter() - t
        kept = _keep_best(self.trainable, final, self.init_nmse, self.state_dir) if self.cfg.keep_best else {}
        t = time.perf_counter()
        self.write_blocks(lib, final, kept)
        self.tim["write_s"] = time.perf_counter() - t
        self.logger.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)  # the library now holds these blocks
        return final

    def write_blocks(self, lib: BlockLibrary, final: dict, kept: dict) -> None:
        """Every student into the library (in the parent's dtype), with its init, NMSEs and
        provenance. Collective over the TP group (each student is gathered); TP rank 0 writes."""
        lib_dtype, steps, init_nmse = first_dtype(self.parent_tensors), self.total, self.init_nmse
        tokens = steps * self.cfg.tokens_per_step
        for s in self.students:
            tensors = s.gather_canonical()  # collective over the TP group: every TP rank calls it
            if not self.leader:
                continue
            tensors = {k: v.to(lib_dtype) for k, v in tensors.items()}
            b, trained = self.spec[s.key], bool(s.owned)
            lib.add_block(s.key, tensors, {
                "init": self.methods[s.key], "tokens": tokens if trained else 0,
                "steps": steps if trained else 0, "init_nmse": init_nmse[s.key],
                "final_nmse": (init_nmse[s.key] if kept.get(s.key) == "init" else final[s.key]) if trained
                else init_nmse[s.key], "trained_nmse": final[s.key] if trained else None,
                "kept": kept.get(s.key, "trained") if trained else None,
                "params": b.num_params(self.arch), "bld_signature": self.signature,
                "trained_dtype": str(self.cfg.params_dtype).replace("torch.", "") if trained else None})
            self.logger.scalar(f"eval_nmse/{s.key}", final[s.key], steps)
            if self.talk:
                log(f"[bld] {s.key}: nmse {init_nmse[s.key]:.4f} -> {final[s.key]:.4f} ({self.methods[s.key]})"
                    + ("; kept the init weights (lower held-out NMSE)" if kept.get(s.key) == "init" else ""))


INIT_PARAMS = "init_params.safetensors"


def _keep_best(trainable, final: dict, init_nmse: dict, state_dir: Path) -> dict[str, str]:
    """Put back the init weights of every block whose held-out NMSE got worse in training.
    Every TP rank computes the same NMSEs (TP-reduced), so every rank decides alike."""
    from megapuzzle.fileio import read_safetensors

    worse = [s for s in trainable if final[s.key] > init_nmse[s.key]]
    if not worse:
        return {}
    path = state_dir / INIT_PARAMS
    if not path.is_file():  # a state from before keep_best existed
        log(f"[bld] {path} missing: keeping the trained weights of {len(worse)} block(s) that got worse")
        return {}
    init = read_safetensors(path, fix=f"delete {state_dir} to retrain these blocks from their init")
    with torch.no_grad():
        for s in worse:
            for n, p in s.owned.items():
                p.copy_(init[f"{s.key}/{n}"].to(device=p.device, dtype=p.dtype))
    return {s.key: "init" for s in worse}
