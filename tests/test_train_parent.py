"""The embedded parent (debug flavour): loss goes down, kill + resume == uninterrupted, HF dir loads."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megapuzzle.train.faults import kill_after
from megapuzzle.stages.parent.train_parent import FLAVOURS, train_parent

CFG = dataclasses.replace(FLAVOURS["debug"], steps=20, checkpoint_every=8, log_every=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("parent") / "run"
    res = train_parent(out, CFG)
    return out, res


def test_loss_goes_down_and_outputs_exist(trained):
    out, res = trained
    assert res["final_train_loss"] < math.log(CFG.vocab_size) - 0.8  # from ~6.24 (uniform) down
    assert res["heldout_loss"] < math.log(CFG.vocab_size) - 0.8
    assert res["heldout_tokens"] == CFG.eval_batches * CFG.batch_size * CFG.seq_len
    for f in ("checkpoint/arch.json", "checkpoint/model.safetensors", "checkpoint/tokenizer/tokenizer.model",
              "hf/config.json", "tb", "result.json", "data/train.bin", "data/heldout.idx"):
        assert (out / f).exists(), f
    assert json.loads((out / "hf/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_second_call_is_a_no_op(trained):
    out, res = trained
    assert train_parent(out, CFG) == res


def test_kill_and_resume_gives_the_same_weights(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "resumed"
    # stop after 13 steps without saving (like a kill between checkpoints at 8 and 16) ...
    with kill_after("train-parent", 13):
        assert train_parent(run, CFG) == {"stopped_at": 13}
    assert (run / "train_state/rank000/latest").read_text().strip() == "step_00000008"
    # ... and resume: steps 8..20 replay with the same data and RNG
    res = train_parent(run, CFG)
    assert res["resumed_from_step"] == 8
    a = load_file(str(out / "checkpoint/model.safetensors"))
    b = load_file(str(run / "checkpoint/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_exported_parent_loads_in_transformers_and_matches(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, res = trained
    model = AutoModelForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = tok("import os\n", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 8
    # the held-out loss transformers computes on the same windows matches ours
    from megapuzzle.data.datasets import PackedSequenceDataset

    held = PackedSequenceDataset.from_prefix(out / "data/heldout")
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in held.eval_batches(CFG.batch_size, CFG.seq_len, max_batches=CFG.eval_batches):
            logits = model(batch[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            n += batch[:, 1:].numel()
    assert abs(total / n - res["heldout_loss"]) < 1e-4


PYDOC = Path("/usr/share/doc/python3-doc/html/_sources")


def test_a_directory_corpus_splits_by_relative_path(tmp_path):
    from megapuzzle.errors import UserError
    from megapuzzle.stages.parent.train_parent import corpus_files

    for i in range(200):
        (tmp_path / f"d{i % 7}").mkdir(exist_ok=True)
        (tmp_path / f"d{i % 7}" / f"page{i}.rst.txt").write_text(f"page {i}\n")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    train, held, every = (corpus_files(str(tmp_path), s) for s in ("train", "heldout", "all"))
    assert len(every) == 200 and sorted(train + held) == every and not set(train) & set(held)
    assert 0 < len(held) < 20  # ~2% by relative path: stable wherever the directory sits
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in every:
        (moved / f.relative_to(tmp_path)).parent.mkdir(exist_ok=True)
        (moved / f.relative_to(tmp_path)).write_text(f.read_text())
    assert [f.relative_to(moved) for f in corpus_files(str(moved), "heldout")] == [f.relative_to(tmp_path) for f in held]
    with pytest.raises(UserError, match="python3-doc"):
        corpus_files(str(tmp_path / "nope"), "train")


@pytest.mark.skipif(not PYDOC.is_dir(), reason="apt-get install -y python3-doc (.ci/run does)")
def test_a_parent_trains_on_the_python_docs(tmp_path):
    from megapuzzle.data.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    cfg = dataclasses.replace(CFG, steps=6, checkpoint_every=6, corpus=str(PYDOC), max_files=60)
    res = train_parent(tmp_path / "p", cfg)
    assert res["config"]["corpus"] == str(PYDOC) and math.isfinite(res["heldout_loss"])
    tok = load_tokenizer(tmp_path / "p" / "tokenizer")
    words = tok.encode("The interpreter reads the documentation")  # prose: few pieces per word
    assert len(words) < 25
    # the stdlib-trained config is another parent: the same directory refuses it
    with pytest.raises(Exception, match="another config"):
        train_parent(tmp_path / "p", dataclasses.replace(cfg, corpus="stdlib"))
