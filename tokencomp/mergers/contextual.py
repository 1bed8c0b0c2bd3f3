"""Contextual summary tokens (VisionZip, CVPR 2025, ``dvlab-research/VisionZip`` ``utils.py``): the
dropped tokens are grouped around evenly spaced targets by cosine similarity, and each group becomes
one token, ``h[target] + mean(h[members])``.

VisionZip does this on the vision encoder's penultimate hidden states and groups by that layer's
head-averaged keys, before the projector; here it runs on the states the stage sees (projected
embeddings for an input stage) and groups by their cosine similarity. VisionZip feeds the LLM
``cat([dominant, contextual])`` (``clip_encoder.py`` L83): the dominant tokens in sequence order, then
the contextual ones in target order. ``place: after`` (the default) does the same: the image's kept
slots keep their places and the states are laid into them in that order, so with renumbered
positions (``renumber: true``) every token gets VisionZip's position. ``place: in_place`` leaves each
contextual token in its target's slot instead (for M-RoPE models, whose positions are the patch's
place in the grid). Several images in one prompt share the sample's budget and one set of targets
(VisionZip works per image); each contextual token goes after the dominant tokens of its target's
image. Sums and counts are taken in float32 (a bf16 count is not exact above 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger


@dataclass(frozen=True)
class ContextualMerger(Merger):
    """VisionZip's contextual tokens: each summarises a group of similar dropped tokens."""

    name = "contextual"

    tokens: int = field(default=10, metadata={"min": 1})
    """Summary tokens per sample (VisionZip: 30 / 20 / 10 for 192 / 128 / 64), taken from the budget."""
    place: Literal["after", "in_place"] = "after"
    """Where the contextual tokens go: after their image's dominant tokens (VisionZip), or in their targets' slots."""

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
        out = torch.where(slots[:, :, None], merged, h)
        if self.place == "after":
            # A sample whose dropped tokens all became targets merged nothing (keep = 1): its
            # summary tokens are its own tokens, so it keeps its order (the identity).
            out = summaries_last(out, kept, slots & members.any(1, keepdim=True), view.groups)
        return out, slots


def summaries_last(h: torch.Tensor, kept: torch.Tensor, slots: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``h`` with the states of the held tokens (``kept | slots``) of each image reordered: first the
    kept ones, then the summary tokens (``slots``), each in sequence order. The held slots themselves
    do not move (positions, masks and the cache stay ascending): only which state each one carries.
    An image is a stretch of held tokens, in sequence order, with one ``groups`` value."""
    B, S, D = h.shape
    held = kept | slots
    pos = torch.arange(S, device=h.device).expand(B, S)
    # The held slots in sequence order, then the others (which keep their states).
    dest = torch.sort(torch.where(held, pos, pos + S), dim=1, stable=True).indices
    g = groups.gather(1, dest)
    new_image = torch.ones_like(dest, dtype=torch.bool)
    new_image[:, 1:] = g[:, 1:] != g[:, :-1]
    image = torch.cumsum(new_image.long(), 1)
    is_held, is_summary = held.gather(1, dest), slots.gather(1, dest)
    # Sort key of each state: its image, kept before summary, then its place; the others after all.
    key = torch.where(is_held, (image * 2 + is_summary.long()) * S + dest, (2 * S + 3) * S + dest)
    src = dest.gather(1, torch.sort(key, dim=1, stable=True).indices)
    index = dest[:, :, None].expand(-1, -1, D)
    return h.scatter(1, index, h.gather(1, src[:, :, None].expand(-1, -1, D)))


@tokencomp.hookimpl
def register_mergers(register):
    register(ContextualMerger)
