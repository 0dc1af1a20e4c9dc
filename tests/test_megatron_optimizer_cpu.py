"""Megatron-core's DistributedDataParallel and distributed optimizer on CPU over gloo, through
megapuzzle.runtime.cpu_compat (the path GKD and BLD take on a GPU).

DP=2 with half the batch per rank (bucketed grad reduce-scatter averaged over DP, fp32 main
params sharded over DP, Megatron's grad clip) gives the weights of one process on the whole
batch; with bf16 params the optimizer keeps fp32 main params and main grads; overlapped grad
reduce gives the same result as the synchronous one (to fp32 rounding)."""

from __future__ import annotations

import pytest
import torch

from _dist import assert_adamw_parity, run_distributed
from megapuzzle.arch import Architecture

ARCH = Architecture.homogeneous(vocab_size=96, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                                intermediate_size=128)
STEPS, BATCH, SEQ = 3, 4, 16
LR, BETAS = 1e-2, (0.9, 0.999)  # constant LR; Megatron's default Adam betas, spelled out


def _train(info, dtype_name: str, overlap: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megapuzzle.model.gpt import build_gpt_model

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    module = build_gpt_model(ARCH, params_dtype=dtype)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                        use_distributed_optimizer=True, bucket_size=4096)
    model = DistributedDataParallel(config=module.config, ddp_config=ddp, module=module)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                                                 clip_grad=0.5, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                                                 use_distributed_optimizer=True), [model])
    init = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    tokens = torch.randint(0, ARCH.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    per = BATCH // info.dp_size
    mine = tokens[info.dp_rank * per:(info.dp_rank + 1) * per]
    pos = torch.arange(SEQ).unsqueeze(0).expand(per, -1)
    losses, norms = [], []
    for _ in range(STEPS):
        model.zero_grad_buffer()
        opt.zero_grad()
        loss = module(mine[:, :-1], pos, None, labels=mine[:, 1:]).float().mean()
        loss.backward()
        model.finish_grad_sync()  # the DP reduce-scatter (average) of the fp32 grad buffers
        ok, norm, _ = opt.step()
        assert ok
        losses.append(loss.item())
        norms.append(float(norm))
    inner = opt.chained_optimizers[0]
    mains = [p for g in inner.optimizer.param_groups for p in g["params"]]
    # bf16 params: the fp32 main params, this rank's shard of each (zeros elsewhere)
    names, masters = {p: n for n, p in module.named_parameters()}, {}
    for params, shards in zip(inner.model_float16_groups, inner.shard_fp32_from_float16_groups):
        for p, shard in zip(params, shards):
            r = inner._get_model_param_range_map(p)["param"]
            full = torch.zeros(p.numel())
            full[r.start:r.end] = shard.detach()
            masters[names[p]] = full.view(p.shape)
    return {"weights": {n: p.detach().float().clone() for n, p in module.named_parameters()},
            "init": init, "masters": masters,
            "param_dtypes": {str(p.dtype) for p in module.parameters()},
            "main_dtypes": {str(p.dtype) for p in mains},
            "main_numel": sum(p.numel() for p in mains),
            "grad_buffer_dtypes": {str(b.grad_dtype) for b in model.buffers},
            "losses": losses, "norms": norms}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dp2_equals_one_process_on_the_whole_batch(dtype):
    one = run_distributed(_train, world=1, args=(dtype, False))[0]
    two = run_distributed(_train, world=2, args=(dtype, False))
    total = sum(p.numel() for p in one["weights"].values())
    # the fp32 main params are sharded over DP: each rank holds its part, together all of them
    assert one["main_numel"] == total and sum(r["main_numel"] for r in two) == total
    assert max(r["main_numel"] for r in two) < 0.51 * total
    assert two[0]["weights"].keys() == one["weights"].keys()
    for n in one["weights"]:
        assert torch.equal(two[0]["weights"][n], two[1]["weights"][n]), n  # replicas stay identical
    if dtype == "float32":
        # DP=2 sums the half-batch grads in another order: the weights after 3 Adam steps within
        # what that fp32 noise can become through Adam (bounds derived in tests/_dist.py)
        worst = assert_adamw_parity(one["weights"], two[0]["weights"], [LR] * STEPS, BETAS, init=one["init"])
        print(f"\nfloat32: DP=2 vs one process, weights vs their Adam bounds {worst}")
    else:
        # bf16: the params are the fp32 masters rounded to bf16 (2^-8 relative steps, the size of
        # a few updates of a norm weight at 1.0), so compare the masters (gathered from the DP
        # shards). The grads are computed in bf16, which DP=2 rounds in another order: noise of
        # bf16's unit roundoff 2^-9 (doubled), not fp32's, through Adam -- a weaker bound, still
        # under 0.3 x every tensor's update (a DP bug changes the update by O(1)).
        m1 = one["masters"]
        m2 = {n: sum(r["masters"].get(n, 0) for r in two) for n in one["weights"]}
        assert m1.keys() == m2.keys() == one["weights"].keys()
        for run, m in ((one, m1), (two[0], m2)):
            assert all(torch.equal(run["weights"][n], m[n].bfloat16().float()) for n in m)  # params = bf16(masters)
        worst = assert_adamw_parity(m1, m2, [LR] * STEPS, BETAS, init=one["init"], noise=2 ** -8, teeth=0.3)
        print(f"\nbfloat16: DP=2 vs one process, fp32 masters vs their Adam bounds {worst}")
    assert two[0]["norms"] == pytest.approx(one["norms"], rel=1e-4 if dtype == "float32" else 2e-2)
    assert one["losses"][-1] < one["losses"][0]
    if dtype == "bfloat16":
        assert one["param_dtypes"] == {"torch.bfloat16"}
        assert one["main_dtypes"] == {"torch.float32"} and one["grad_buffer_dtypes"] == {"torch.float32"}


def test_overlapped_grad_reduce_matches_the_synchronous_one():
    sync = run_distributed(_train, world=2, args=("float32", False))
    ovl = run_distributed(_train, world=2, args=("float32", True))
    # the same sums, bucket by bucket, up to rounding order (not always the same bits): within what
    # fp32 noise can become through Adam (tests/_dist.py)
    worst = assert_adamw_parity(sync[0]["weights"], ovl[0]["weights"], [LR] * STEPS, BETAS, init=sync[0]["init"])
    print(f"\noverlapped vs synchronous grad reduce: weights vs their Adam bounds {worst}")
