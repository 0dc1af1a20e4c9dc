"""No-op FFN (`no_op`): the subblock is skipped, no weights, not even the norm."""

from __future__ import annotations

from .base import FFN
from .noop import NoOpKind


class NoOpFFN(NoOpKind):
    subblock = FFN
