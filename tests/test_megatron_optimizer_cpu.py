"""Megatron-core's DistributedDataParallel and distributed optimizer on CPU over gloo, through
megapuzzle.runtime.cpu_compat (the path GKD and BLD take on a GPU).

DP=2 with half the batch per rank (bucketed grad reduce-scatter averaged over DP, fp32 main
params sharded over DP, Megatron's grad clip) gives the weights of one process on the whole
batch; with bf16 params the optimizer keeps fp32 main params and main grads; overlapped grad
reduce gives the same result as the synchronous one (to fp32 rounding)."""

from __future__ import annotations

import pytest
import torch

from _dist import run_distributed
from megapuzzle.arch import Architecture

ARCH = Architecture.homogeneous(vocab_size=96, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                                intermediate_size=128)
STEPS, BATCH, SEQ = 3, 4, 16


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
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.5, bf16=dtype == torch.bfloat16,
                                                 params_dtype=dtype, use_distributed_optimizer=True), [model])
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
    return {"weights": {n: p.detach().float().clone() for n, p in module.named_parameters()},
            "init": init,
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
    # Compare the updates (weights - init), whole tensors (relative L2). In bf16 the params
    # are the fp32 masters rounded to bf16 (a 2^-8 relative step, the size of a few updates of
    # a norm weight at 1.0), so there DP=2 must stay within the gap bf16 itself opens to fp32.
    def gap(a, b):
        return max(((b["weights"][n] - b["init"][n]) - (a["weights"][n] - a["init"][n])).norm().item()
                   / (a["weights"][n] - a["init"][n]).norm().item() for n in a["weights"])

    for n in one["weights"]:
        assert torch.equal(two[0]["weights"][n], two[1]["weights"][n]), n  # replicas stay identical
    worst = gap(one, two[0])
    if dtype == "float32":
        bound = 1e-5
    else:
        fp32 = run_distributed(_train, world=1, args=("float32", False))[0]
        bound = gap(fp32, one)
    print(f"\n{dtype}: DP=2 vs one process, max relative L2 difference of the updates {worst:.3g} "
          f"(bound {bound:.3g})")
    assert worst <= bound
    assert two[0]["norms"] == pytest.approx(one["norms"], rel=1e-4 if dtype == "float32" else 2e-2)
    assert one["losses"][-1] < one["losses"][0]
    if dtype == "bfloat16":
        assert one["param_dtypes"] == {"torch.bfloat16"}
        assert one["main_dtypes"] == {"torch.float32"} and one["grad_buffer_dtypes"] == {"torch.float32"}


def test_overlapped_grad_reduce_matches_the_synchronous_one():
    sync = run_distributed(_train, world=2, args=("float32", False))
    ovl = run_distributed(_train, world=2, args=("float32", True))
    worst = max(((ovl[0]["weights"][n] - w).abs().max() / w.abs().max()).item() for n, w in sync[0]["weights"].items())
    print(f"\noverlapped vs synchronous grad reduce: max relative difference {worst:.3g}")
    assert worst < 1e-5  # the same sums, bucket by bucket: rounding order only
