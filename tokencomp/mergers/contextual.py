"""Contextual summary tokens (VisionZip, CVPR 2025, ``dvlab-research/VisionZip`` ``utils.py``): the
dropped tokens are grouped around evenly spaced targets by cosine similarity, and each group becomes
one token, ``h[target] + mean(h[members])``.

VisionZip does this on the vision encoder's penultimate hidden states and groups by that layer's
head-averaged keys, before the projector; here it runs on the states the stage sees (projected
embeddings for an input stage) and groups by their cosine similarity. A summary token sits in its
target's slot (the target's original position), so in the compacted sequence the contextual tokens
are interleaved, in raster order, with the dominant ones (VisionZip appends them after the dominant
tokens: with renumbered positions, 10-30 tokens get other positions). Several images in one prompt
share the sample's budget and one set of targets (VisionZip works per image). Sums and counts are
taken in float32 (a bf16 count is not exact above 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger


@dataclass(frozen=True)
class ContextualMerger(Merger):
    """VisionZip's contextual tokens: each summarises a group of similar dropped tokens."""

    name = "contextual"

    tokens: int = field(default=10, metadata={"min": 1})
    """Summary tokens per sample (VisionZip: 30 / 20 / 10 for 192 / 128 / 64), taken from the budget."""

    def summary_tokens(self, budget):
        return torch.clamp(budget, max=self.tokens)

    def merge(self, view: LayerView, kept, dropped, summary):
        B, S, _ = view.hidden.shape
        h = view.hidden
        # Rank of each dropped token among its sample's dropped tokens, in sequence order.
        rank = torch.cumsum(dropped.long(), 1) - 1
        n_rem = dropped.sum(1, keepdim=True)
        step = torch.clamp(n_rem // summary.clamp(min=1)[:, None], min=1)
        slots = dropped & (rank % step == 0) & (rank // step < summary[:, None])
        members = dropped & ~slots
        unit = torch.nn.functional.normalize(h.float(), dim=-1)
        sim = unit @ unit.transpose(1, 2)  # (B, S, S): member rows, target columns
        sim = sim.masked_fill(~slots[:, None, :], float("-inf"))
        target = sim.argmax(-1)  # (B, S) most similar slot of each token
        weights = (members[:, :, None] & (target[:, :, None] == torch.arange(S, device=h.device))).float()
        sums = weights.transpose(1, 2) @ h.float()  # (B, S, D): per target, the sum of its members
        counts = weights.sum(1)[:, :, None]
        merged = (h.float() + sums / counts.clamp(min=1)).to(h.dtype)
        return torch.where(slots[:, :, None], merged, h), slots


@tokencomp.hookimpl
def register_mergers(register):
    register(ContextualMerger)
