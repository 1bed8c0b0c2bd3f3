"""MustDrop's window merge (arXiv 2411.10803; liuting20/MustDrop @ 909afa5,
``llava/model/multimodal_encoder/local_merge.py`` L114-L117 and ``merge``): the dropped tokens of a
window are averaged into the window's kept token. Officially a merged window's 8 other tokens are
scatter-added into its last (bottom-right) token and divided by 9: the mean of the window.

Here every dropped token goes to its window's destination when that is kept, else to the window's
last kept token; a window with no kept token is dropped without merging. Each kept token becomes
the mean of itself and the tokens it absorbed. Windows as in the ``mustdrop_window`` scorer (same
``window``). No summary tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger
from tokencomp.scorers.mustdrop import window_destinations


@dataclass(frozen=True)
class WindowMerger(Merger):
    """Average each dropped token into the kept token of its spatial window (MustDrop)."""

    name = "window"

    window: int = field(default=3, metadata={"min": 1})
    """Window side; the same as the ``mustdrop_window`` scorer's."""

    def merge(self, view: LayerView, kept, dropped, summary):
        h = view.hidden
        B, S, _ = h.shape
        ar = torch.arange(S, device=h.device).expand(B, S)
        dest = window_destinations(view, self.window)
        idx = dest.clamp(min=0)
        # Last kept token of each window (indexed by the window's destination), -1 if none.
        last_kept = torch.full((B, S), -1, dtype=torch.long, device=h.device).scatter_reduce(
            1, idx, torch.where(kept, ar, torch.full_like(ar, -1)), reduce="amax"
        )
        target = torch.where(kept.gather(1, idx), idx, last_kept.gather(1, idx))
        into = torch.where(kept, ar, torch.where(dropped & (dest >= 0), target, torch.full_like(ar, -1)))
        weights = (into[:, :, None] == torch.arange(S, device=h.device)).to(torch.float32)  # -1 matches nothing
        sums = weights.transpose(1, 2) @ h.float()
        merged = (sums / weights.sum(1)[:, :, None].clamp(min=1)).to(h.dtype)
        return torch.where(kept[:, :, None], merged, h), torch.zeros_like(kept)


@tokencomp.hookimpl
def register_mergers(register):
    register(WindowMerger)
