"""megapuzzle.data: corpus split, tokenizers (sentencepiece, HF json, AutoTokenizer parity),
readers and their errors, Megatron indexed datasets, resumable packed batches, entropy."""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megapuzzle.data import corpus
from megapuzzle.data import (DataError, HFJsonTokenizer, PackedSequenceDataset, SentencePieceTokenizer,
                             iter_jsonl_texts, load_tokenizer, open_indexed_dataset, prepare_data,
                             train_sentencepiece, unigram_entropy, write_indexed_dataset)
from megapuzzle.data import prepare as prepare_mod

torch.set_num_threads(1)

TRICKY = ("def f(x):\n\tif x:\n\t\treturn 'héllo ✓ 日本語 🐍'  # tab-indented\n"
          "    \n\n\n  trailing   \r\nx = 12345 + 0.5e-3\n<s> </s> <pad> <unk> <|endoftext|>\n\x0c\x00end")


# ----------------------------------------------------------------------------- corpus

def test_split_deterministic_disjoint_and_complete():
    all_ = corpus.stdlib_relpaths("all")
    train, held = corpus.stdlib_relpaths("train"), corpus.stdlib_relpaths("heldout")
    assert all_ == sorted(all_) and len(all_) > 200
    assert not set(train) & set(held)
    assert sorted(train + held) == all_
    assert 0 < len(held) < 0.06 * len(all_)
    corpus._scan.cache_clear()  # recompute from disk: same answer
    assert corpus.stdlib_relpaths("train") == train
    # split is a function of the relative path only
    assert all(corpus.is_heldout(r) for r in held) and not any(corpus.is_heldout(r) for r in train)
    assert not any(p.split("/")[0] in ("test", "site-packages") or "/tests/" in f"/{p}" for p in all_)
    files = corpus.stdlib_files("heldout")
    assert [p.relative_to(corpus.stdlib_root()).as_posix() for p in files] == held
    s = corpus.stdlib_stats("all")
    assert s["files"] == len(all_) and s["bytes"] > 5e6 and s["python_version"].count(".") == 2


