"""Readers (text, jsonl), Megatron indexed datasets (.bin/.idx), packed training windows.

Storage is Megatron's own format (`megatron.core.datasets.indexed_dataset`), so a prefix
written here trains with Megatron-LM as-is and Megatron-LM's `preprocess_data.py --append-eod`
output trains here. One sequence per document, each ending in EOS; token dtype uint16 when
the vocabulary fits (< 65500, Megatron's rule), else int32 (Megatron's DType has no uint32).

Training reads the whole .bin as one token stream (documents already separated by EOS) and
cuts windows of seq_len+1 tokens. The batch of step k is a pure function of (seed, k), so a
resumed run sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from megapuzzle.errors import UserError
from megapuzzle.fileio import atomic_write_json, sha256_file

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataError(UserError, ValueError):
    """Bad user input; the message is one line naming the problem and the fix. A UserError,
    so `megapuzzle` prints it as one line and exits 2; a ValueError for library callers."""


# ----------------------------------------------------------------------------- readers

def read_text_file(path: str | os.PathLike) -> str:
    p = Path(path)
    try:
        return p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: file not found; check the --input path") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None


def iter_jsonl_texts(path: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
    """The `text_key` string of every non-blank line; a bad line raises DataError(file:line)."""
    p = Path(path)
    try:
        fh = open(p, "rb")
    except FileNotFoundError:
        raise DataError(f"{p}: file not found; check the --input path") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{p}:{lineno}: not a valid UTF-8 JSON line ({e}); fix or remove that line") from None
            if not isinstance(obj, dict) or text_key not in obj:
                raise DataError(f"{p}:{lineno}: no {text_key!r} field; every jsonl line needs "
                                f"{{\"{text_key}\": \"...\"}} (or pass --text-key NAME)")
            text = obj[text_key]
            if not isinstance(text, str):
                raise DataError(f"{p}:{lineno}: {text_key!r} is {type(text).__name__}, not a string; "
                                f"store the document text as a JSON string")
            yield text


def input_kind(path: str | os.PathLike) -> str:
    """'text' or 'jsonl' by extension; DataError otherwise."""
    p = Path(path)
    suf = p.suffix.lower()
    if suf in JSONL_SUFFIXES:
        return "jsonl"
    if suf in TEXT_SUFFIXES:
        return "text"
    raise DataError(f"{p}: unknown extension {suf or '(none)'!r}; use {'/'.join(JSONL_SUFFIXES)} "
                    f"(one {{\"text\": ...}} per line) or {'/'.join(TEXT_SUFFIXES)} (one document per file)")


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files given, directories expanded to their known-extension files (sorted); validates
    everything up front so a bad input fails before any output is touched."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise DataError(f"{p}: directory has no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            out.extend(found)
        elif p.is_file():
            input_kind(p)
            out.append(p)
        else:
            raise DataError(f"{p}: file not found; check the --input path")
    return out


def iter_documents(paths: Sequence[str | os.PathLike], text_key: str = "text") -> Iterator[str]:
    for p in paths:
        if input_kind(p) == "jsonl":
            yield from iter_jsonl_texts(p, text_key)
        else:
            yield read_text_file(p)


# ----------------------------------------------------------------------------- indexed datasets

def token_dtype(vocab_size: int) -> type:
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


class IndexedDatasetWriter:
    """Stream documents into PREFIX.bin/.idx atomically.

    Writes go to temp names beside the target. `commit()` fsyncs both, removes the old .idx
    (and the old PREFIX.json metadata), renames the .bin, then the .idx: a crash at any point
    leaves the old pair, no .idx (incomplete: readers refuse), or the new pair — never a new
    .bin with an old .idx.
    `abort()` (also on an exception inside `with`) deletes the temps; old outputs stay.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = str(prefix)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        d = Path(self.prefix).parent
        d.mkdir(parents=True, exist_ok=True)
        fd, self._tmp_bin = tempfile.mkstemp(dir=d, prefix=f".{Path(self.prefix).name}.", suffix=".bin.tmp")
        os.close(fd)
        self._tmp_idx = self._tmp_bin[: -len(".bin.tmp")] + ".idx.tmp"
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=self.dtype)
        self.docs = 0
        self.tokens = 0
        self._done = False

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"token id out of range [0, {self.vocab_size}) in document {self.docs}")
        self._builder.add_document(arr.astype(self.dtype), [int(arr.size)])
        self.docs += 1
        self.tokens += int(arr.size)

    def commit(self) -> dict:
        b = self._builder
        b.finalize(self._tmp_idx)  # closes the .bin, writes the .idx
        mode = _default_file_mode()
        for f in (self._tmp_bin, self._tmp_idx):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, mode)  # mkstemp makes 0600; data should be as readable as a plain open()
        idx, binp = self.prefix + ".idx", self.prefix + ".bin"
        for stale in (idx, self.prefix + ".json"):  # the old .json describes the old pair
            if os.path.exists(stale):
                os.unlink(stale)
        os.replace(self._tmp_bin, binp)
        os.replace(self._tmp_idx, idx)
        self._done = True
        return {"docs": self.docs, "tokens": self.tokens, "dtype": np.dtype(self.dtype).name}

    def abort(self) -> None:
        if self._done:
            return
        try:
            self._builder.data_file.close()
        except Exception:
            pass
        for f in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(f):
                os.unlink(f)
        self._done = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.abort()  # left without commit(): nothing is published


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_indexed_dataset(prefix: str | os.PathLike, docs: Iterable[Sequence[int]], vocab_size: int,
                          meta: dict | None = None) -> dict:
    """Write token lists as one Megatron document each (caller appends EOS). Returns stats;
    with `meta`, also writes PREFIX.json (stats + meta + the .idx checksum)."""
    with IndexedDatasetWriter(prefix, vocab_size) as w:
        for d in docs:
            w.add_document(d)
        stats = w.commit()
    if meta is not None:
        write_dataset_meta(prefix, {**stats, **meta})
    return stats


