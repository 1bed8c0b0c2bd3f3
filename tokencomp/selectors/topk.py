"""Top-k selection: keep each sample's highest-scoring vision tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Selector
from tokencomp.ranking import best_mask


@dataclass(frozen=True)
class TopK(Selector):
    """Keep the top-scoring vision tokens of each sample (default selector)."""

    name = "topk"
    default = True

    min_keep: int = field(default=0, metadata={"min": 0})
    """Keep at least this many (the official V²Drop code uses ``max(1, ·)``: set 1 to mimic it)."""

    def select(self, scores, view: LayerView, budget):
        n = view.vision_mask.sum(-1)
        budget = torch.minimum(torch.clamp(budget, min=self.min_keep), n)
        return best_mask(scores, view.vision_mask, budget)


@tokencomp.hookimpl
def register_selectors(register):
    register(TopK)
