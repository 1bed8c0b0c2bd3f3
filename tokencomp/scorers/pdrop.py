"""PyramidDrop (CVPR 2025): the last instruction token's attention computed with the drop layer's
own norm and q/k projections on its input (PDrop ranks with the first layer of the new stage)."""

from __future__ import annotations

from dataclasses import dataclass

import tokencomp
from tokencomp.interfaces import LayerView, Scorer


@dataclass(frozen=True)
class PDropScorer(Scorer):
    """Attention of the last instruction token with the drop layer's own q/k (PyramidDrop)."""

    name = "pdrop"
    attention = "current"

    def score(self, view: LayerView):
        return view.attention[:, 0, :]


@tokencomp.hookimpl
def register_scorers(register):
    register(PDropScorer)
