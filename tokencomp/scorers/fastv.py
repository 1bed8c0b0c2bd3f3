"""FastV (ECCV 2024): the last prompt token's head-averaged attention to each vision token, taken
from the layer *before* the drop layer (K−1 for a drop at K). Rows are computed from that layer's
own post-RoPE q/k, so the forward keeps its SDPA / FlashAttention kernel."""

from __future__ import annotations

from dataclasses import dataclass

import tokencomp
from tokencomp.interfaces import LayerView, Scorer


@dataclass(frozen=True)
class FastVScorer(Scorer):
    """Attention of the last prompt token at the previous layer (FastV)."""

    name = "fastv"
    attention = "previous"

    def score(self, view: LayerView):
        return view.attention[:, 0, :]


@tokencomp.hookimpl
def register_scorers(register):
    register(FastVScorer)
