"""Baselines: ``random`` (seeded), ``uniform`` (spatially strided per image) and ``none`` (keeps the
earliest tokens: a plain truncation that needs no information at all)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer


@dataclass(frozen=True)
class RandomScorer(Scorer):
    """Random scores from a seeded generator (same seed, same selection)."""

    name = "random"

    seed: int = 0
    """Seed; combined with the layer index so that stages draw differently."""

    def score(self, view: LayerView):
        # One draw per token index within the sample: a sample gets the same scores whatever batch
        # it is in and however it is padded.
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1000003 + view.layer)
        table = torch.rand(int(view.token_index.max()) + 1, generator=gen).to(view.hidden.device)
        return table[view.token_index.clamp(min=0)]


@dataclass(frozen=True)
class UniformScorer(Scorer):
    """Evenly spread selection over each image's token grid: keeps every k-th token per image."""

    name = "uniform"

    def score(self, view: LayerView):
        # Rank inside each group (image/frame) in reading order; a bit-reversal-like priority
        # ((rank * golden ratio) mod 1) spreads any budget evenly over the grid.
        vis = view.vision_mask
        groups = torch.where(vis, view.groups, torch.full_like(view.groups, -1))
        rank = torch.zeros_like(groups)
        for g in torch.unique(groups[groups >= 0]).tolist():
            member = groups == g
            rank = torch.where(member, torch.cumsum(member.long(), 1) - 1, rank)
        return -((rank.double() * 0.6180339887498949) % 1.0)


@dataclass(frozen=True)
class NoneScorer(Scorer):
    """No information: prefers earlier tokens (truncation). A floor for comparisons."""

    name = "none"

    def score(self, view: LayerView):
        return -view.token_index.float()


@tokencomp.hookimpl
def register_scorers(register):
    register(RandomScorer)
    register(UniformScorer)
    register(NoneScorer)
