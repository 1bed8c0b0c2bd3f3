"""ToMe merging (Bolya et al., ICLR 2023): each kept token becomes the mean of its ToMe group, the
tokens that rounds of bipartite soft matching merged into it (sizes add up across rounds, so the
size-weighted averages of ``merge_wavg`` amount to the plain mean of the original members).

The rounds are those of the ``tome`` scorer (see :mod:`tokencomp.scorers.tome`), recomputed here for
the kept count; use the same ``r`` in both. A sample whose kept set is not ToMe's survivors (another
scorer or selector chose it) has each dropped token folded into its most similar kept token
(cosine), every kept token the mean of itself and the tokens it absorbed. No summary tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger
from tokencomp.scorers.tome import tome_groups


@dataclass(frozen=True)
class ToMeMerger(Merger):
    """Replace each kept token by the mean of its ToMe group (bipartite soft matching rounds)."""

    name = "tome"

    r: int = field(default=16, metadata={"min": 0})
    """Tokens merged per matching round; the same as the ``tome`` scorer's."""

    def merge(self, view: LayerView, kept, dropped, summary):
        h = view.hidden
        B, S, D = h.shape
        dev = h.device
        ar = torch.arange(S, device=dev)
        cols, valid, dest = tome_groups(view, kept.sum(1), self.r)
        M = cols.shape[1]
        # ToMe's assignment, in sequence indices: each vision token -> the survivor of its group.
        into_tome = ar.expand(B, S).clone()
        target = cols.gather(1, dest)
        into_tome = into_tome.scatter(1, cols, torch.where(valid, target, cols))  # padding cols: distinct non-vision
        survivors = torch.zeros_like(kept, dtype=torch.long).scatter_add(1, cols, (valid & (dest == torch.arange(M, device=dev)[None])).long()) > 0
        agrees = (survivors == kept).all(1)
        # Fallback: the most similar kept token (cosine) of each dropped token.
        unit = torch.nn.functional.normalize(h.float(), dim=-1)
        sim = (unit @ unit.transpose(1, 2)).masked_fill(~kept[:, None, :], float("-inf"))
        nearest = torch.where(kept, ar.expand(B, S), sim.argmax(-1))
        into = torch.where(agrees[:, None], into_tome, nearest)
        member = kept | dropped
        weights = (member[:, :, None] & (into[:, :, None] == ar)).to(torch.float32)  # (B, S token, S group)
        sums = weights.transpose(1, 2) @ h.float()
        merged = (sums / weights.sum(1)[:, :, None].clamp(min=1)).to(h.dtype)
        return torch.where(kept[:, :, None], merged, h), torch.zeros_like(kept)


@tokencomp.hookimpl
def register_mergers(register):
    register(ToMeMerger)
