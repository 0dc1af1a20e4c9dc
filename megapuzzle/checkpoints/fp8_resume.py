"""Resume for the streamed FP8 export after a kill -9 (at 405B its calibration walks 126 layers).

`export-hf --quantize fp8 --out OUT` works in OUT's sibling `.OUT.fp8-work/`, removed once OUT is in
place:

    inputs.json              what is exported: the checkpoint's weights fingerprint, the calibration
                             tokens' sha256 and shape, the shard size, the device. A restart with the
                             same inputs resumes; any other (or a damaged work dir) starts over.
    out/                     the export being written (the shard writer's directory: finished shards
                             under their temp names), renamed to OUT at the end
    layer-00007.safetensors  layer 7's exported tensors (FP8 weights, scales, bf16 norms), kept only
                             until a finished shard holds them
    hidden-00008/            the calibration hidden states after layer 7, layer 8's inputs (fp32), one
                             file per batch (batch-00000.safetensors, ...), so a GPU's cache reaches
                             the host one batch at a time
    state.json               {"done": 8, "writer": the shard writer's state, "amax": the summary's
                             input amaxes}, written last, so it never names a file not yet complete

Disk cost beyond the export itself: the hidden states, batches x batch_size x seq_len x hidden x 4
bytes, twice for a moment (the previous layer's are deleted once state.json has moved on): 537 MB at
405B with the defaults 8 x 4 x 256, but 17.2 GB with the 405B recipe's 32 x 4 x 2048 (68.7 GB at 128
batches; 34.4 GB at 70B and 8.6 GB at 8B with their recipes), written once per layer (2.2 TB over 126
layers at 405B: at 2 GB/s, 9 s a layer next to minutes of calibration); plus the layer files of the shard being filled (at most one shard + one
layer: 5 GB + 3.2 GB in FP8 at 405B with --max-shard-size 5GB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from megapuzzle.fileio import atomic_write_json, read_safetensors, save_safetensors_atomic

log = logging.getLogger(__name__).info

FORMAT = "megapuzzle-fp8-work/1"


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.fp8-work"


def inputs_key(fingerprint: str, tokens: torch.Tensor, max_shard_bytes: int, device: str) -> dict:
    """What a resume must match: the same weights, calibration tokens, shard size and device (a GPU's
    kernels give other fp32 hidden states than the CPU's)."""
    digest = hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"format": FORMAT, "checkpoint": fingerprint, "tokens_sha256": digest, "tokens_shape": list(tokens.shape),
            "max_shard_bytes": int(max_shard_bytes), "device": device}


class Progress:
    """The work dir of one export: what is done, and the per-layer checkpoints."""

    def __init__(self, work: Path, key: dict):
        self.work, self.out = Path(work), Path(work) / "out"
        self.state: dict | None = None
        try:
            same = json.loads((self.work / "inputs.json").read_text()) == key
            state = json.loads((self.work / "state.json").read_text()) if same else None
            if state is not None and self.out.is_dir() and self._hidden_path(state["done"]).is_dir():
                self.state = state
                if not all(self._layer_path(j).is_file() for j in self.pending()):
                    self.state = None
        except (OSError, ValueError, KeyError):
            pass
        if self.state is None:
            if self.work.exists():
                log(f"[export-hf] fp8: {self.work} is of other inputs or incomplete; starting over")
            shutil.rmtree(self.work, ignore_errors=True)
            self.out.mkdir(parents=True)
            atomic_write_json(self.work / "inputs.json", key)
        else:
            log(f"[export-hf] fp8: resuming from {self.work}: {self.state['done']} layer(s) done")
            for p in self.out.iterdir():  # what a kill left half-written: atomic writes' temp files, temp dirs
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.name.startswith("."):
                    p.unlink()
            for p in self.work.glob("hidden-*"):  # a kill before state.json moved on, or before the delete
                if p != self._hidden_path(self.done):
                    shutil.rmtree(p)

    @property
    def done(self) -> int:
        return self.state["done"] if self.state else 0

    def _hidden_path(self, done: int) -> Path:
        return self.work / f"hidden-{done:05d}"

    def _layer_path(self, i: int) -> Path:
        return self.work / f"layer-{i:05d}.safetensors"

    def hidden(self, device: str) -> list[torch.Tensor]:
        """The calibration hidden states at layer `done`'s input (one per batch), on `device`, read one
        batch at a time."""
        d, fix = self._hidden_path(self.done), f"remove {self.work} and export again"
        return [read_safetensors(f, fix=fix)["hidden"].to(device) for f in sorted(d.glob("batch-*.safetensors"))]

    def amax(self) -> list[float]:
        return list(self.state["amax"]) if self.state else []

    def writer_state(self) -> dict | None:
        return self.state["writer"] if self.state else None

    def layer_tensors(self, i: int) -> list[tuple[str, torch.Tensor]]:
        """Layer i's exported tensors, in the order they were added to the writer."""
        from safetensors import safe_open

        with safe_open(self._layer_path(i), framework="pt") as f:
            order = json.loads(f.metadata()["order"])
            return [(n, f.get_tensor(n)) for n in order]

    def save(self, i: int, tensors: list[tuple[str, torch.Tensor]], hidden: list[torch.Tensor], amax: list[float],
             writer_state: dict) -> None:
        """Layer i is exported (its tensors added to the writer) and `hidden` are its outputs: checkpoint
        both, then move state.json on, then drop what it no longer names."""
        save_safetensors_atomic({n: t.contiguous() for n, t in tensors}, self._layer_path(i),
                                metadata={"order": json.dumps([n for n, _ in tensors])})
        d = self._hidden_path(i + 1)
        shutil.rmtree(d, ignore_errors=True)  # a kill's half-written one
        for j, h in enumerate(hidden):
            save_safetensors_atomic({"hidden": h}, d / f"batch-{j:05d}.safetensors")
        self.state = {"done": i + 1, "writer": writer_state, "amax": list(amax)}
        atomic_write_json(self.work / "state.json", self.state)
        shutil.rmtree(self._hidden_path(i), ignore_errors=True)
        flushed = self.flushed()
        for j in range(i + 1):
            if j in flushed:
                self._layer_path(j).unlink(missing_ok=True)

    def flushed(self) -> set[int]:
        """The layers a finished shard holds (a layer never straddles two shards)."""
        names = (n for _, ns in (self.state or {"writer": {"files": []}})["writer"]["files"] for n in ns)
        return {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}

    def pending(self) -> list[int]:
        """Done layers no finished shard holds yet: their tensors go to the writer again on resume."""
        flushed = self.flushed()
        return [j for j in range(self.done) if j not in flushed]

    def finish(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
