"""V²Drop (arXiv 2509.01552): score a vision token by how much its hidden state varied across the
previous layer, ``‖h(l) − h(l−1)‖`` on the raw residual stream. Needs no attention weights.

The variation is the previous layer's own update: its output minus its input. That is the
official ``h(l) − h(l−1)`` on every model where a layer's output is the next layer's input; on
Qwen3-VL, whose text model adds vision-encoder features to the vision tokens after layers 0–2
(deepstack), the injected features are not counted as variation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer


@dataclass(frozen=True)
class V2DropScorer(Scorer):
    """Token variation between adjacent layers (V²Drop); keeps the tokens that changed most."""

    name = "v2drop"
    default = True
    needs_prev_hidden = True

    metric: Literal["l2", "l1", "cosine"] = "l2"
    """``l2`` (paper default), ``l1``, or ``cosine`` (``1 − cos``, the paper's ablation)."""

    def score(self, view: LayerView) -> torch.Tensor:
        # Computed in the model's dtype on the residual stream, as the official code does; only the
        # difference tensor is allocated (B, S, D), no copy of the inputs.
        prev = view.prev_hidden
        h = view.prev_output if view.prev_output is not None else view.hidden
        if self.metric == "cosine":
            return 1.0 - torch.nn.functional.cosine_similarity(h, prev, dim=-1)
        delta = h - prev
        return torch.linalg.vector_norm(delta, ord=2 if self.metric == "l2" else 1, dim=-1)


@tokencomp.hookimpl
def register_scorers(register):
    register(V2DropScorer)
