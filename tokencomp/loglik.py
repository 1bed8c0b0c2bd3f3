"""Scoring text with a compressed forward: the causal-LM loss from its compacted logits.

A forward whose decoder dropped tokens returns logits only for the tokens that survived, in order;
:attr:`Stats.output_positions <tokencomp.stats.Stats.output_positions>` holds each one's original
position. Only vision tokens are ever dropped, so every text token (a continuation to score, the
context token before it) keeps its logits: put back at their positions, they score a continuation
exactly as the untouched model would (up to the effect of the compression on the values).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["restore_logits", "causal_lm_loss"]

IGNORE = -100
"""The label of a position that is not scored (transformers' ``ignore_index``)."""


def restore_logits(logits: torch.Tensor, positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, ``length``, V) logits with ``logits[b, s]`` at ``positions[b, s]`` and zeros at the
    dropped positions; and the (B, ``length``) bool mask of the positions that have logits."""
    B, _, V = logits.shape
    positions = positions.to(logits.device)
    full = logits.new_zeros(B, length, V)
    full.scatter_(1, positions[..., None].expand(-1, -1, V), logits)
    present = torch.zeros(B, length, dtype=torch.bool, device=logits.device)
    present.scatter_(1, positions, True)
    return full, present


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, positions: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits)``: the mean next-token cross-entropy of ``labels`` (B, L; ``-100`` = not
    scored), as transformers computes it for ``model(..., labels=labels)``, and the full-length logits.

    ``logits`` may be a compressed forward's (B, S, V) with ``S < L``; ``positions`` is then that
    forward's ``Stats.output_positions``. No prediction is taken from a dropped position (the label
    after it is not scored); only vision tokens are dropped, so no text label is lost.
    """
    B, L = labels.shape
    if positions is not None and logits.shape[1] != L:
        logits, present = restore_logits(logits, positions, L)
    else:
        present = torch.ones(B, L, dtype=torch.bool, device=logits.device)
    target = labels[:, 1:].to(logits.device).clone()
    target[~present[:, :-1]] = IGNORE
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE
    )
    return loss, logits
