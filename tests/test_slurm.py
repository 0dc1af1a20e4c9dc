"""The slurm/ scripts on a real (one-node, CPU) SLURM: the whole pipeline as a job chain, and a
BLD array task that is cancelled mid-way and resubmitted alone.

SLURM comes from .ci/slurm_setup.sh (run here when `sinfo` does not answer). Without `sbatch`
these tests skip, except in CI (CI set), where they must run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
DEBUG_CFG = REPO / "examples" / "debug.yaml"
CHAIN_TIMEOUT_S = 25 * 60
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def _run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120, **kw).stdout


def _slurm_up() -> bool:
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, capture_output=True, text=True,
                                timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(s.strip() in ("idle", "mixed", "allocated", "completing") for s in states.splitlines())


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """Environment for sbatch: SLURM up, the jobs using this interpreter and CPU-only defaults."""
    if shutil.which("sbatch") is None and not os.environ.get("CI"):
        pytest.skip("SLURM is not installed (no sbatch); `sudo .ci/slurm_setup.sh` installs and starts a "
                    "one-node SLURM (CI does, and there these tests always run)")
    if not _slurm_up():
        r = subprocess.run([str(REPO / ".ci" / "slurm_setup.sh")], check=False, capture_output=True, text=True,
                           timeout=1200)
        assert r.returncode == 0, f".ci/slurm_setup.sh failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert _slurm_up(), "SLURM does not answer after .ci/slurm_setup.sh; see /var/log/slurm/"
    env = dict(os.environ)
    # the jobs get the submitting shell's environment (sbatch --export=ALL): put this
    # interpreter first on PATH so `python3` there is the one with megapuzzle installed
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(MP_SLURM_DIR=str(SLURM), MP_GPUS_PER_NODE="0", MP_CPUS_PER_TASK="1", MP_CONTAINER_IMAGE="",
               MP_ACCOUNT="", MP_PARTITION="", MP_TIME="00:30:00")
    env.pop("MP_STAGES", None)
    return env


def _sacct(ids: list[str], steps: bool = False) -> list[dict[str, str]]:
    fields = ["JobID", "JobName", "State", "ExitCode", "Elapsed"]
    out = _run(["sacct", "-j", ",".join(ids), "-n", "-P", "-o", ",".join(fields)] + ([] if steps else ["-X"]))
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def _sacct_table(ids: list[str]) -> str:
    return _run(["sacct", "-j", ",".join(ids), "-o", "JobID%-16,JobName%-18,State%-11,ExitCode,Elapsed"])


def _active(ids: list[str]) -> bool:
    """Any of these jobs still queued or running (squeue errors once slurmctld forgot them all)."""
    r = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], check=False, capture_output=True, text=True,
                       timeout=120)
    if r.returncode and "Invalid job id" not in r.stderr:
        raise RuntimeError(f"squeue failed: {r.stderr.strip()}")
    return bool(r.stdout.strip()) if r.returncode == 0 else False


def _wait(ids: list[str], n_rows: int, timeout_s: float, run: Path | None = None) -> list[dict[str, str]]:
    """Until every job (and array task) of `ids` reached a terminal state in sacct; n_rows is
    how many allocations to expect (array tasks count one each)."""
    t0 = time.monotonic()
    rows: list[dict[str, str]] = []
    while time.monotonic() - t0 < timeout_s:
        if not _active(ids):
            rows = _sacct(ids)  # slurmdbd gets the final states a moment after squeue drops them
            if len(rows) >= n_rows and all(r["State"].split()[0] in TERMINAL for r in rows):
                return rows
        time.sleep(3)
    subprocess.run(["scancel", *ids], check=False, timeout=60)  # ours only: never leave them running
    logs = "" if run is None else "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                                            for p in sorted((run / "slurm" / "logs").glob("*.out")))
    pytest.fail(f"jobs {ids} not finished after {timeout_s:.0f}s (cancelled); sacct: {rows}\n{logs}")


def _failed_logs(run: Path, rows: list[dict[str, str]]) -> str:
    bad = [r for r in rows if r["State"] != "COMPLETED"]
    out = [f"{r['JobID']} {r['JobName']}: {r['State']} {r['ExitCode']}" for r in bad]
    for p in sorted((run / "slurm" / "logs").glob("*.out")):
        if any(re.search(rf"_{re.escape(r['JobID'])}\.out$", p.name) for r in bad):
            out.append(f"--- {p.name}\n{p.read_text()[-3000:]}")
    return "\n".join(out)


@pytest.mark.timeout(CHAIN_TIMEOUT_S + 300)
def test_pipeline_chain_completes_and_exports_a_child(slurm_env, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**slurm_env, "MP_BLD_SHARDS": "2", "MP_SCORE_SHARDS": "2",
           # GKD with 2 processes: torchrun under srun, DP=2 over gloo (the multi-process launch path)
           "MP_CPU_PROCS_PER_NODE": "2"}
    cfg_path = tmp_path / "debug_eval_pp2.yaml"  # evaluate split over 2 pipeline stages (torchrun, 2 ranks)
    cfg_path.write_text(yaml.safe_dump({**(c := yaml.safe_load(DEBUG_CFG.read_text())),
                                        "evaluate": {**c["evaluate"], "pipeline_parallel": 2}}))
    out = _run(["bash", str(SLURM / "submit_pipeline.sh"), str(cfg_path), str(run)], env=env, cwd=REPO)
    jobs = [line.split("\t") for line in (run / "slurm" / "jobs.tsv").read_text().splitlines()]
    stages = [s for s, _ in jobs]
    assert stages == ["parent", "bld", "bld-verify", "score", "score-merge", "measure", "mip", "realize", "gkd",
                      "evaluate", "export"], out
    ids = [j for _, j in jobs]
    rows = _wait(ids, len(ids) + 2, CHAIN_TIMEOUT_S, run)  # 2 array jobs x 2 tasks
    table = _sacct_table(ids)
    with capsys.disabled():
        print(f"\n[test_slurm] sacct of the pipeline chain ({run}):\n{table}")
    assert all(r["State"] == "COMPLETED" for r in rows), _failed_logs(run, rows)
    assert {r["JobID"] for r in rows} >= {f"{ids[1]}_0", f"{ids[1]}_1", f"{ids[3]}_0", f"{ids[3]}_1"}

    cfg = json.loads((run / "export" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert list((run / "export").glob("model*.safetensors")), "no safetensors in RUN/export"
    manifest = json.loads((run / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["stages"].items()} == dict.fromkeys(
        ["parent", "data", "bld", "score", "measure", "mip", "realize", "gkd", "evaluate", "export"], "done")
    # the arrays really split the work: each BLD task planned half the blocks and trained only
    # its own layers (with 2 DP ranks per task, rank 0 logs just its own blocks)
    for task, layers in ((0, {"L000", "L001"}), (1, {"L002", "L003"})):
        log = (run / "slurm" / "logs" / f"mp-bld_{ids[1]}_{task}.out").read_text()
        assert "[bld] 16 blocks in the search space" in log, log[-2000:]
        trained = set(re.findall(r"^\[bld\] (L\d{3})\.\S+: nmse", log, re.MULTILINE))
        assert trained and trained <= layers, (task, trained)
    scores = json.loads((run / "scores.json").read_text())
    library = json.loads((run / "library" / "index.json").read_text())
    assert set(scores["blocks"]) == set(library["blocks"])
    # GKD ran as 2 torchrun ranks, evaluate as 2 pipeline stages
    assert json.loads((run / "gkd" / "result.json").read_text())["world"] == {"tp": 1, "dp": 2}
    assert json.loads((run / "eval.json").read_text())["pipeline_parallel"] == 2
    log = next((run / "slurm" / "logs").glob("mp-evaluate_*.out")).read_text()
    assert "[slurm] evaluate: world 2 = TP x PP 2 x DP 1" in log, log[-2000:]


def _digest(p: Path) -> tuple[str, int]:
    return hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns


def _shard_state(run: Path, layer: str) -> Path | None:
    """RUN/state/bld/<hash>/ of the block set (shard) that trains this layer's blocks."""
    for plan in (run / "state" / "bld").glob("*/plan.json"):
        if any(k.startswith(layer) for rank in json.loads(plan.read_text())["assign"] for k in rank):
            return plan.parent
    return None


