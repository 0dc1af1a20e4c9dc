"""Sharded safetensors directories: written as shards fill, read lazily a tensor (or a slice) at a time.

The canonical checkpoint and the HF export share HF's own layout: one `model.safetensors` when
everything fits in one shard, else `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {name: file}}).

Why: a 70B parent is 140 GB in bf16. Whole-file loads put the whole model in every rank's
memory (3-6x a rank's share, measured); here a writer holds at most one shard plus one layer,
and a reader hands out single tensors or row/column slices (`safe_open(...).get_slice`) cast
to the wanted dtype as they are read, so a TP/PP rank only ever touches what it owns.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json, open_safetensors, save_safetensors_atomic, weights_fingerprint

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # "5GB" as parse_size reads it

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def parse_size(text: str) -> int:
    """"2GB", "500MB", "64KB" (binary units) or a byte count -> bytes; one-line UserError otherwise."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * m)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise UserError(f"cannot read size {text!r}; write e.g. 2GB, 500MB or a byte count")


def layer_group(name: str) -> str:
    """Tensors with the same group stay in one shard: a layer's tensors are never split."""
    if name.startswith("model.layers."):
        return ".".join(name.split(".")[:3])
    return name


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------- write

class ShardWriter:
    """Add tensors in file order; a shard is written (atomically) as soon as the next layer would
    overflow it, so memory holds at most one shard plus one layer. `close()` names the shards
    `-of-N` (or `model.safetensors` when there is one) and writes the index. Write into a temp
    directory that is renamed into place afterwards: the intermediate names never show."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict | None = None):
        if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise UserError(f"max shard size must be a positive byte count, got {max_shard_bytes!r}")
        self.dir, self.max, self.metadata = Path(out_dir), max_shard_bytes, metadata
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._group: dict[str, torch.Tensor] = {}
        self._group_key: str | None = None
        self._files: list[tuple[str, list[str]]] = []  # (temp file name, tensor names)
        self._seen: set[str] = set()
        self.total_size = 0
        self._flushed_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        key = layer_group(name)
        if key != self._group_key:
            self._commit_group()
            self._group_key = key
        self._group[name] = tensor.detach().cpu()
        self.total_size += nbytes(tensor)

    def _commit_group(self) -> None:
        size = sum(nbytes(t) for t in self._group.values())
        if self._shard and self._shard_bytes + size > self.max:
            self._flush()
        self._shard.update(self._group)
        self._shard_bytes += size
        self._group = {}

    def _flush(self) -> None:
        name = f"model-{len(self._files) + 1:05d}.safetensors"
        save_safetensors_atomic(self._shard, self.dir / name, metadata=self.metadata)
        self._files.append((name, list(self._shard)))
        self._flushed_bytes += sum(nbytes(t) for t in self._shard.values())
        self._shard, self._shard_bytes = {}, 0

    def state(self) -> dict:
        """What `resumed` needs to go on after a kill: the shards written so far (temp names, tensor
        names in order) and their bytes. Tensors added since are not in it: the caller re-adds them."""
        return {"files": [[f, list(names)] for f, names in self._files], "bytes": self._flushed_bytes}

    @classmethod
    def resumed(cls, out_dir: str | os.PathLike, max_shard_bytes: int, state: dict,
                metadata: dict | None = None) -> "ShardWriter":
        """A writer that continues `state` (from `state()`) in `out_dir`: re-adding, in their order, the
        tensors added after that state gives the same files as a writer that never stopped. A shard that
        a kill inside `close()` already gave its final name is named back; FileNotFoundError when one is
        gone."""
        w = cls(out_dir, max_shard_bytes, metadata)
        for i, (name, names) in enumerate(state["files"], start=1):
            if not (w.dir / name).is_file():
                renamed = sorted(w.dir.glob(f"model-{i:05d}-of-*.safetensors"))
                if len(renamed) != 1:
                    raise FileNotFoundError(w.dir / name)
                os.replace(renamed[0], w.dir / name)
            w._files.append((name, list(names)))
            w._seen.update(names)
        w.total_size = w._flushed_bytes = int(state["bytes"])
        return w

    def close(self) -> dict[str, str]:
        """Write the last shard, the final names and the index; returns the weight map."""
        self._commit_group()
        if self._shard or not self._files:
            self._flush()
        n = len(self._files)
        weight_map: dict[str, str] = {}
        for i, (tmp_name, names) in enumerate(self._files, start=1):
            final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp_name, self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            atomic_write_json(self.dir / INDEX_FILE, {"metadata": {"total_size": self.total_size},
                                                       "weight_map": weight_map})
        return weight_map


# ----------------------------------------------------------------------------- read

DEFAULT_FIX = "re-create or re-download it"


def read_header(path: Path, fix: str = DEFAULT_FIX) -> dict[str, dict]:
    """{name: {"dtype", "shape", ...}} from a safetensors header (8-byte length + json), no data read;
    a damaged header is a one-line UserError naming the file and `fix` (what to do)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(os.fstat(fh.fileno()).st_size, 1 << 30):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a json object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); {fix}") from None
    header.pop("__metadata__", None)
    return header


