"""No-op FFN (`no_op`): the subblock is skipped, no weights, not even the norm."""

from __future__ import annotations

from .base import FFN, BlockKind, SubblockModules


class NoOpFFN(BlockKind):
    subblock = FFN
    kind = "no_op"
    identity = True
    block_config_flag = "no_op"

    def megatron_spec(self, arch, v, config, use_te: bool) -> SubblockModules:
        from .megatron_modules import identity

        return identity()

    def offered(self, space, parent, own):
        return [self.variant()] if space.ffn_no_op and own.kind != self.kind else []

    def init_from(self, arch, parent_v, v, local, scores=None):
        return {}, "no_op"