def _latest_step(state: Path | None) -> int:
    f = None if state is None else state / "rank000" / "latest"
    try:
        return int(f.read_text().strip().rsplit("_", 1)[-1]) if f else 0
    except (OSError, ValueError):
        return 0


@pytest.mark.timeout(45 * 60)
def test_bld_array_task_cancelled_midway_resumes_only_its_shard(slurm_env, tmp_path, capsys):
    run = tmp_path / "run"
    logs = run / "slurm" / "logs"
    logs.mkdir(parents=True)
    cfg = yaml.safe_load(DEBUG_CFG.read_text())
    # 400 steps per block (a minute or so): time to cancel a task between two checkpoints
    cfg["bld"].update(tokens_per_block=400 * 4 * 32, checkpoint_every=10, log_every=50)
    cfg_path = tmp_path / "bld_restart.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    def sbatch(*args: str) -> str:
        return _run(["sbatch", "--parsable", "--time=00:30:00", *args], env=slurm_env, cwd=REPO).strip().split(";")[0]

    parent = sbatch(f"--output={logs}/%x_%j.out", str(SLURM / "parent.sbatch"), str(cfg_path), str(run))
    array = sbatch(f"--output={logs}/%x_%A_%a.out", "--array=0-1", f"--dependency=afterok:{parent}",
                   "--kill-on-invalid-dep=yes", str(SLURM / "bld.sbatch"), str(cfg_path), str(run), "2")
    try:
        # shard 1 (layers 2, 3) has a checkpoint: cancel that task, leave shard 0 running
        t0, step = time.monotonic(), 0
        while step < 10:
            assert time.monotonic() - t0 < 900, f"shard 1 wrote no checkpoint; sacct {_sacct([parent, array])}"
            states = {r["JobID"]: r["State"] for r in _sacct([parent, array])}
            assert "FAILED" not in states.values() and "CANCELLED" not in states.values(), states
            step = _latest_step(_shard_state(run, "L002"))
            time.sleep(0.5)
        _run(["scancel", f"{array}_1"])
        rows = _wait([parent, array], 3, 900, run)
    except BaseException:
        subprocess.run(["scancel", parent, array], check=False, timeout=60)
        raise
    states = {r["JobID"]: r["State"].split()[0] for r in rows}
    assert states == {parent: "COMPLETED", f"{array}_0": "COMPLETED", f"{array}_1": "CANCELLED"}, states

    shard1 = _shard_state(run, "L002")
    saved = _latest_step(shard1)
    assert 10 <= saved < 400, f"shard 1 should have been cancelled mid-way, latest checkpoint {saved}"
    blocks = run / "library" / "blocks"
    shard0_files = {p.name: _digest(p) for p in blocks.glob("L00[01].*.safetensors")}
    assert len(shard0_files) == 16  # 2 layers x (4 attention + 4 FFN variants), parent's own included
    index0 = {k: v for k, v in json.loads((run / "library" / "index.json").read_text())["blocks"].items()
              if k.startswith(("L000", "L001"))}
    trained_before = {k for k, v in json.loads((run / "library" / "index.json").read_text())["blocks"].items()
                      if k.startswith(("L002", "L003")) and v["init"] != "parent"}
    assert not trained_before, f"shard 1 was cancelled before writing its blocks, yet {trained_before} exist"

    # resubmit just that task
    again = sbatch(f"--output={logs}/%x_%A_%a.out", "--array=1", str(SLURM / "bld.sbatch"), str(cfg_path), str(run),
                   "2")
    rows = _wait([again], 1, 900, run)
    with capsys.disabled():
        print(f"\n[test_slurm] sacct of the BLD restart ({run}):\n{_sacct_table([parent, array, again])}")
    assert [r["State"] for r in rows] == ["COMPLETED"], _failed_logs(run, rows)

    log = (logs / f"mp-bld_{again}_1.out").read_text()
    m = re.search(r"\[bld\] resumed (\d+) block\(s\) from step (\d+)", log)
    assert m, f"the resubmitted task did not resume:\n{log[-3000:]}"
    assert int(m.group(2)) == saved
    assert set(re.findall(r"^\[bld\] (L\d{3})\.\S+: nmse", log, re.MULTILINE)) == {"L002", "L003"}
    # the other shard's blocks: same bytes, never rewritten
    assert {p.name: _digest(p) for p in blocks.glob("L00[01].*.safetensors")} == shard0_files
    index = json.loads((run / "library" / "index.json").read_text())["blocks"]
    assert {k: v for k, v in index.items() if k.startswith(("L000", "L001"))} == index0
    assert len(index) == 32 and all(v["status"] == "done" for v in index.values())
    assert not (shard1 / "rank000").exists(), "finished shard state should be cleaned up"
