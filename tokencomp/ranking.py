"""Ranking helper shared by the engine and selectors."""

from __future__ import annotations

import torch


def best_mask(scores: torch.Tensor, candidates: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` bool mask of the ``budget[b]`` highest ``scores`` among ``candidates`` per row.

    Every candidate outranks every non-candidate, whatever its score (``-inf`` included), so exactly
    ``min(budget, #candidates)`` are kept. Ties go to the earlier token (stable sorts), so results
    do not depend on the batch layout (official method code takes the unspecified order of torch's
    top-k among ties).
    """
    masked = torch.where(candidates, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    # Second, stable pass on "is a candidate": candidates first, in score order.
    order = order.gather(1, torch.sort((~candidates.gather(1, order)).to(torch.int8), dim=-1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < budget[:, None])
