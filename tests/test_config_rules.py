"""Config sections: declarative rules (megapuzzle/config/rules.py), documented fields, one-line errors."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from megapuzzle.config import section
from megapuzzle.config.bld import BLDConfig
from megapuzzle.config.evaluate import EvaluateConfig
from megapuzzle.config.gkd import GKDConfig
from megapuzzle.config.measure import MeasureConfig
from megapuzzle.config.mip import MIPConfig
from megapuzzle.config.parent import ParentConfig
from megapuzzle.config.pipeline import DataSection, ExportSection, ParentSection
from megapuzzle.config.rules import Section, field_rules
from megapuzzle.config.score import ScoreConfig
from megapuzzle.errors import UserError

SECTIONS = [BLDConfig, GKDConfig, ScoreConfig, MeasureConfig, MIPConfig, EvaluateConfig, ParentConfig,
            ParentSection, DataSection, ExportSection]


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_is_documented_and_the_defaults_validate(cls):
    assert issubclass(cls, Section) and cls.SECTION
    body = ast.parse(inspect.getsource(cls)).body[0].body
    fields = {f.name for f in dataclasses.fields(cls)}
    documented = {a.target.id for a, b in zip(body, body[1:])
                  if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                  and isinstance(b.value.value, str)}
    assert fields - documented == set(), "fields without a docstring"
    if cls is not ParentSection:  # the parent section needs a source; its default is the error below
        cls()


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_rule_rejects_a_wrong_type_naming_section_and_field(cls):
    base = {"train": "debug"} if cls is ParentSection else {}
    for name, (rule, _) in field_rules(cls).items():
        if rule is None:
            continue
        with pytest.raises(UserError) as e:
            cls(**base, **{name: object()})
        msg = str(e.value)
        assert msg.startswith(f"{cls.SECTION}.{name} ") and "\n" not in msg, msg


def test_numbers_from_yaml_strings_and_bounds():
    # PyYAML reads 3e-4 (no dot) as a string
    assert section({"gkd": {"lr": "3e-4", "min_lr": "0"}}, "gkd", GKDConfig).lr == 3e-4
    with pytest.raises(UserError, match=r"config section 'gkd'|gkd.lr must be > 0, got -1"):
        section({"gkd": {"lr": -1}}, "gkd", GKDConfig)
    with pytest.raises(UserError, match=r"bld.warmup_fraction must be in \[0, 1\), got 1"):
        BLDConfig(warmup_fraction=1)
    with pytest.raises(UserError, match=r"mip.alpha must be in \[0, 1\], got 1.5"):
        MIPConfig(alpha=1.5)
    with pytest.raises(UserError, match="evaluate.gen_len must be an integer >= 1 or omitted, got 0"):
        EvaluateConfig(gen_len=0)
    assert EvaluateConfig(gen_len=None).gen_len is None


def test_cross_field_rules():
    with pytest.raises(UserError, match="bld.lr must be > 0 and 0 <= bld.min_lr <= lr"):
        BLDConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(UserError, match="gkd.steps and gkd.tokens are alternatives"):
        GKDConfig(steps=2, tokens=100)
    with pytest.raises(UserError, match="not a multiple of micro_batch_size"):
        GKDConfig(batch_size=8, micro_batch_size=3)
    with pytest.raises(UserError, match="engine vllm times wall clock"):
        MeasureConfig(engine="vllm", clock="cpu")
    with pytest.raises(UserError, match="train-parent.vocab_size 1000 is not a multiple of 128; pick e.g. 1024"):
        ParentConfig(vocab_size=1000)
    with pytest.raises(UserError, match="give exactly one of train / hf_dir / checkpoint"):
        ParentSection(train="debug", hf_dir="x")


def test_conversions():
    assert MeasureConfig(batch_sizes=[4, 1, 4]).batch_sizes == (1, 4)
    assert MeasureConfig(roofline_gpus="H100").roofline_gpus == ("h100",)
    assert BLDConfig(layers=[3, "1"]).layers == (3, 1)
    assert BLDConfig(coupled_pairs=["gqa_kv1+mlp_128"]).coupled_pairs == (("gqa_kv1", "mlp_128"),)
    with pytest.raises(UserError, match="bld.coupled_pairs entry 'x' is malformed"):
        BLDConfig(coupled_pairs=["x"])
