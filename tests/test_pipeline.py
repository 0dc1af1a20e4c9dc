"""`megapuzzle run`: every stage in order on the debug config, manifest bookkeeping, skip /
re-run semantics, clear errors. The whole chain runs for real (examples/debug.yaml)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from _logs import captured
from megapuzzle.errors import UserError
from megapuzzle.pipeline import STAGE_NAMES, run_pipeline

DEBUG = Path(__file__).resolve().parents[1] / "examples" / "debug.yaml"
QUIET: dict = {}


@pytest.fixture(scope="module")
def full_run(debug_parent, tmp_path_factory):
    """The debug pipeline end to end; the parent stage reuses the session's trained debug parent
    (train-parent sees a finished run with the same config and does nothing)."""
    run = tmp_path_factory.mktemp("pipeline") / "run"
    shutil.copytree(debug_parent, run / "parent_train")
    manifest = run_pipeline(DEBUG, run, **QUIET)
    return run, manifest


def _statuses(run):
    return {k: v["status"] for k, v in json.loads((run / "manifest.json").read_text())["stages"].items()}


def test_every_stage_runs_and_the_child_is_exported(full_run):
    run, manifest = full_run
    assert _statuses(run) == dict.fromkeys(STAGE_NAMES, "done")
    cfg = json.loads((run / "export" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert (run / "report.md").is_file() and (run / "pareto.png").is_file()
    for name in ("scores.json", "costs.json", "mip/solutions.json", "child/arch.json", "library/index.json"):
        assert (run / name).is_file(), name
    m = json.loads((run / "manifest.json").read_text())
    assert m["stages"]["bld"]["config"]["bld"]["tokens_per_block"] == 512
    assert m["versions"]["megatron-core"] and m["versions"]["torch"]


def test_rerun_skips_finished_stages(full_run):
    run, _ = full_run
    with captured() as lines:
        run_pipeline(DEBUG, run)
    assert [l for l in lines if "skipped" in l] == [
        f"[{i}/{len(STAGE_NAMES)}] {n}: done, config unchanged - skipped" for i, n in enumerate(STAGE_NAMES, 1)]


def test_changed_stage_config_reruns_it_and_everything_after(full_run, tmp_path):
    run, _ = full_run
    cfg = yaml.safe_load(DEBUG.read_text())
    cfg["mip"]["throughput_x"] = 1.2
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    before = (run / "library" / "index.json").stat().st_mtime_ns
    with captured() as lines:
        run_pipeline(changed, run)
    ran = [l.split("] ")[1].split(":")[0] for l in lines if ": running" in l]
    assert ran == STAGE_NAMES[STAGE_NAMES.index("mip"):]
    assert (run / "library" / "index.json").stat().st_mtime_ns == before  # nothing before mip re-ran
    sol = json.loads((run / "mip" / "solutions.json").read_text())
    assert sol["config"]["throughput_x"] == 1.2
    run_pipeline(DEBUG, run, **QUIET)  # back to the module's config for the other tests


def test_interrupted_stage_is_rerun(full_run):
    run, _ = full_run
    m = json.loads((run / "manifest.json").read_text())
    m["stages"]["export"]["status"] = "running"  # as if killed during export
    (run / "manifest.json").write_text(json.dumps(m))
    with captured() as lines:
        run_pipeline(DEBUG, run)
    assert any("export: running (resuming an interrupted run)" in l for l in lines)
    assert _statuses(run)["export"] == "done"


def test_bad_configs_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parent: {train: debug}\nbld: {tokens_per_blok: 5}\n")
    with pytest.raises(UserError, match=r"unknown key\(s\) \['tokens_per_blok'\] in config section 'bld'"):
        run_pipeline(bad, tmp_path / "r", only="bld", **QUIET)
    bad.write_text("parent: {train: debug}\nbldd: {}\n")
    with pytest.raises(UserError, match=r"unknown config section\(s\) \['bldd'\]"):
        run_pipeline(bad, tmp_path / "r", **QUIET)
    bad.write_text("parent: {train: debug, hf_dir: /x}\n")
    with pytest.raises(UserError, match="exactly one of train / hf_dir / checkpoint"):
        run_pipeline(bad, tmp_path / "r2", **QUIET)
    with pytest.raises(UserError, match="unknown stage 'scroe'"):
        run_pipeline(DEBUG, tmp_path / "r3", only="scroe", **QUIET)


def test_every_section_is_validated_before_the_first_stage(tmp_path):
    """A mistake in a late stage's section, or FP8 on a machine without TE + sm >= 89, fails at
    start: no run directory, no stage run (never half-way, after hours of BLD)."""
    cfg = yaml.safe_load(DEBUG.read_text())
    for section, key, value, match in (("evaluate", "repeats", 0, "evaluate.repeats must be an integer >= 1"),
                                       ("export", "quantize", "int4",
                                        "export.quantize 'int4' unknown; use fp8, or omit it"),
                                       ("gkd", "fp8", True, "gkd.fp8: fp8=True needs")):
        bad = yaml.safe_load(DEBUG.read_text())
        bad[section][key] = value
        path = tmp_path / f"{section}.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(UserError, match=match) as e:
            run_pipeline(path, tmp_path / f"run_{section}", **QUIET)
        assert "\n" not in str(e.value)
        assert not (tmp_path / f"run_{section}").exists()
    assert cfg == yaml.safe_load(DEBUG.read_text())


def test_export_stage_writes_an_fp8_checkpoint(full_run, tmp_path):
    from megapuzzle.checkpoints.quantize_fp8 import check_fp8_dir

    run, _ = full_run
    cfg = yaml.safe_load(DEBUG.read_text())
    cfg["export"].update(quantize="fp8", calib_batches=1, calib_seq_len=32)
    path = tmp_path / "fp8.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with captured() as lines:
        run_pipeline(path, run)
    assert [l.split("] ")[1].split(":")[0] for l in lines if ": running" in l] == ["export"]
    layers = len(json.loads((run / "export" / "config.json").read_text())["block_configs"])
    assert check_fp8_dir(run / "export_fp8", layers)["torch.float8_e4m3fn"] > 0
    assert json.loads((run / "manifest.json").read_text())["stages"]["export"]["result"]["fp8"]["quantized_linears"] > 0
    run_pipeline(DEBUG, run, **QUIET)  # back to the module's config for the other tests


def test_cli_pipeline_and_slurm_read_one_stage_registry():
    import re

    from megapuzzle.cli import COMMANDS
    from megapuzzle.pipeline import STAGES
    from megapuzzle.stages import STAGES as REGISTRY, schema

    assert [s[0] for s in STAGES] == [s.name for s in REGISTRY]
    import importlib

    # one package per stage, exposing its stage object, which `megapuzzle run` runs
    assert all(importlib.import_module(f"megapuzzle.stages.{s.name}").STAGE is s for s in REGISTRY)
    assert [fn for *_, fn in STAGES] == [s.run_stage for s in REGISTRY] and all(map(callable, [fn for *_, fn in STAGES]))
    assert all(COMMANDS[s.command][0] == s.module for s in REGISTRY)
    root = Path(__file__).resolve().parents[1]
    chain = (root / "slurm" / "submit_pipeline.sh").read_text()
    default = re.search(r"STAGES=\$\{MP_STAGES:-([^}]*)\}", chain).group(1).split()
    assert default == [s.name for s in REGISTRY if s.sbatch]
    assert all((root / "slurm" / s.sbatch).is_file() for s in REGISTRY if s.sbatch)
    assert all(schema(s).SECTION == s.sections[-1] for s in REGISTRY if s.schema)


def test_pipeline_launches_evaluate_on_its_pipeline_stages(full_run, tmp_path):
    """evaluate.pipeline_parallel 2: `megapuzzle run` (one process here) launches evaluate under
    torchrun on 2 ranks, one stage of parent and child each; the quality equals the PP=1 run's."""
    run, _ = full_run
    rd = tmp_path / "run"
    shutil.copytree(run, rd)
    ref = json.loads((rd / "eval.json").read_text())
    assert ref["pipeline_parallel"] == 1
    cfg = yaml.safe_load(DEBUG.read_text())
    cfg["evaluate"].update(pipeline_parallel=2, rounds=2)  # the timing runs through the stages; 2 rounds do
    path = tmp_path / "pp2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with captured() as lines:
        run_pipeline(path, rd, only="evaluate")
    assert any("[launch] evaluate: 2 processes" in l for l in lines)
    ev = json.loads((rd / "eval.json").read_text())
    assert (ev["tensor_parallel"], ev["pipeline_parallel"]) == (1, 2)
    stage = json.loads((rd / "manifest.json").read_text())["stages"]["evaluate"]
    assert stage["status"] == "done" and stage["result"]["pipeline_parallel"] == 2
    print(f"evaluate at PP=2 (torchrun, 2 processes): {stage['wall_s']} s")
    # fp32 either way; PP=2 runs one sequence per micro-batch: GEMM reduction order only (see
    # tests/test_evaluate.py's PP=2 test for the bound)
    for who in ("parent", "child"):
        for k in ("lm_loss", "accuracy", "kl_to_parent", "top1_agreement", "tokens"):
            assert ev[who][k] == pytest.approx(ref[who][k], rel=1e-5, abs=1e-6), (who, k)
        assert ev[who]["tokens_per_s"] > 0
