"""Fused-run blocks on a debug run (RUN=/tmp/fusion_work/debug_run from `megapuzzle run examples/debug.yaml`):
fold init vs 40 BLD steps, NMSE and replace-the-run KL. Results: benchmarks/results/fusion.md."""
import torch; torch.set_num_threads(1)
from pathlib import Path
from megapuzzle.checkpoints.canonical import load_checkpoint
from megapuzzle.fusion_blocks import init_run_block, score_run_block, train_run_block
r = Path("/tmp/fusion_work/debug_run"); ck, d = r / "parent", r / "data"
parent, t, _ = load_checkpoint(ck, dtype=torch.float32)
print("| run | block | NMSE fold -> BLD | KL fold | KL BLD | top-1 agree fold -> BLD |")
print("|---|---|---|---:|---:|---|")
for i, j in ((0, 1), (1, 2), (2, 3), (1, 3)):
    layer, local = init_run_block(parent, t, i, j)
    res = train_run_block(ck, d / "train", d / "heldout", i, j, steps=40, batch_size=4, seq_len=32, lr=2e-3)
    a = score_run_block(ck, d / "heldout", i, j, layer, local, seq_len=32, num_batches=4)
    b = score_run_block(ck, d / "heldout", i, j, res.layer, res.tensors, seq_len=32, num_batches=4)
    print(f"| {i}-{j} | {layer.name} | {res.nmse_init:.4f} -> {res.nmse_final:.4f} | {a['kl_to_parent']:.4f} | {b['kl_to_parent']:.4f} | {a['top1_agreement']:.3f} -> {b['top1_agreement']:.3f} |")
