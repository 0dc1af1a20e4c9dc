"""The layering rules of docs/design.md, asserted on the import graph read from the source
(tools/import_graph.py), and the torch-free core, asserted by importing it in a fresh process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

GRAPH = import_graph.import_graph(ROOT)
COMMANDS = {"megapuzzle.cli", "megapuzzle.info", "megapuzzle.pipeline", "megapuzzle.bench.baselines",
            "megapuzzle.bench.search_quality"}
"""Modules that only drive other code: nothing below them may import them."""
STORAGE_PREFIXES = ("megapuzzle.library", "megapuzzle.fileio", "megapuzzle.checkpoints")
ALGORITHM_PREFIXES = ("megapuzzle.init", "megapuzzle.stages.", "megapuzzle.mip", "megapuzzle.bench",
                      "megapuzzle.pipeline", "megapuzzle.metrics", "megapuzzle.fuse")
"""Every stage's package (not the registry, megapuzzle.stages itself), the solver, the drivers."""
TORCH_FREE = ("megapuzzle.arch", "megapuzzle.config", "megapuzzle.config.rules", "megapuzzle.config.bld",
              "megapuzzle.config.gkd", "megapuzzle.config.score", "megapuzzle.config.measure", "megapuzzle.config.mip",
              "megapuzzle.config.evaluate", "megapuzzle.config.parent", "megapuzzle.config.pipeline",
              "megapuzzle.costs.table", "megapuzzle.mip", "megapuzzle.stages.mip.mip", "megapuzzle.roofline",
              "megapuzzle.arch_table", "megapuzzle.cli", "megapuzzle.pipeline", "megapuzzle.stages", "megapuzzle.stages.runner", "megapuzzle.stages.bld",
              "megapuzzle.blocks", "megapuzzle.families", "megapuzzle.launch")


def _starts(mod: str, prefixes) -> bool:
    return any(mod.startswith(p) if p.endswith(".") else mod == p or mod.startswith(p + ".") for p in prefixes)


def _violations(sources, forbidden) -> list[str]:
    return [f"{m} -> {d}" for m in sorted(GRAPH) if sources(m) for d in sorted(GRAPH[m]) if forbidden(d)]


def test_the_graph_is_read():
    # a sanity floor, so the rules below cannot pass on an empty graph
    assert len(GRAPH) > 50 and "megapuzzle.library" in GRAPH["megapuzzle.stages.mip.mip"]


def test_no_import_cycles():
    assert import_graph.cycles(GRAPH) == []


def test_the_tool_finds_a_cycle(tmp_path):
    pkg = tmp_path / "megapuzzle"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from megapuzzle.b import g\n")
    (pkg / "b.py").write_text("from megapuzzle import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megapuzzle import a\n")
    graph = import_graph.import_graph(tmp_path)
    assert import_graph.cycles(graph) == [["megapuzzle.a", "megapuzzle.b"]]
    assert graph["megapuzzle.c"] == set()


def test_the_solver_core_reads_no_files():
    assert _violations(lambda m: m == "megapuzzle.mip" or m.startswith("megapuzzle.mip."),
                       lambda d: _starts(d, STORAGE_PREFIXES) or not d.startswith("megapuzzle.mip")
                       and d not in ("megapuzzle.errors", "megapuzzle.arch")) == []


def test_nothing_imports_the_benchmarks():
    assert _violations(lambda m: not m.startswith("megapuzzle.bench"), lambda d: d.startswith("megapuzzle.bench")) == []


def test_nothing_imports_a_command_module_but_commands():
    assert _violations(lambda m: m not in COMMANDS, lambda d: d in COMMANDS) == []


def test_the_run_directory_knows_no_weights_format():
    assert _violations(lambda m: m == "megapuzzle.config" or m.startswith("megapuzzle.config."),
                       lambda d: _starts(d, STORAGE_PREFIXES + ALGORITHM_PREFIXES) or d.startswith("megapuzzle.model")) == []


def test_storage_imports_no_algorithm():
    assert _violations(lambda m: _starts(m, STORAGE_PREFIXES), lambda d: _starts(d, ALGORITHM_PREFIXES)) == []


def test_the_engine_side_scripts_import_no_megapuzzle():
    # they run inside vLLM's / another transformers' environment, or ship with every export
    for mod in ("megapuzzle.serving.vllm_worker", "megapuzzle.serving.hf_reader_check",
                "megapuzzle.checkpoints.hf_modeling.configuration_decilm"):
        assert GRAPH[mod] == set(), mod
    assert GRAPH["megapuzzle.checkpoints.hf_modeling.modeling_decilm"] == {
        "megapuzzle.checkpoints.hf_modeling.configuration_decilm"}  # a relative import, shipped beside it


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_core_and_the_config_schemas_import_no_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'megatron') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
