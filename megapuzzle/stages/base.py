"""What a stage is (the registry, megapuzzle.stages, lists one per package) and what stages share
when `megapuzzle run` runs them. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from megapuzzle.config import RunDir


@dataclass(frozen=True)
class Stage:
    name: str
    """Its key in RUN/manifest.json and in `megapuzzle run --only/--until`."""
    sections: tuple[str, ...]
    """The config sections it reads: a change to one re-runs it (and everything after it)."""
    command: str
    """The `megapuzzle` subcommand that runs it alone."""
    module: str
    """The module holding that command's add_cli_args / run_cli."""
    summary: str
    """One line for `megapuzzle --help`."""
    sbatch: str | None = None
    """Its SLURM job script under slurm/ (None: it runs inside another stage's job)."""
    schema: str | None = None
    """"module:Class" of its own config section (torch-free, megapuzzle/config/), validated before
    the first stage of `megapuzzle run` starts."""
    run_stage: Callable[[RunDir, dict], dict] | None = None
    """What `megapuzzle run` does for it: (RUN, the whole config) -> its JSON-able result for the
    manifest. Defined in the stage's package, importing its heavy modules only when it runs."""


def fusion_max_run(cfg: dict) -> int:
    """search_space.fusion_max_run (1: no fused-run candidates): bld, score and mip read it."""
    from megapuzzle.arch import SearchSpace

    return SearchSpace.from_dict(cfg.get("search_space")).fusion_max_run
