"""BLD's optimizer: one Megatron-core mixed-precision optimizer per library block.

Every block is its own training problem (Puzzle's blockwise local distillation), so each gets
its own `MegatronOptimizer`: gradient-norm clipping never couples two blocks, and a block trains
the same whether a rank holds it alone or with others. Which one, by parameter dtype:

  bf16 params        -> `Float16OptimizerWithFloat16Params`: fp32 main (master) params, the
                        bf16 grads copied to fp32 main grads, AdamW and clipping on those, the
                        result copied back into the bf16 params (what Megatron-LM does with
                        --bf16 and no distributed optimizer);
  fp32 params        -> `FP32Optimizer` (the params are their own main params).

The wrapped optimizer is torch AdamW (betas 0.9 / 0.95, eps 1e-8, no weight decay on vectors).
Gradient statistics (the norm) are reduced over the tensor-parallel group only: data-parallel
ranks train other blocks and pipeline stages other layers. Neither DistributedDataParallel nor
the distributed optimizer applies: no block is trained on two DP ranks, so there is no
gradient to reduce, and each rank already holds the optimizer state of its own blocks only
(1/DP of the total, what the distributed optimizer's sharding buys in GKD).

On CPU the same classes run through megapuzzle.runtime.cpu_compat.

State (`state_tensors` / `load_state_tensors`), by parameter name, for train.state:
  NAME/main_param (fp32 master weights, float16 params only), NAME/exp_avg, NAME/exp_avg_sq,
  NAME/step: everything a resumed run needs to continue bitwise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _megatron_config(clip: float, dtype: torch.dtype, lr: float):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(optimizer="adam", lr=lr, clip_grad=clip, bf16=dtype == torch.bfloat16,
                           params_dtype=dtype, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)


class BlockOptimizers:
    """A Megatron mixed-precision AdamW per block, stepped together.

    `blocks`: block key -> {parameter name: parameter}; names are unique over all blocks
    (train.state keys). Parameters are fp32 or bf16 (fp16 would need a loss scaler)."""

    def __init__(self, blocks: Mapping[str, Mapping[str, torch.nn.Parameter]], *, lr: float, weight_decay: float,
                 grad_clip: float):
        from megatron.core import parallel_state as ps
        from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params

        self.optimizers: dict[str, object] = {}
        self.names: dict[str, dict[str, torch.nn.Parameter]] = {k: dict(v) for k, v in blocks.items()}
        for key, named in self.names.items():
            dtypes = {p.dtype for p in named.values()}
            if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16}:
                raise ValueError(f"block {key}: parameter dtypes {sorted(map(str, dtypes))}; need one of fp32, bf16")
            dtype = dtypes.pop()
            decay = [p for p in named.values() if p.ndim >= 2]
            no_decay = [p for p in named.values() if p.ndim < 2]
            groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
            inner = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
            config = _megatron_config(grad_clip, dtype, lr)
            if dtype == torch.bfloat16:  # no loss scaler: bf16 has fp32's exponent range
                opt = Float16OptimizerWithFloat16Params(inner, config, None, lambda o: None)
            else:
                opt = FP32Optimizer(inner, config, lambda o: None)
            # the norm of a block's TP shards (Megatron's default, the model-parallel group, would
            # also sum other pipeline stages' blocks)
            opt.grad_stats_parallel_group = ps.get_tensor_model_parallel_group()
            self.optimizers[key] = opt

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = lr

    def step(self) -> list[float]:
        """One AdamW step for every block (each clipped on its own norm); the grad norms."""
        norms = []
        for opt in self.optimizers.values():
            if opt.config.clip_grad > 0:
                ok, norm, _ = opt.step()  # Megatron's step: main grads, clip, AdamW, copy back
            else:  # the same without clipping, still reporting the norm
                ok = not opt.prepare_grads()
                norm = opt.get_grad_norm()
                ok = ok and opt.step_with_ready_grads()
            if not ok:  # bf16 without a loss scaler never skips; guard the invariant anyway
                raise RuntimeError("a BLD optimizer step was skipped (inf / nan gradients)")
            norms.append(float(norm))
        return norms

    def reload_model_params(self) -> None:
        """Copy the model params into the fp32 main params (after loading new weights)."""
        for opt in self.optimizers.values():
            opt.reload_model_params()

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    # -- resumable state: model param -> (main param, torch AdamW state of the main param)
    def _mains(self, key: str) -> dict[str, torch.Tensor]:
        """Parameter name -> the tensor the inner AdamW updates (its fp32 main param)."""
        opt = self.optimizers[key]
        by_param = {}
        for model_group, main_group in zip(getattr(opt, "float16_groups", []),
                                           getattr(opt, "fp32_from_float16_groups", [])):
            by_param.update({id(p): m for p, m in zip(model_group, main_group)})
        return {n: by_param.get(id(p), p) for n, p in self.names[key].items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, opt in self.optimizers.items():
            for n, main in self._mains(key).items():
                if main is not self.names[key][n]:
                    out[f"{n}/main_param"] = main.detach()
                for k, v in opt.optimizer.state.get(main, {}).items():
                    if torch.is_tensor(v):
                        out[f"{n}/{k}"] = v
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore main params and AdamW moments; the model params are restored by the caller."""
        for key, opt in self.optimizers.items():
            mains = self._mains(key)
            with torch.no_grad():
                for n, main in mains.items():
                    if main is not self.names[key][n]:
                        saved = tensors.get(f"{n}/main_param")
                        if saved is None:
                            raise KeyError(f"{n}/main_param missing from the optimizer state")
                        main.copy_(saved)
                    for k in ("exp_avg", "exp_avg_sq", "step"):
                        v = tensors.get(f"{n}/{k}")
                        if v is not None:
                            opt.optimizer.state[main][k] = v.to(main.device) if k != "step" else v
