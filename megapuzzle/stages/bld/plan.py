"""The BLD plan: its config (the `bld:` section), the blocks a search space asks for, and how
they split over ranks. Pure bookkeeping, no training (megapuzzle.stages.bld.bld runs the stage,
megapuzzle.stages.bld.train one rank's loop); both import this, so neither imports the other."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from megapuzzle.arch import Architecture, LayerArch, SearchSpace
from megapuzzle.config.bld import FP8_RECIPES, BLDConfig  # noqa: F401 (the plan's config)
from megapuzzle.errors import UserError
from megapuzzle.library import attention_key, ffn_key, layer_key


# ----------------------------------------------------------------------------- the block plan

@dataclass(frozen=True)
class BlockSpec:
    """One library block BLD is responsible for."""

    key: str
    layer: int
    kind: str  # attention | ffn | layer
    variant: LayerArch
    """attention blocks: (variant, parent FFN); ffn blocks: (parent attention, variant); layer: the pair."""
    parent_own: bool
    """The parent's own subblock(s): written from the parent's tensors, never trained."""
    last: int | None = None
    """A fused-run block (megapuzzle.stages.fusion_runs, kind ffn): it replaces layers `layer`..`last`,
    learning the parent's stream out of `last` from the stream into `layer`. None: one layer."""

    @property
    def end(self) -> int:
        """The layer whose output the block learns."""
        return self.layer if self.last is None else self.last

    def num_params(self, arch: Architecture) -> int:
        a = arch.attention_params(self.variant.attention) if self.kind != "ffn" else 0
        f = arch.ffn_params(self.variant.ffn) if self.kind != "attention" else 0
        return a + f


def plan_blocks(arch: Architecture, space: SearchSpace, cfg: BLDConfig) -> list[BlockSpec]:
    """Every block of the search space for the selected layers; the parent's own ones included.
    Decoupled and coupled libraries both carry the parent's own decoupled blocks (realize then
    always finds the parent's subblocks)."""
    layers = cfg.layers if cfg.layers is not None else tuple(range(arch.num_layers))
    for i in layers:
        if not 0 <= i < arch.num_layers:
            raise UserError(f"bld.layers has {i}, but the parent has layers 0..{arch.num_layers - 1}")
    out: list[BlockSpec] = []
    for i in layers:
        own = arch.layers[i]
        attns, ffns = space.attention_variants(arch, i), space.ffn_variants(arch, i)
        out.append(BlockSpec(attention_key(i, own.attention), i, "attention", own, True))
        out.append(BlockSpec(ffn_key(i, own.ffn), i, "ffn", own, True))
        if cfg.mode == "decoupled":
            out += [BlockSpec(attention_key(i, a), i, "attention", LayerArch(a, own.ffn), False)
                    for a in attns if a != own.attention]
            out += [BlockSpec(ffn_key(i, f), i, "ffn", LayerArch(own.attention, f), False)
                    for f in ffns if f != own.ffn]
            continue
        if cfg.coupled_pairs == "all":
            pairs = [LayerArch(a, f) for a in attns for f in ffns]
        else:
            names_a, names_f = {a.name: a for a in attns}, {f.name: f for f in ffns}
            pairs = []
            for a, f in cfg.coupled_pairs:
                if a not in names_a or f not in names_f:
                    raise UserError(f"bld.coupled_pairs has {a}+{f}, but layer {i}'s search space offers "
                                    f"attention {sorted(names_a)} and FFN {sorted(names_f)}")
                pairs.append(LayerArch(names_a[a], names_f[f]))
        out += [BlockSpec(layer_key(i, p), i, "layer", p, p == own) for p in pairs]
    return out


def check_tensor_parallel(arch: Architecture, blocks: list[BlockSpec], tp: int) -> None:
    for b in blocks:
        try:
            arch.with_layers([b.variant]).validate_tensor_parallel(tp)
        except ValueError as e:
            raise UserError(f"block {b.key} cannot run at tensor_parallel={tp}: {e}") from None


def split_work(blocks: list[BlockSpec], arch: Architecture, n: int) -> list[list[str]]:
    """Greedy longest-processing-time split by parameter count (+1 so no-op blocks spread too)."""
    loads, out = [0] * n, [[] for _ in range(n)]
    for b in sorted(blocks, key=lambda b: (-b.num_params(arch), b.key)):
        r = min(range(n), key=lambda j: (loads[j], j))
        loads[r] += b.num_params(arch) + 1
        out[r].append(b.key)
    return [sorted(x) for x in out]


def tensor_sig(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]
