"""Logging: stdlib `logging`, one logger per module, printed once per job.

Every module logs through `logging.getLogger(__name__)` (stages bind `log = ....info`). The CLI
calls `setup()` once: one handler on the "megapuzzle" logger writes plain lines to stdout, and a
filter lets through only rank 0 of a torchrun / SLURM job (a record with `extra={"all_ranks":
True}` passes on every rank). `prefixed("[gkd 1.5x] ")` prefixes every line logged inside it (the
benchmarks run many children). Libraries and tests that never call `setup()` get Python's default:
records propagate to the root logger (pytest's `caplog` sees them) and INFO is not printed.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Iterator

_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("megapuzzle_log_prefix", default="")
_HANDLER_FLAG = "_megapuzzle_handler"


def rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else $RANK (torchrun, SLURM
    via our launchers), else 0. torch is not imported for it."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


class RankZeroFilter(logging.Filter):
    """Passes rank 0's records (and any record logged with extra={"all_ranks": True})."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or rank() == 0


class _PrefixFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.prefix = _PREFIX.get()
        return True


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time of the record (a redirected or captured stdout
    after setup() still gets the lines)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup(level: int = logging.INFO, stream=None) -> None:
    """Print megapuzzle's INFO lines (rank 0 only) to `stream` (stdout). Idempotent."""
    root = logging.getLogger("megapuzzle")
    root.setLevel(level)
    if any(getattr(h, _HANDLER_FLAG, False) for h in root.handlers):
        return
    h = _StdoutHandler() if stream is None else logging.StreamHandler(stream)
    setattr(h, _HANDLER_FLAG, True)
    h.setFormatter(logging.Formatter("%(prefix)s%(message)s"))
    h.addFilter(RankZeroFilter())
    h.addFilter(_PrefixFilter())
    root.addHandler(h)
    root.propagate = False  # our handler prints it; not twice through a root handler


@contextlib.contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """Every megapuzzle line logged inside starts with `prefix` (nested prefixes add up)."""
    token = _PREFIX.set(_PREFIX.get() + prefix)
    try:
        yield
    finally:
        _PREFIX.reset(token)
