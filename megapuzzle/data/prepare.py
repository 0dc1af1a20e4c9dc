"""`megapuzzle prepare-data`: text / jsonl / the embedded corpus -> Megatron indexed dataset.

Every document is tokenized (no BOS), followed by EOS, and stored as one sequence of
PREFIX.bin/.idx; PREFIX.json records what was made from what (inputs, split, tokenizer
fingerprint, corpus identity, counts, unigram entropy) so later stages can check that data
and tokenizer belong together. All inputs are validated before anything is written, and the
output pair is published atomically, so bad input leaves existing outputs untouched.

CLI wiring (one line in cli.py):  prepare.add_cli_args(subparser); ... return prepare.run_cli(args)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from megapuzzle.data import corpus
from megapuzzle.data.datasets import (DataError, IndexedDatasetWriter, PackedSequenceDataset, expand_inputs,
                                      input_kind, iter_jsonl_texts, read_text_file, unigram_entropy,
                                      write_dataset_meta)
from megapuzzle.data.tokenizer import Tokenizer, load_tokenizer

STDLIB = "stdlib"


def _is_stdlib(inputs) -> bool:
    return inputs == STDLIB or (isinstance(inputs, (list, tuple)) and list(map(str, inputs)) == [STDLIB])


def _normalize_prefix(out_prefix: str | os.PathLike) -> str:
    s = str(out_prefix)
    for ext in (".bin", ".idx", ".json"):  # a common slip: --out data/x.bin
        if s.endswith(ext):
            s = s[: -len(ext)]
    if not Path(s).name:
        raise DataError(f"--out {out_prefix!r}: needs a file-name prefix (e.g. data/stdlib_train), not a directory")
    return s


def _load_tok(tokenizer: str | os.PathLike | Tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    try:
        return load_tokenizer(tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"--tokenizer: {e}") from None


def _documents(inputs, split: str, text_key: str, include_tests: bool) -> tuple[Iterator[str], int | None, dict]:
    """(documents, count if known, provenance) with all inputs validated before returning."""
    if split not in corpus.SPLITS:
        raise DataError(f"--split {split!r}: use one of {', '.join(corpus.SPLITS)}")
    if _is_stdlib(inputs):
        files = corpus.stdlib_files(split, include_tests=include_tests)
        if not files:
            raise DataError(f"stdlib corpus split {split!r} is empty under {corpus.stdlib_root()}")
        info = corpus.stdlib_stats(split, include_tests=include_tests)
        return (p.read_bytes().decode("utf-8") for p in files), len(files), {"inputs": STDLIB, "corpus": info}
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = expand_inputs(inputs)  # raises on missing files / unknown extensions
    all_text = all(input_kind(f) == "text" for f in files)

    def gen() -> Iterator[str]:
        for f in files:
            texts = iter_jsonl_texts(f, text_key) if input_kind(f) == "jsonl" else iter([read_text_file(f)])
            for t in texts:
                # User data has no stable path per document (jsonl), so split by content hash.
                if split == "all" or corpus.is_heldout(t) == (split == "heldout"):
                    yield t

    count = len(files) if (all_text and split == "all") else None
    return gen(), count, {"inputs": [str(f) for f in files]}


def _batched(it: Iterator[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def prepare_data(inputs: Sequence[str | os.PathLike] | str, tokenizer_path: str | os.PathLike | Tokenizer,
                 out_prefix: str | os.PathLike, split: str = "all", *, text_key: str = "text",
                 include_tests: bool = False, progress: bool = True, batch_docs: int = 64) -> dict:
    """Tokenize `inputs` (files/dirs of .txt/.md/.rst/.py or .jsonl, or "stdlib") into
    OUT_PREFIX.bin/.idx (+ .json). `split` selects train/heldout/all documents (stdlib: by
    relative path; user files: by content hash; ~2% held out). Returns the stats dict that
    is also written to OUT_PREFIX.json: docs, tokens, bytes, seconds, unigram entropy, ...
    """
    from tqdm import tqdm

    t0 = time.time()
    prefix = _normalize_prefix(out_prefix)
    tok = _load_tok(tokenizer_path)
    docs, total, provenance = _documents(inputs, split, text_key, include_tests)
    nbytes = skipped = 0
    with IndexedDatasetWriter(prefix, tok.vocab_size) as w:  # (imports megatron: a few s)
        bar = tqdm(total=total, unit="doc", desc=f"prepare {Path(prefix).name}", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        try:
            for chunk in _batched(docs, batch_docs):
                kept = [t for t in chunk if t]  # an empty document would be a lone EOS
                skipped += len(chunk) - len(kept)
                for ids in tok.encode_batch(kept):
                    ids.append(tok.eos_id)
                    w.add_document(ids)
                nbytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in kept)
                bar.update(len(chunk))
                bar.set_postfix(tokens=w.tokens, refresh=False)
            if w.docs == 0:
                raise DataError(f"no documents found in {provenance['inputs']} (split {split!r}); "
                                f"check the inputs, or use --split all")
            stats = w.commit()
        finally:
            bar.close()
    ds = PackedSequenceDataset.from_prefix(prefix)
    stats.update({
        "prefix": prefix, "split": split, "bytes": nbytes, "skipped_empty": skipped,
        "tokens_per_byte": stats["tokens"] / max(1, nbytes),
        "unigram_entropy_nats": unigram_entropy(ds.tokens),
        "seconds": round(time.time() - t0, 3),
        "tokenizer": {"path": None if isinstance(tokenizer_path, Tokenizer) else str(tokenizer_path),
                      **tok.describe()},
        **provenance,
    })
    write_dataset_meta(prefix, stats)
    return stats


# ----------------------------------------------------------------------------- CLI

def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text files (.txt/.md/.rst/.py, one document each), .jsonl files (one "
                             "{\"text\": ...} per line), directories of those, or 'stdlib' for the "
                             "embedded Python-stdlib corpus")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="directory with tokenizer.model or tokenizer.json (or the file itself)")
    parser.add_argument("--out", required=True, metavar="PREFIX",
                        help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--split", default="all", choices=corpus.SPLITS,
                        help="document split to keep (~2%% held out, by stable hash); default all")
    parser.add_argument("--text-key", default="text", help="jsonl field holding the text (default: text)")
    parser.add_argument("--include-stdlib-tests", action="store_true",
                        help="with 'stdlib': also use the stdlib test suites (~2.3x more text)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Exit code: 0 ok, 2 bad input (one-line message on stderr, outputs untouched)."""
    inputs = STDLIB if list(args.input) == [STDLIB] else list(args.input)
    try:
        s = prepare_data(inputs, args.tokenizer, args.out, split=args.split, text_key=args.text_key,
                         include_tests=args.include_stdlib_tests, progress=not args.no_progress)
    except DataError as e:
        print(f"megapuzzle prepare-data: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['prefix']}.bin/.idx/.json: {s['docs']} docs, {s['tokens']} tokens "
          f"({s['tokens_per_byte']:.3f} tokens/byte, unigram entropy {s['unigram_entropy_nats']:.3f} nats) "
          f"in {s['seconds']:.1f}s")
    return 0


if __name__ == "__main__":  # python -m megapuzzle.data.prepare --input stdlib --tokenizer T --out P
    raise SystemExit(run_cli(add_cli_args(argparse.ArgumentParser(prog="megapuzzle prepare-data")).parse_args()))
