"""The streamed FP8 export resumes after a kill: a restart with the same inputs skips the layers done
and writes the uninterrupted export's bytes; other inputs start over (checkpoints/fp8_resume.py).
The kill is megapuzzle.train.faults' (after layer k's checkpoint, nothing else saved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megapuzzle.train.faults import Killed, kill_after, recording
from test_fp8_stream import HETERO, _checkpoint

SHARD = "40KB"  # small enough that shards fill and are written mid-export (the resume re-adds the open one)


def _calib(tmp: Path) -> str:
    from megapuzzle.data.datasets import write_indexed_dataset

    rng = np.random.default_rng(0)
    write_indexed_dataset(tmp / "calib", [rng.integers(0, 300, 200).tolist() for _ in range(4)], vocab_size=300)
    return str(tmp / "calib")


def _export(ckpt: Path, out: Path, calib: str, batches: int = 2) -> dict:
    from megapuzzle.checkpoints.quantize_fp8 import export_fp8

    return export_fp8(ckpt, out, calib_data=calib, calib_batches=batches, calib_batch_size=2, calib_seq_len=16,
                      max_shard_size=SHARD)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoint, the calibration data and the uninterrupted export."""
    tmp = tmp_path_factory.mktemp("fp8_resume")
    ckpt, calib = _checkpoint(tmp, HETERO, False), _calib(tmp)
    with recording("export-fp8") as done:
        summary = _export(ckpt, tmp / "ref", calib)
    assert done == list(range(len(HETERO)))
    files = _files(tmp / "ref")
    assert len([f for f in files if f.endswith(".safetensors")]) > 2  # shards were written mid-export
    return ckpt, calib, summary, files


@pytest.mark.parametrize("k", [2, len(HETERO)], ids=["mid", "after-last-layer"])
def test_killed_export_resumes_bitwise(tmp_path, reference, k):
    from megapuzzle.checkpoints.fp8_resume import work_dir

    ckpt, calib, summary, ref = reference
    out = tmp_path / "fp8"
    with recording("export-fp8") as first, kill_after("export-fp8", k), pytest.raises(Killed):
        _export(ckpt, out, calib)
    assert first == list(range(k)) and not out.exists() and (work_dir(out) / "state.json").is_file()
    with recording("export-fp8") as second:
        again = _export(ckpt, out, calib)
    assert second == list(range(k, len(HETERO)))  # the done layers are skipped
    assert again == summary
    assert _files(out) == ref  # every file, byte for byte
    assert not work_dir(out).exists()


def test_other_inputs_start_over(tmp_path, reference):
    ckpt, calib, _, _ = reference
    out = tmp_path / "fp8"
    with kill_after("export-fp8", 3), pytest.raises(Killed):
        _export(ckpt, out, calib)
    with recording("export-fp8") as redo:
        _export(ckpt, out, calib, batches=3)  # other calibration tokens: nothing done counts
    assert redo == list(range(len(HETERO)))
    _export(ckpt, tmp_path / "fresh", calib, batches=3)
    assert _files(out) == _files(tmp_path / "fresh")


def test_shard_writer_resumes_and_survives_a_kill_inside_close(tmp_path):
    """ShardWriter.state / resumed: re-adding what came after the state gives the same files, also
    when a kill inside close() had already given some shards their final names."""
    import os

    from megapuzzle.checkpoints.shards import ShardWriter

    g = torch.Generator().manual_seed(0)
    tensors = [(f"model.layers.{i}.mlp.w", torch.randn(40, 40, generator=g)) for i in range(7)]
    tensors.append(("lm_head.weight", torch.randn(10, 40, generator=g)))
    limit = 3 * 40 * 40 * 4  # three layers per shard

    def write(d: Path, stop: int | None = None):
        w = ShardWriter(d, limit)
        for n, (name, t) in enumerate(tensors):
            w.add(name, t)
            if n == stop:
                return w.state()
        w.close()

    write(tmp_path / "ref")
    for stop, kill_in_close in ((4, False), (6, True)):
        d = tmp_path / f"resumed{stop}"
        state = write(d, stop)
        assert [len(names) for _, names in state["files"]] == [3]  # one shard written, layers 3-4 pending
        if kill_in_close:  # close() had renamed the written shard when the kill came
            os.replace(d / "model-00001.safetensors", d / "model-00001-of-00003.safetensors")
        w = ShardWriter.resumed(d, limit, state)
        flushed = {n for _, names in state["files"] for n in names}
        for name, t in tensors:
            if name not in flushed:
                w.add(name, t)
        w.close()
        assert _files(d) == _files(tmp_path / "ref")
