"""The distillation metrics every stage reports, from log-probabilities over the full vocabulary:
KL(parent || child), LM loss (next-token NLL), top-1 agreement with the parent, accuracy, and
top-k overlap. Score (replace-1-block), evaluate and GKD's held-out pass all use these, so "kl"
means the same number everywhere. Per-token values; callers sum them and divide once by the
token count (which they may all-reduce first)."""

from __future__ import annotations

import torch


def kl_per_token(parent_lp: torch.Tensor, child_lp: torch.Tensor) -> torch.Tensor:
    """KL(parent || child) per position, natural log; exactly 0 where child_lp is parent_lp."""
    return (parent_lp.exp() * (parent_lp - child_lp)).sum(-1)


def nll_per_token(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood per position (the LM loss before averaging)."""
    return -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def top1_matches(lp: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """1.0 where the argmax of `lp` equals `other` (token ids) or the argmax of `other` (log-probs)."""
    ref = other if other.dtype in (torch.int32, torch.int64) else other.argmax(-1)
    return (lp.argmax(-1) == ref).float()


def topk_overlap(parent_lp: torch.Tensor, child_lp: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the parent's top-k tokens that are also in the child's top-k, per position."""
    pk, ck = parent_lp.topk(k, dim=-1).indices, child_lp.topk(k, dim=-1).indices
    return (pk.unsqueeze(-1) == ck.unsqueeze(-2)).any(-1).float().mean(-1)


def heldout_metrics(acc: torch.Tensor, *, cosine_weight: float, kl_weight: float,
                    lm_weight: float) -> dict[str, float]:
    """GKD's held-out means from the summed [cosine, kl, lm, parent lm, tokens] (reduced over
    ranks), plus the loss those weights give."""
    n = max(acc[4].item(), 1.0)
    out = {"cosine": acc[0].item() / n, "kl": acc[1].item() / n, "lm_loss": acc[2].item() / n,
           "parent_lm_loss": acc[3].item() / n, "tokens": int(acc[4].item())}
    out["loss"] = cosine_weight * out["cosine"] + kl_weight * out["kl"] + lm_weight * out["lm_loss"]
    return out
