"""Tokenizers: one small interface over sentencepiece `.model` files and HF `tokenizer.json`.

Text is always text: `encode` never adds BOS/EOS and never turns a literal "<s>" or
"<|endoftext|>" in the input into a special id (source code contains such strings; a corpus
must not silently grow control tokens). Callers add `eos_id` between documents themselves.

`train_sentencepiece` trains the embedded parent's tokenizer. Choice: **BPE** with byte
fallback, because (a) that is what the Llama family (our parents) uses, so the HF Llama
tokenizer class reproduces its ids exactly — checked on the whole stdlib at train time —
while transformers 5's LlamaTokenizer is hard-wired to a BPE backend (a unigram model would
need another class and a Viterbi decoder on the HF side); (b) BPE training on the 12 MB
corpus takes seconds. Code-friendly settings: identity normalisation (no NFKC rewriting of
unicode), `remove_extra_whitespaces=False`, `add_dummy_prefix=False` (no invented leading
space, so decode(encode(x)) == x exactly), whitespace-only pieces (indentation runs become
single tokens), split digits, newlines kept inside training sentences (pieces like ")\\n").
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from megapuzzle.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
VOCAB_MULTIPLE = 128  # TP-friendly: vocab shards evenly over TP ranks and tensor cores

# Special pieces of the sentencepiece models we train (Llama-2 spelling + an explicit pad).
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"

# Names tried, in order, when a tokenizer.json comes without a tokenizer_config.json.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|im_start|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "[PAD]")


def pad_vocab_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Embedding rows to allocate for a tokenizer of n ids (Megatron's make-vocab-divisible-by)."""
    return -(-n // multiple) * multiple


class Tokenizer(ABC):
    """encode/decode + the three special ids every stage needs.

    `bos_id`/`pad_id` fall back to `eos_id` when the tokenizer has none (GPT-2 style,
    Llama-3 has no pad): packing and padding then still have a valid id.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def save(self, out_dir: str | os.PathLike) -> None:
        """Write the files `load_tokenizer(out_dir)` and `AutoTokenizer` read."""

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 of the serialized model: identifies the id mapping of tokenized data."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self.vocab_size)

    def describe(self) -> dict:
        return {"type": type(self).__name__, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "fingerprint": self.fingerprint()}


# ----------------------------------------------------------------------------- sentencepiece

class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model: str | os.PathLike | bytes):
        import sentencepiece as spm

        self._proto = Path(model).read_bytes() if not isinstance(model, bytes) else model
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = _nonneg(self.sp.eos_id())
        if self.eos_id is None:
            raise ValueError("sentencepiece model has no eos piece (eos_id=-1); retrain with eos_id set")
        self.bos_id = _nonneg(self.sp.bos_id(), self.eos_id)
        self.pad_id = _nonneg(self.sp.pad_id(), self.eos_id)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # sentencepiece's batch encode runs in C++ threads; results are order-preserving.
        return self.sp.encode(list(texts), num_threads=min(2, os.cpu_count() or 1))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self._proto).hexdigest()

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        atomic_write_bytes(out / SPM_FILE, self._proto)
        _write_hf_files_for_spm(out, self._proto, self)


def _nonneg(i: int, fallback: int | None = None) -> int | None:
    return int(i) if i is not None and i >= 0 else fallback


def _spm_proto(proto_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(proto_bytes)
    return m


def _write_hf_files_for_spm(out: Path, proto_bytes: bytes, tok: SentencePieceTokenizer) -> None:
    """tokenizer_config.json + special_tokens_map.json (+ tokenizer.json) for AutoTokenizer.

    The HF side is transformers' LlamaTokenizer (a BPE `tokenizers` backend with byte
    fallback and a Metaspace pre-tokenizer), configured from the model's own settings so it
    gives the same ids: add_prefix_space mirrors add_dummy_prefix, and
    split_special_tokens=True keeps literal "<s>" in text as text, as sentencepiece does.
    tokenizer.json is written too so loading needs neither sentencepiece nor protobuf and
    skips the slow->fast conversion.
    """
    m = _spm_proto(proto_bytes)
    ts, ns = m.trainer_spec, m.normalizer_spec
    if ts.model_type != ts.BPE or ns.name not in ("identity", ""):
        # LlamaTokenizer would silently tokenize differently (unigram / NFKC models).
        log.warning("sentencepiece model is not BPE+identity; writing tokenizer.model only (no HF files)")
        return
    sp = tok.sp
    specials = {"unk_token": UNK, "bos_token": sp.id_to_piece(tok.bos_id), "eos_token": sp.id_to_piece(tok.eos_id)}
    if _nonneg(sp.unk_id()) is not None:
        specials["unk_token"] = sp.id_to_piece(sp.unk_id())
    if _nonneg(sp.pad_id()) is not None:
        specials["pad_token"] = sp.id_to_piece(sp.pad_id())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **specials,
        "add_bos_token": False,  # our data has no BOS; documents are separated by EOS only
        "add_eos_token": False,
        "add_prefix_space": bool(ns.add_dummy_prefix),
        "legacy": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    atomic_write_json(out / "special_tokens_map.json", specials)
    atomic_write_json(out / "tokenizer_config.json", config)
    # Convert with transformers itself (in a scratch dir, since save_pretrained is not
    # atomic), then publish tokenizer.json atomically.
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        for name in (SPM_FILE, "special_tokens_map.json", "tokenizer_config.json"):
            (tmpd / name).write_bytes(proto_bytes if name == SPM_FILE else (out / name).read_bytes())
        hf = AutoTokenizer.from_pretrained(tmpd)
        atomic_write_text(out / HF_FILE, hf.backend_tokenizer.to_str(pretty=False))


# ----------------------------------------------------------------------------- HF tokenizer.json

class HFJsonTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json (Llama-3, GPT-2, ...), specials from the files beside it."""

    def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        from tokenizers import Tokenizer as HFTok

        p = Path(path)
        self.path = p / HF_FILE if p.is_dir() else p
        self._json = self.path.read_text(encoding="utf-8")
        self.tk = HFTok.from_str(self._json)
        # Literal special-token strings inside text stay text (see module docstring).
        self.tk.encode_special_tokens = True
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        cfg = _read_special_names(self.path.parent)
        names = {"bos": bos_token or cfg.get("bos_token"), "eos": eos_token or cfg.get("eos_token"),
                 "pad": pad_token or cfg.get("pad_token")}
        self.eos_id = self._id(names["eos"], _EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(f"{self.path}: no eos token found; pass eos_token=... or add "
                             f"tokenizer_config.json with \"eos_token\"")
        self.bos_id = self._id(names["bos"], _BOS_NAMES, self.eos_id)
        self.pad_id = self._id(names["pad"], _PAD_NAMES, self.eos_id)

    def _id(self, name: str | None, candidates: Sequence[str], fallback: int | None = None) -> int | None:
        if name:  # named explicitly (argument or config): it must exist
            i = self.tk.token_to_id(name)
            if i is None:
                raise ValueError(f"{self.path}: special token {name!r} is not in the vocabulary")
            return int(i)
        for n in candidates:
            i = self.tk.token_to_id(n)
            if i is not None:
                return int(i)
        return fallback

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        atomic_write_text(out / HF_FILE, self._json)
        specials = {"bos_token": self.tk.id_to_token(self.bos_id), "eos_token": self.tk.id_to_token(self.eos_id),
                    "pad_token": self.tk.id_to_token(self.pad_id)}
        atomic_write_json(out / "special_tokens_map.json", specials)
        atomic_write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", **specials, "split_special_tokens": True,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000})


def _read_special_names(d: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for fn in ("special_tokens_map.json", "tokenizer_config.json"):  # config wins
        f = d / fn
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
        for k in ("bos_token", "eos_token", "pad_token"):
            v = cfg.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[k] = v
    return out


# ----------------------------------------------------------------------------- loading

def load_tokenizer(path_or_dir: str | os.PathLike, **kwargs) -> Tokenizer:
    """A directory with tokenizer.model (preferred: it is the trained source of truth; a
    tokenizer.json beside it is derived from it) or tokenizer.json, or either file directly."""
    p = Path(path_or_dir)
    if p.is_dir():
        if (p / SPM_FILE).is_file():
            return SentencePieceTokenizer(p / SPM_FILE)
        if (p / HF_FILE).is_file():
            return HFJsonTokenizer(p / HF_FILE, **kwargs)
        raise FileNotFoundError(f"{p}: no {SPM_FILE} or {HF_FILE} in this directory; "
                                f"train one with train_sentencepiece or point at an HF tokenizer dir")
    if not p.exists():
        raise FileNotFoundError(f"{p}: tokenizer not found; pass a directory holding {SPM_FILE} or {HF_FILE}")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".json":
        return HFJsonTokenizer(p, **kwargs)
    raise ValueError(f"{p}: unknown tokenizer file; expected a sentencepiece .model or a tokenizer.json")


# ----------------------------------------------------------------------------- training

def _sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Cut documents into runs of whole lines of at most ~max_bytes, newlines kept.

    sentencepiece skips sentences longer than max_sentence_length, and its BPE counts words
    inside a sentence, so chunk size only matters for sampling granularity. Lines longer
    than the budget (generated tables) are cut by characters.
    """
    max_chars = max_bytes // 4  # worst case 4 UTF-8 bytes per char
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8", "surrogatepass"))
            if size + n > max_bytes and buf:
                yield "".join(buf)
                buf, size = [], 0
            if n > max_bytes:
                for i in range(0, len(line), max_chars):
                    yield line[i:i + max_chars]
                continue
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


def _reservoir(items: Iterable[str], k: int, seed: int) -> list[str]:
    """Deterministic uniform sample of k items (all of them if fewer), in stream order."""
    rng = np.random.default_rng(seed)
    res: list[tuple[int, str]] = []
    for i, s in enumerate(items):
        if len(res) < k:
            res.append((i, s))
        else:
            j = int(rng.integers(0, i + 1))
            if j < k:
                res[j] = (i, s)
    res.sort()
    return [s for _, s in res]


def train_sentencepiece(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 8192, *,
                        model_type: str = "bpe", input_sentence_size: int = 100_000,
                        max_sentence_bytes: int = 2048, character_coverage: float = 0.9999,
                        max_piece_length: int = 16, seed: int = 0, num_threads: int = 2,
                        verify_hf: bool = True) -> SentencePieceTokenizer:
    """Train a code-friendly sentencepiece model on `texts` and write it + HF files to out_dir.

    Ids: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>, then 256 byte-fallback pieces, then merges.
    `input_sentence_size` caps the number of ~2 KB training sentences (default ~200 MB of
    text, well under a minute on 2 cores; the 12 MB stdlib train split takes ~4 s at 8192);
    the sample is drawn here with a seeded reservoir so training is reproducible.
    `verify_hf` re-encodes a sample with transformers.AutoTokenizer from out_dir and fails if
    any id differs.
    """
    import sentencepiece as spm

    if vocab_size % VOCAB_MULTIPLE:
        raise ValueError(f"vocab_size {vocab_size} is not a multiple of {VOCAB_MULTIPLE}; "
                         f"use {pad_vocab_size(vocab_size)}")
    sents = _reservoir(_sentences(texts, max_sentence_bytes), input_sentence_size, seed)
    if not sents:
        raise ValueError("train_sentencepiece: no text given")
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, remove_extra_whitespaces=False, add_dummy_prefix=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        split_by_whitespace=True, max_sentencepiece_length=max_piece_length,
        character_coverage=character_coverage, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=max_sentence_bytes * 2, num_threads=num_threads,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        hard_vocab_limit=True, minloglevel=2,
    )
    tok = SentencePieceTokenizer(buf.getvalue())
    tok.save(out_dir)
    if verify_hf and (Path(out_dir) / HF_FILE).is_file():
        verify_hf_tokenizer(out_dir, sents[:: max(1, len(sents) // 200)])
    return tok


def verify_hf_tokenizer(tok_dir: str | os.PathLike, texts: Sequence[str]) -> None:
    """Raise if transformers.AutoTokenizer(tok_dir) and our wrapper disagree on any text."""
    from transformers import AutoTokenizer

    ours = load_tokenizer(tok_dir)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    for t in texts:
        a, b = ours.encode(t), hf.encode(t, add_special_tokens=False)
        if a != b:
            raise RuntimeError(f"{tok_dir}: AutoTokenizer ids differ from {type(ours).__name__} on "
                               f"{t[:60]!r} ({len(b)} vs {len(a)} ids); the HF files are not usable")
