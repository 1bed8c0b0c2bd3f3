"""Which tokens a compacted sequence holds, and in which order: a pure function of masks.

A batch stays rectangular after samples keep different numbers of tokens: short rows are padded
with *filler* slots, tokens that would have been dropped, marked dead (hidden as keys everywhere,
see :mod:`tokencomp.masks`). Original order is kept, so positions stay ascending.
"""

from __future__ import annotations

import torch

from .ranking import best_mask


def compact(stay: torch.Tensor, spare: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, alive)`` of the compacted sequence.

    ``stay``: ``(B, S)`` bool, the tokens that remain (live). ``spare``: ``(B, S)`` bool, tokens that
    may fill short rows (disjoint from ``stay``; there are always enough when ``stay | spare`` covers
    every row). ``rank``: ``(B, S)`` float, fillers are the highest-ranked spares (ties: earlier).

    ``order``: ``(B, S')`` long indices into the old sequence, ascending in every row, with
    ``S' = max(stay.sum(1))``; ``alive``: ``(B, S')`` bool, False exactly on filler slots.
    """
    row_len = stay.sum(1)
    width = int(row_len.max()) if row_len.numel() else 0
    fill = width - row_len
    held = stay
    if bool(fill.any()):
        held = stay | best_mask(rank, spare & ~stay, fill)
    order = torch.sort((~held).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return order, stay.gather(1, order)
