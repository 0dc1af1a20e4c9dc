"""What the no-op kinds share: the subblock is skipped (no weights, not even its norm)."""

from __future__ import annotations

from .base import BlockKind, SubblockModules


class NoOpKind(BlockKind):
    """The subblock is skipped: no weights, not even its norm (no-op attention and no-op FFN differ
    only in their subblock; search_space.<subblock>_no_op offers them)."""

    kind = "no_op"
    identity = True
    block_config_flag = "no_op"

    def megatron_spec(self, arch, v, config, use_te: bool) -> SubblockModules:
        from .megatron_modules import identity

        return identity()

    def offered(self, space, parent, own):
        return [self.variant()] if getattr(space, f"{self.subblock}_no_op") and own.kind != self.kind else []

    def init_from(self, arch, parent_v, v, local, scores=None):
        return {}, "no_op"