def write_dataset_meta(prefix: str | os.PathLike, meta: dict) -> None:
    prefix = str(prefix)
    atomic_write_json(prefix + ".json", {**meta, "idx_sha256": sha256_file(prefix + ".idx"),
                                         "bin_bytes": os.path.getsize(prefix + ".bin")})


def read_dataset_meta(prefix: str | os.PathLike) -> dict | None:
    f = Path(str(prefix) + ".json")
    return json.loads(f.read_text()) if f.is_file() else None


def open_indexed_dataset(prefix: str | os.PathLike):
    """megatron IndexedDataset for PREFIX, after checking the pair is complete and consistent.

    Keep the returned object alive while using arrays read from it: they are views of its
    mmap, which megatron closes in __del__ (a dangling view segfaults).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if not os.path.exists(prefix + ext):
            raise DataError(f"{prefix}{ext}: missing; (re)run `megapuzzle prepare-data ... --out {prefix}`")
    ds = IndexedDataset(prefix, mmap=True)
    expect = int(np.asarray(ds.sequence_lengths, dtype=np.int64).sum()) * np.dtype(ds.index.dtype).itemsize
    have = os.path.getsize(prefix + ".bin")
    if have != expect:
        raise DataError(f"{prefix}.bin: {have} bytes but the .idx describes {expect}; the pair is from "
                        f"different runs, re-run prepare-data")
    return ds


# ----------------------------------------------------------------------------- packed windows

class PackedSequenceDataset:
    """Fixed-length [seq_len+1] windows over the concatenated token stream.

    Training (`batch`/`batches`): epoch e of a run with `seed` uses a random start shift in
    [0, seq_len) and a random permutation of the n = (N - seq_len) // seq_len windows
    `tokens[shift + i*seq_len : shift + i*seq_len + seq_len + 1]`, both drawn from
    numpy's PCG64 seeded with (seed, e). Global sample s = step*batch_size + row lives in
    epoch s // n at position s % n. Every window is seen once per epoch; the shift moves the
    window boundaries between epochs (the embedded corpus is small and seen many times).
    Nothing depends on how many batches were drawn before: resume = start_step.

    Evaluation (`eval_batches`): windows i*seq_len from token 0, in order, no randomness.

    `batch_size` is the GLOBAL batch; with world_size > 1 each data-parallel rank gets rows
    [rank*B/ws, (rank+1)*B/ws) of it, so the global batch does not depend on the DP size.
    """

    def __init__(self, tokens: np.ndarray, *, num_docs: int | None = None, source: str | None = None):
        self.tokens = tokens
        self.num_tokens = int(tokens.shape[0])
        self.num_docs = num_docs
        self.source = source
        self._epochs: OrderedDict[tuple, tuple[int, np.ndarray]] = OrderedDict()

    @classmethod
    def from_prefix(cls, prefix: str | os.PathLike) -> "PackedSequenceDataset":
        """Memmap PREFIX.bin (validated through megatron's IndexedDataset) as one token array."""
        ds = open_indexed_dataset(prefix)
        dtype = np.dtype(ds.index.dtype)
        num_docs = len(ds)
        del ds  # release megatron's mmap; numpy keeps its own read-only one
        if os.path.getsize(str(prefix) + ".bin") == 0:
            raise DataError(f"{prefix}.bin: dataset is empty; prepare it from non-empty input")
        toks = np.memmap(str(prefix) + ".bin", dtype=dtype, mode="r")
        return cls(toks, num_docs=num_docs, source=str(prefix))

    @classmethod
    def from_tokens(cls, tokens: Sequence[int] | np.ndarray) -> "PackedSequenceDataset":
        return cls(np.asarray(tokens), source="<memory>")

    # -- training -------------------------------------------------------------------------

    def windows_per_epoch(self, seq_len: int) -> int:
        n = (self.num_tokens - seq_len) // seq_len
        if n < 1:
            raise DataError(f"{self.source}: {self.num_tokens} tokens cannot fill one training window of "
                            f"seq_len+1={seq_len + 1} (plus shift room {seq_len}); use a smaller seq_len or more data")
        return n

    def _epoch(self, seed: int, epoch: int, seq_len: int, n: int) -> tuple[int, np.ndarray]:
        key = (seed, epoch, seq_len)
        hit = self._epochs.get(key)
        if hit is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
            shift = int(rng.integers(0, seq_len))
            perm = rng.permutation(n)
            hit = (shift, perm)
            self._epochs[key] = hit
            while len(self._epochs) > 4:  # a batch spans at most two epochs; keep a few
                self._epochs.popitem(last=False)
        return hit

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, *, rank: int = 0,
              world_size: int = 1):
        """int64 torch tensor [batch_size // world_size, seq_len + 1]: the rows of global
        batch `step` that belong to data-parallel `rank`. Pure function of its arguments."""
        import torch

        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
        n = self.windows_per_epoch(seq_len)
        per = batch_size // world_size
        first = step * batch_size + rank * per
        out = np.empty((per, seq_len + 1), dtype=np.int64)
        for r in range(per):
            s = first + r
            shift, perm = self._epoch(seed, s // n, seq_len, n)
            start = shift + int(perm[s % n]) * seq_len
            out[r] = self.tokens[start:start + seq_len + 1]
        return torch.from_numpy(out)

    def batches(self, batch_size: int, seq_len: int, seed: int, start_step: int = 0,
                num_steps: int | None = None, *, rank: int = 0, world_size: int = 1):
        """Yields (step, batch) from start_step, forever or for num_steps."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield step, self.batch(step, batch_size, seq_len, seed, rank=rank, world_size=world_size)
            step += 1

    # -- evaluation -----------------------------------------------------------------------

    def num_eval_windows(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                     drop_last: bool = False):
        """Fixed held-out batches: consecutive non-overlapping windows from token 0, in order
        (the last batch may be smaller unless drop_last). Identical on every call and rank."""
        import torch

        n = self.num_eval_windows(seq_len)
        if n == 0:
            raise DataError(f"{self.source}: {self.num_tokens} tokens cannot fill one eval window of "
                            f"{seq_len + 1}; use a smaller seq_len or more held-out data")
        count = 0
        for b0 in range(0, n, batch_size):
            rows = min(batch_size, n - b0)
            if (rows < batch_size and drop_last) or (max_batches is not None and count >= max_batches):
                return
            out = np.empty((rows, seq_len + 1), dtype=np.int64)
            for r in range(rows):
                start = (b0 + r) * seq_len
                out[r] = self.tokens[start:start + seq_len + 1]
            yield torch.from_numpy(out)
            count += 1

    def unigram_entropy(self) -> float:
        return unigram_entropy(self.tokens)


# Same thing, the name the issue used for it.
TokenStream = PackedSequenceDataset


def unigram_entropy(token_ids) -> float:
    """Entropy of the token frequency distribution, nats/token: H = -sum_v p_v ln p_v.

    A model that ignores context can at best reach this cross-entropy, so a parent's
    held-out loss well below it shows the parent learned context. Accepts a list, a numpy
    array / memmap, a torch tensor, or an iterable of those (counted together).
    """
    counts = None

    def add(a) -> None:
        nonlocal counts
        if hasattr(a, "detach"):
            a = a.detach().cpu().numpy()
        a = np.asarray(a).reshape(-1)
        if a.size == 0:
            return
        for i in range(0, a.size, 1 << 24):  # chunks: a memmapped corpus may not fit as int64
            chunk = np.asarray(a[i:i + (1 << 24)])
            if chunk.min() < 0:
                raise ValueError("token ids must be non-negative")
            c = np.bincount(chunk.astype(np.int64, copy=False))
            if counts is None:
                counts = c
            else:
                if c.size > counts.size:
                    c, counts = counts, c
                counts[: c.size] += c

    if isinstance(token_ids, (list, tuple)) and token_ids and not np.isscalar(token_ids[0]):
        for part in token_ids:
            add(part)
    elif isinstance(token_ids, (list, tuple, np.ndarray)) or hasattr(token_ids, "detach"):
        add(token_ids)
    else:
        for part in token_ids:
            add(part)
    if counts is None:
        raise ValueError("unigram_entropy of no tokens")
    p = counts[counts > 0].astype(np.float64) / counts.sum()
    return float(-(p * np.log(p)).sum())
