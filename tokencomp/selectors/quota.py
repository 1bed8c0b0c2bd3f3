"""Per-image / per-frame quotas: split the budget over groups so no image or frame is emptied by another."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Selector
from tokencomp.ranking import best_mask


def split_budget(counts: torch.Tensor, budget: torch.Tensor, min_per_group: int) -> torch.Tensor:
    """Split ``budget`` (B,) over groups with ``counts`` (B, G) live tokens, proportionally.

    Largest-remainder rounding makes the parts sum to the budget exactly; each non-empty group first
    gets ``min_per_group`` tokens when the budget allows it.
    """
    counts = counts.long()
    budget = torch.minimum(budget.long(), counts.sum(-1))
    nonempty = counts > 0
    floor_min = torch.minimum(counts, torch.full_like(counts, min_per_group)) * nonempty
    # Only guarantee the minimum where the whole budget can pay for it.
    floor_min = torch.where((floor_min.sum(-1) <= budget)[:, None], floor_min, torch.zeros_like(floor_min))
    rest = budget - floor_min.sum(-1)
    room = counts - floor_min
    total_room = room.sum(-1).clamp(min=1)
    exact = room.double() * rest[:, None].double() / total_room[:, None].double()
    alloc = exact.floor().long()
    short = rest - alloc.sum(-1)
    frac = torch.where(alloc < room, exact - alloc, torch.full_like(exact, -1.0))
    order = torch.sort(frac, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    alloc = alloc + (rank < short[:, None]).long()
    return floor_min + torch.minimum(alloc, room)


@dataclass(frozen=True)
class PerGroupQuota(Selector):
    """Top-k inside each image / video frame, with the budget split in proportion to their sizes."""

    name = "quota"

    min_per_group: int = field(default=1, metadata={"min": 0})
    """Tokens every image/frame keeps when the budget allows (0: pure proportional split)."""

    def select(self, scores, view: LayerView, budget):
        groups = torch.where(view.vision_mask, view.groups, torch.full_like(view.groups, -1))
        num = int(groups.max().item()) + 1 if groups.numel() else 0
        if num <= 0:
            return torch.zeros_like(view.vision_mask)
        ids = torch.arange(num, device=groups.device)
        member = groups[:, :, None] == ids  # (B, S, G)
        alloc = split_budget(member.sum(1), budget, self.min_per_group)
        kept = torch.zeros_like(view.vision_mask)
        for g in range(num):
            kept |= best_mask(scores, member[:, :, g], alloc[:, g])
        return kept


@tokencomp.hookimpl
def register_selectors(register):
    register(PerGroupQuota)
