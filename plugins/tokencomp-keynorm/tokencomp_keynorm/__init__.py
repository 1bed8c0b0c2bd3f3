"""tokencomp plugin: the ``keynorm`` scorer, which ranks vision tokens by the norm of their hidden state.

Tokens whose residual stream has a large norm carry a lot of signal into the next layers; ``keynorm``
keeps those (``prefer: high``) or, for the opposite heuristic, the quiet ones (``prefer: low``).
It needs nothing but the hidden states entering the drop layer, so it works with every attention
implementation. Use it in a recipe::

    scorer: {name: keynorm, ord: 2.0}

This package is the template for writing a scorer plugin; see README.md next to pyproject.toml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import tokencomp
from tokencomp import LayerView, Scorer

__all__ = ["KeyNormScorer", "register_scorers"]
__version__ = "0.1.0"


@dataclass(frozen=True)
class KeyNormScorer(Scorer):
    """Norm of each vision token's hidden state entering the drop layer; keeps the largest by default."""

    name = "keynorm"
    # The class attributes of Scorer say what the engine must put in the view. The hidden states are
    # always there; set e.g. ``needs_prev_hidden = True`` or ``attention = "previous"`` if you need more.

    ord: float = 2.0
    """Order of the vector norm over the hidden dimension (2: Euclidean, 1: sum of absolute values)."""
    prefer: Literal["high", "low"] = "high"
    """``high`` keeps the tokens with the largest norm, ``low`` the smallest."""

    def __post_init__(self):
        # A ValueError here becomes a `file:line:` RecipeError pointing at the recipe's `scorer:`.
        if not self.ord > 0:
            raise ValueError(f"ord must be positive, got {self.ord}")

    def score(self, view: LayerView) -> torch.Tensor:
        # (B, S, D) -> (B, S). Only entries under view.vision_mask are used by the selector; the
        # norm is taken in float32 so half-precision hidden states cannot overflow.
        norms = torch.linalg.vector_norm(view.hidden.float(), ord=self.ord, dim=-1)
        return norms if self.prefer == "high" else -norms


@tokencomp.hookimpl
def register_scorers(register):
    """Register this plugin's scorers with tokencomp."""
    register(KeyNormScorer)
