"""Merge each dropped token into its most similar kept token (ToMe-style, Bolya et al. ICLR 2023):
a kept token becomes the size-weighted mean of itself and the tokens merged into it. No new tokens,
so the budget is the selector's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger


@dataclass(frozen=True)
class NearestMerger(Merger):
    """Fold every dropped token into its most similar (cosine) kept token, averaging."""

    name = "nearest"

    def merge(self, view: LayerView, kept, dropped, summary):
        h = view.hidden
        S = h.shape[1]
        unit = torch.nn.functional.normalize(h.float(), dim=-1)
        sim = (unit @ unit.transpose(1, 2)).masked_fill(~kept[:, None, :], float("-inf"))
        target = sim.argmax(-1)  # (B, S)
        # Each kept token absorbs itself and the dropped tokens that chose it (all of size 1).
        into = torch.where(kept, torch.arange(S, device=h.device).expand_as(target), target)
        weights = ((kept | dropped)[:, :, None] & (into[:, :, None] == torch.arange(S, device=h.device))).to(h.dtype)
        merged = (weights.transpose(1, 2) @ h) / weights.sum(1)[:, :, None].clamp(min=1)
        return torch.where(kept[:, :, None], merged, h), torch.zeros_like(kept)


@tokencomp.hookimpl
def register_mergers(register):
    register(NearestMerger)