def test_split_independent_of_creation_order_and_exclusions(tmp_path):
    names = [f"pkg{i % 7}/mod{i}.py" for i in range(300)] + ["test/test_x.py", "a/tests/t.py",
                                                             "site-packages/x.py", "_sysconfigdata_x.py"]
    results = []
    for trial in range(2):
        root = tmp_path / f"r{trial}"
        order = names[:]
        random.Random(trial).shuffle(order)
        for n in order:
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            (root / n).write_text(f"# {n}\n")
        (root / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: skipped
        results.append((corpus.stdlib_relpaths("train", root=root), corpus.stdlib_relpaths("heldout", root=root)))
    assert results[0] == results[1]
    train, held = results[0]
    assert len(train) + len(held) == 300 and held
    assert "latin1.py" not in train + held and not any("test" in r or "site" in r for r in train + held)
    assert len(corpus.stdlib_relpaths("all", root=tmp_path / "r0", include_tests=True)) == 302


# ----------------------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    texts = [p.read_text(encoding="utf-8") for p in corpus.stdlib_files("train")[:60]]
    train_sentencepiece(texts, out, vocab_size=512)
    return out


def test_sentencepiece_round_trip_on_stdlib(spm_dir):
    tok = load_tokenizer(spm_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 1, 2, 3)
    texts = list(corpus.iter_stdlib_texts("heldout"))[:6] + [TRICKY, "", " ", "\n", "\t\t x"]
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert tok.eos_id not in ids and tok.bos_id not in ids  # literal "<s>" stays text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    # indentation runs are single pieces (whitespace-only pieces enabled)
    assert len(tok.encode("        ")) == 1


def test_vocab_multiple_of_128(tmp_path):
    with pytest.raises(ValueError, match="multiple of 128"):
        train_sentencepiece(["x = 1\n"], tmp_path, vocab_size=500)


def test_autotokenizer_loads_trained_dir_offline_same_ids(spm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    ours = load_tokenizer(spm_dir)
    for d in (spm_dir, None):
        if d is None:  # also without tokenizer.json: converted from tokenizer.model on load
            d = spm_dir.parent / "spm_model_only"
            d.mkdir(exist_ok=True)
            for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
                (d / f).write_bytes((spm_dir / f).read_bytes())
        hf = AutoTokenizer.from_pretrained(str(d))
        for t in list(corpus.iter_stdlib_texts("heldout"))[:4] + [TRICKY]:
            ids = hf.encode(t, add_special_tokens=False)
            assert ids == ours.encode(t)
            assert hf.decode(ids) == t
        assert hf("x")["input_ids"] == ours.encode("x")  # no BOS added by default
        assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (ours.eos_id, ours.bos_id, ours.pad_id)
    # the json-only path of our loader agrees too
    js = HFJsonTokenizer(spm_dir / "tokenizer.json")
    assert js.encode(TRICKY) == ours.encode(TRICKY) and js.eos_id == ours.eos_id


def _tiny_hf_bpe(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(list(corpus.iter_stdlib_texts("heldout"))[:3], trainer)
    path = tmp_path / "hf" / "tokenizer.json"
    path.parent.mkdir()
    tk.save(str(path))
    return path.parent


def test_hf_json_tokenizer_round_trip_and_save(tmp_path):
    d = _tiny_hf_bpe(tmp_path)
    tok = load_tokenizer(d)
    assert isinstance(tok, HFJsonTokenizer)
    assert tok.eos_id == 0 and tok.pad_id == 1 and tok.bos_id == tok.eos_id  # GPT-2 style fallback
    for t in [TRICKY, "", "x", next(corpus.iter_stdlib_texts("heldout"))]:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert tok.eos_id not in ids  # literal "<|endoftext|>" in TRICKY stays text
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode(TRICKY) == tok.encode(TRICKY) and again.fingerprint() == tok.fingerprint()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf.encode(TRICKY, add_special_tokens=False) == tok.encode(TRICKY)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- readers

def test_jsonl_missing_text_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n{"txt": "b"}\n')
    it = iter_jsonl_texts(f)
    assert next(it) == "a"
    with pytest.raises(DataError) as e:
        next(it)
    msg = str(e.value)
    assert "\n" not in msg and f"{f}:3:" in msg and "'text'" in msg
    f.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r":1: 'text' is int"):
        list(iter_jsonl_texts(f))
    f.write_text('{"text": "a"\n')
    with pytest.raises(DataError, match=r":1: not a valid"):
        list(iter_jsonl_texts(f))


# ----------------------------------------------------------------------------- indexed datasets

def test_indexed_dataset_round_trip_via_megatron(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=n).tolist() for n in (5, 1, 17, 0, 300)]
    stats = write_indexed_dataset(tmp_path / "ds", docs, vocab_size=1000, meta={"note": "t"})
    assert stats == {"docs": 5, "tokens": 323, "dtype": "uint16"}
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "ds"))
    assert len(ds) == len(docs) and [ds[i].tolist() for i in range(len(ds))] == docs
    assert list(ds.document_indices) == list(range(len(docs) + 1))
    assert json.loads((tmp_path / "ds.json").read_text())["note"] == "t"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx", "ds.json"]  # no temps left
    # large vocab -> int32 (Megatron has no uint32)
    write_indexed_dataset(tmp_path / "big", [[70000, 1]], vocab_size=128256)
    big = open_indexed_dataset(tmp_path / "big")  # keep it alive: its arrays view its mmap
    assert big[0].tolist() == [70000, 1] and big[0].dtype == np.int32
    # a .bin that does not match its .idx is refused
    (tmp_path / "ds.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="different runs"):
        open_indexed_dataset(tmp_path / "ds")


def test_prepare_stdlib_and_user_files(spm_dir, tmp_path):
    tok = load_tokenizer(spm_dir)
    s = prepare_data("stdlib", spm_dir, tmp_path / "held", split="heldout", progress=False)
    texts = [t for t in corpus.iter_stdlib_texts("heldout") if t]
    assert s["docs"] == len(texts) and s["corpus"]["python_version"]
    ds = open_indexed_dataset(tmp_path / "held")
    assert ds[0].tolist() == tok.encode(texts[0]) + [tok.eos_id]
    assert s["tokens"] == int(ds.sequence_lengths.sum())
    assert s["tokenizer"]["fingerprint"] == tok.fingerprint()

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x = 1\n"}) + "\n" + json.dumps({"text": "y\t2"}) + "\n")
    (tmp_path / "b.txt").write_text("hello\n")
    s = prepare_data([tmp_path / "a.jsonl", tmp_path / "b.txt"], spm_dir, tmp_path / "user", progress=False)
    ds = open_indexed_dataset(tmp_path / "user")
    assert s["docs"] == 3 and [tok.decode(ds[i][:-1]) for i in range(3)] == ["x = 1\n", "y\t2", "hello\n"]


@pytest.mark.parametrize("case", ["missing", "extension", "notext"])
def test_prepare_bad_input_leaves_outputs_untouched(spm_dir, tmp_path, capsys, case):
    (tmp_path / "ok.txt").write_text("def f():\n    return 1\n")
    prepare_data([tmp_path / "ok.txt"], spm_dir, tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out.*")}
    bad = {"missing": tmp_path / "nope.jsonl", "extension": tmp_path / "x.csv", "notext": tmp_path / "bad.jsonl"}[case]
    if case == "extension":
        bad.write_text("a,b\n")
    if case == "notext":
        bad.write_text('{"text": "fine"}\n{"content": "oops"}\n')
    parser = prepare_mod.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--input", str(tmp_path / "ok.txt"), str(bad), "--tokenizer", str(spm_dir),
                              "--out", str(tmp_path / "out"), "--no-progress"])
    assert prepare_mod.run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err
    assert {"missing": "not found", "extension": "unknown extension", "notext": f"{bad}:2:"}[case] in err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out.*")} == before
    assert not list(tmp_path.glob(".out.*"))  # no temp files left behind


