"""No-op attention (`no_op`): the subblock is skipped, no weights, not even the norm."""

from __future__ import annotations

from .base import ATTENTION
from .noop import NoOpKind


class NoOpAttention(NoOpKind):
    subblock = ATTENTION
