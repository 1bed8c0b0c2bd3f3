"""Top-k selection: keep each sample's highest-scoring vision tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Selector


def topk_mask(scores: torch.Tensor, candidates: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` bool mask of the ``budget[b]`` highest ``scores`` among ``candidates`` per row.

    Ties go to the earlier token (a stable sort), so results do not depend on the batch layout.
    """
    masked = torch.where(candidates, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < budget[:, None])


@dataclass(frozen=True)
class TopK(Selector):
    """Keep the top-scoring vision tokens of each sample (default selector)."""

    name = "topk"

    min_keep: int = 0
    """Keep at least this many (the official V²Drop code uses ``max(1, ·)``: set 1 to mimic it)."""

    def select(self, scores, view: LayerView, budget):
        n = view.vision_mask.sum(-1)
        budget = torch.minimum(torch.clamp(budget, min=self.min_keep), n)
        return topk_mask(scores, view.vision_mask, budget)


@tokencomp.hookimpl
def register_selectors(register):
    register(TopK)
