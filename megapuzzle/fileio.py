"""Atomic file writes and checksums: every file megapuzzle writes goes through here.

A write goes to a temp file in the same directory, is fsynced, then renamed over the
target, so a kill at any moment leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from megapuzzle.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move a fully written directory `tmp` to `out`, replacing any old `out` by a swap then a
    delete, so a crash leaves either the old directory or the new one, never a mix."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def replace_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the directory `src` over `dst` atomically (a kill leaves the old copy or the new one)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, dst)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _sort_safetensors_metadata(path: str) -> None:
    """Put the header's __metadata__ keys in sorted order, in place, so the same tensors and metadata
    always give the same bytes (safetensors writes them in Rust HashMap order, which varies from call to
    call: a library block's checksum would change from run to run). Only when re-serializing the header
    as parsed reproduces it exactly; the header's length, hence every offset, is unchanged."""
    with open(path, "rb+") as fh:
        n = int.from_bytes(fh.read(8), "little")
        raw = fh.read(n)
        text = raw.rstrip(b" ").decode("utf-8")
        header = json.loads(text)
        meta = header.get("__metadata__")
        if not meta or json.dumps(header, separators=(",", ":"), ensure_ascii=False) != text:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        fh.seek(8)
        fh.write(new.ljust(n, b" "))


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, atomically (tensors made contiguous, CPU). Written straight to
    the temp file, not through one bytes object: a 5 GB shard must not cost 10 GB to save."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)  # (re)creates the file: set the usual mode after
        _sort_safetensors_metadata(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, fix: str) -> Iterator[Any]:
    """`safetensors.safe_open(path)` (lazy, per-tensor reads) whose failures on a file we did not
    write, or one damaged since, become one-line UserErrors naming the file and `fix` (what to do).
    Never unpickles: safetensors only."""
    from safetensors import SafetensorError, safe_open

    def bad(e: Exception) -> UserError:
        reason = " ".join(str(e).split()) or type(e).__name__
        return UserError(f"{path} is not a readable safetensors file ({reason}); {fix}")

    try:  # a truncated or corrupt header fails here, before any tensor is mapped
        fh = safe_open(str(path), "pt")
    except (SafetensorError, OSError) as e:
        raise bad(e) from None
    try:
        yield fh
    except SafetensorError as e:  # a tensor's bytes that do not match its header entry
        raise bad(e) from None
    finally:
        del fh


def read_safetensors(path: str | os.PathLike, fix: str) -> dict:
    """Every tensor of one safetensors file, with `open_safetensors`' one-line errors."""
    with open_safetensors(path, fix) as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def weights_fingerprint(path: str | os.PathLike, full_below: int = 4 << 30, samples: int = 64,
                        chunk: int = 1 << 16) -> str:
    """Content fingerprint of a weights file, to tell whether a stage's input changed.

    Files up to `full_below` bytes are hashed whole (every weight counts); bigger ones (100+ GB
    checkpoints) by their size and `samples` evenly spaced chunks, the first of which holds
    the safetensors header (names, shapes, dtypes)."""
    size = os.stat(path).st_size
    if size <= full_below:
        return sha256_file(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for i in range(samples):
            fh.seek(max(0, size - chunk) * i // max(samples - 1, 1))
            h.update(fh.read(chunk))
    return "sampled:" + h.hexdigest()


def save_figure_atomic(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically (a temp file beside it, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