def safetensors_files(d: Path) -> list[str]:
    """The weight files of a directory: the index's shards, else model.safetensors, else every *.safetensors."""
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is malformed ({e}); re-save the model with save_pretrained") from None
        for f in files:
            if not (d / f).is_file():
                raise UserError(f"{d} lacks shard {f} named in {INDEX_FILE}; the copy or download is incomplete")
        return files
    if (d / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    return sorted(p.name for p in d.glob("*.safetensors"))


class SafetensorsReader(Mapping):
    """A read-only Mapping name -> tensor over a safetensors directory, reading on access.

    Every access opens the file, copies out the tensor (or a row / column slice of it) into a
    fresh tensor of `dtype` (None: the stored dtype) and closes it, so nothing stays mapped and
    a caller holds only what it keeps. `keep` limits the names (e.g. drop HF's rotary buffers);
    `order` sets the iteration order (default: file order); `fix` ends the one-line error for a
    damaged file (what to do about it)."""

    def __init__(self, d: str | os.PathLike, *, dtype: torch.dtype | None = None, keep=None,
                 order: list[str] | None = None, fix: str = DEFAULT_FIX):
        self.dir, self.dtype, self.fix = Path(d), dtype, fix
        self._meta: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
        self.files = safetensors_files(self.dir)
        for f in self.files:
            for name, info in read_header(self.dir / f, fix).items():
                if keep is not None and not keep(name):
                    continue
                st = info.get("dtype") if isinstance(info, dict) else None
                if st not in _ST_DTYPES:
                    raise UserError(f"{self.dir / f}: tensor {name} has unsupported dtype {st!r}")
                self._meta[name] = (self.dir / f, tuple(info["shape"]), _ST_DTYPES[st])
        names = list(self._meta)
        if order is not None:
            first = [n for n in order if n in self._meta]
            seen = set(first)
            names = first + [n for n in names if n not in seen]
        self._order = names

    # -- Mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, name) -> bool:
        return name in self._meta

    def with_dtype(self, dtype: torch.dtype | None) -> SafetensorsReader:
        """The same files, read as `dtype` (headers are not parsed again)."""
        other = copy.copy(self)
        other.dtype = dtype
        return other

    # -- metadata (no data read)
    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._meta[name][2]

    def out_dtype(self, name: str) -> torch.dtype:
        """The dtype `read` returns for `name`: the cast, for floating-point tensors, else the stored one."""
        st = self._meta[name][2]
        return self.dtype if self.dtype is not None and st.is_floating_point else st

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n * torch.empty((), dtype=self.out_dtype(name)).element_size()

    # -- data
    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor, or rows[, cols] of it, as a fresh contiguous tensor in `out_dtype(name)`."""
        if name not in self._meta:
            raise KeyError(name)
        with open_safetensors(self._meta[name][0], self.fix) as f:
            sl = f.get_slice(name)
            x = sl[rows if rows is not None else slice(None), cols] if cols is not None else \
                sl[rows] if rows is not None else sl[:]
            # copy out of the file mapping now: the mapping goes away with the handle
            out = torch.empty(x.shape, dtype=self.out_dtype(name))
            out.copy_(x)
            del x, sl
        return out

    def fingerprint(self) -> str:
        """Content fingerprint (megapuzzle.fileio.weights_fingerprint); a single file keeps its own."""
        if self.files == [SINGLE_FILE]:
            return weights_fingerprint(self.dir / SINGLE_FILE)
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f}:{weights_fingerprint(self.dir / f)}\n".encode())
        return "shards:" + h.hexdigest()
