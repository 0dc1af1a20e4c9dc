"""Stage `export`: the child (after GKD if it ran) as an HF DeciLM directory, optionally FP8 (ModelOpt).

Torch-free: `run_stage` imports the stage's modules when it runs."""

from __future__ import annotations

import logging

from megapuzzle.config import RunDir, section
from megapuzzle.config.pipeline import ExportSection
from megapuzzle.stages.base import Stage

log = logging.getLogger(__name__).info


def run_stage(run: RunDir, cfg: dict) -> dict:
    """What `megapuzzle run` does for this stage: RUN's inputs -> RUN's outputs; the manifest's result."""
    from megapuzzle.checkpoints.export_hf import export_hf

    e = section(cfg, "export", ExportSection)
    src = run.gkd / "checkpoint" if (run.gkd / "checkpoint" / "arch.json").is_file() else run.child
    res = export_hf(src, run.export, dtype=e.dtype, force=True, max_shard_size=e.max_shard_size, target=e.target)
    warnings = res["warnings"]
    for w in warnings:
        log(f"[export] warning: not loadable by {w.rsplit(': ', 1)[-1]}: {w.rsplit(': ', 1)[0]}")
    log(f"[export] {src} -> {run.export} (DeciLMForCausalLM, {res['dtype']})")
    out = {"source": str(src), "warnings": warnings, "dtype": res["dtype"]}
    if e.quantize == "fp8":
        from megapuzzle.checkpoints.quantize_fp8 import export_fp8

        fp8_dir = run.root / "export_fp8"
        res = export_fp8(src, fp8_dir, calib_data=str(run.heldout_data), calib_batches=e.calib_batches,
                         calib_batch_size=e.calib_batch_size, calib_seq_len=e.calib_seq_len, force=True,
                         max_shard_size=e.max_shard_size)
        log(f"[export] {src} -> {fp8_dir} (FP8 E4M3 via ModelOpt: {res['quantized_linears']} Linear layers)")
        out["fp8"] = {"dir": str(fp8_dir), **{k: v for k, v in res.items() if k != "warnings"}}
    return out


STAGE = Stage("export", ("export",), "export-hf", "megapuzzle.checkpoints.export_hf",
              "megapuzzle checkpoint -> HF DeciLM (nemotron-nas) directory",
              "export.sbatch", "megapuzzle.config.pipeline:ExportSection",
              run_stage=run_stage)