# ----------------------------------------------------------------------------- packed batches

def test_batches_deterministic_and_resumable():
    toks = np.arange(1000, dtype=np.uint16)
    seed, B, L = 7, 4, 16
    run = [b for _, b in PackedSequenceDataset.from_tokens(toks).batches(B, L, seed, num_steps=200)]
    resumed = [b for _, b in PackedSequenceDataset.from_tokens(toks).batches(B, L, seed, start_step=5, num_steps=195)]
    assert all(torch.equal(a, b) for a, b in zip(run[5:], resumed, strict=True))
    assert run[0].shape == (B, L + 1) and run[0].dtype == torch.int64
    ds = PackedSequenceDataset.from_tokens(toks)
    assert torch.equal(ds.batch(123, B, L, seed), run[123])  # random access == iteration
    assert not torch.equal(ds.batch(0, B, L, seed + 1), run[0])  # seed matters
    for b in run:  # windows are contiguous slices of the stream
        assert (b[:, 1:] - b[:, :-1] == 1).all()
    # one epoch = each window once; 200 steps * 4 rows span several epochs (with shifts)
    n = ds.windows_per_epoch(L)
    starts = torch.cat(run)[:, 0].tolist()
    first_epoch = starts[:n]
    assert len(set(first_epoch)) == n and len({s % L for s in first_epoch}) == 1
    assert len({s % L for s in starts}) > 1
    # data-parallel ranks partition the global batch
    parts = [ds.batch(9, B, L, seed, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(parts), run[9])


def test_eval_batches_fixed_sequential(tmp_path):
    write_indexed_dataset(tmp_path / "ev", [list(range(i * 10, i * 10 + 10)) for i in range(10)], vocab_size=512)
    ds = PackedSequenceDataset.from_prefix(tmp_path / "ev")
    assert ds.num_tokens == 100 and ds.num_docs == 10
    ev = list(ds.eval_batches(batch_size=4, seq_len=9))
    assert [b.shape[0] for b in ev] == [4, 4, 3]  # 11 windows of 10 tokens overlapping by 1
    assert ev[0][1].tolist() == list(range(9, 19)) and ev[2][-1].tolist() == list(range(90, 100))
    again = list(ds.eval_batches(batch_size=4, seq_len=9))
    assert all(torch.equal(a, b) for a, b in zip(ev, again))
    assert len(list(ds.eval_batches(4, 9, drop_last=True))) == 2
    assert len(list(ds.eval_batches(4, 9, max_batches=1))) == 1
    with pytest.raises(DataError, match="cannot fill"):
        ds.windows_per_epoch(60)


# ----------------------------------------------------------------------------- entropy

def test_unigram_entropy_by_hand():
    ids = [3, 3, 3, 1, 1, 7]
    hand = -(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3) + (1 / 6) * math.log(1 / 6))
    assert unigram_entropy(ids) == pytest.approx(hand, rel=1e-12)
    assert unigram_entropy(np.array(ids, dtype=np.uint16)) == pytest.approx(hand, rel=1e-12)
    assert unigram_entropy(torch.tensor(ids)) == pytest.approx(hand, rel=1e-12)
    assert unigram_entropy([[3, 3, 3], np.array([1, 1, 7])]) == pytest.approx(hand, rel=1e-12)
    assert unigram_entropy([5] * 10) == 0.0
    c = Counter(range(8))
    assert unigram_entropy(list(c.elements())) == pytest.approx(math.log(8))
