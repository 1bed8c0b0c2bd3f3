"""DivPrune (CVPR 2025, arXiv 2503.02175): keep a maximally *diverse* subset of the vision tokens,
the greedy solution of the max-min diversity problem on cosine distances. No attention, no text.

Official algorithm (vbdi/divprune @ 799e2d9, ``LLaVA/llava/model/llava_arch.py``:
``pairwise_cosine_similarity`` L147-L150, ``DivPrune`` L152-L171, the call L365-L385), on the
projector outputs spliced into the LLM input (``LAYER_INDEX=0``):

* ``D = 1 - X̂ X̂ᵀ`` over the image's ``N`` tokens (rows L2-normalised);
* first pick: the token whose *nearest neighbour* is farthest, ``argmax_j min_{i != j} D[i, j]``
  (the code takes the second-smallest entry of each column, the smallest being the self-distance);
* then ``k - 1`` times: ``argmax_j min_{t} D[s_t, j]`` over the already selected ``s_t``
  (``torch.argmax``: ties go to the earliest token);
* ``k = round(r * N)`` (here the engine's ``floor(n * keep)``: recipes write ``keep`` so that both agree);
  the kept tokens stay in their original order.

The selection runs on ``view.hidden``: the decoder's input embeddings for a stage at ``layer: 0``
(the official setting), the residual stream entering the layer otherwise. Differences from the
official code:

* batched: every sample gets its own selection and budget (the official code selects on batch
  item 0 at the literal offset 35 and applies that to every row); distances are computed in float32
  (the official code uses the model dtype);
* a selected token is never picked twice (the official loop would re-pick one, duplicating it in
  the sequence, only when every remaining token is an exact duplicate of a selected one);
* ``per_group: false`` (default) treats all vision tokens of a sample as one set, as the official
  code treats its one image (LLaVA-1.6: the whole AnyRes sequence); ``per_group: true`` splits the
  budget over images / video frames like the ``quota`` selector and runs the greedy inside each.

The ``scores`` argument is ignored: DivPrune needs no scorer (use ``scorer: none``); ties in the
greedy go to the earlier token, as with ``torch.argmax``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Selector
from tokencomp.selectors.quota import split_budget


def maxmin_select(x: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Greedy max-min diversity selection on cosine distances, independently for each row.

    ``x`` (R, N, D) features, ``valid`` (R, N) bool members, ``k`` (R,) how many to pick per row
    (capped at the row's member count). Returns the (R, N) bool mask of the picked members.
    """
    R, N = valid.shape
    k = torch.minimum(k.long(), valid.sum(1))
    picked = torch.zeros_like(valid)
    steps = int(k.max()) if R else 0
    if steps == 0:
        return picked
    unit = x.float()
    unit = unit / torch.linalg.vector_norm(unit, dim=-1, keepdim=True).clamp(min=1e-12)
    unit = unit * valid[..., None]
    ar = torch.arange(N, device=x.device)
    # First pick: the largest nearest-neighbour distance (min over the other members of each column).
    nearest = torch.empty(R, N, device=x.device)
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        dist = 1.0 - torch.bmm(unit, unit[:, c0:c1].transpose(1, 2))  # (R, N, c)
        other = valid[:, :, None] & (ar[:, None] != ar[None, c0:c1])[None]
        nearest[:, c0:c1] = torch.where(other, dist, torch.full_like(dist, float("inf"))).amin(1)
    score = torch.where(valid, nearest, torch.full_like(nearest, float("-inf")))
    closest = None
    rows = torch.arange(R, device=x.device)
    for step in range(steps):
        s = torch.argmax(score, dim=1)  # first maximum: ties to the earlier token
        active = step < k
        picked[rows[active], s[active]] = True
        d = 1.0 - torch.bmm(unit, unit[rows, s][:, :, None])[..., 0]  # (R, N) distance to the new pick
        closest = d if closest is None else torch.minimum(closest, d)
        score = torch.where(valid & ~picked, closest, torch.full_like(closest, float("-inf")))
    return picked


def _compact(member: torch.Tensor):
    """Columns that bring each row's members to the front, in order: ``(R, M)`` and their validity."""
    M = int(member.sum(1).max()) if member.numel() else 0
    cols = torch.sort((~member).to(torch.int8), dim=1, stable=True).indices[:, :M]
    return cols, member.gather(1, cols)


@dataclass(frozen=True)
class DivPrune(Selector):
    """Max-min diverse subset of the vision tokens by cosine distance (DivPrune); ignores scores."""

    name = "divprune"

    per_group: bool = False
    """Split the budget over images / video frames (like ``quota``) and diversify inside each."""
    min_per_group: int = field(default=1, metadata={"min": 0})
    """With ``per_group``: tokens every image/frame keeps when the budget allows."""

    def select(self, scores, view: LayerView, budget):
        vis, hidden = view.vision_mask, view.hidden
        B, S = vis.shape
        budget = torch.minimum(budget.to(vis.device).long().clamp(min=0), vis.sum(1))
        if self.per_group:
            groups = torch.where(vis, view.groups, torch.full_like(view.groups, -1))
            G = int(groups.max()) + 1 if groups.numel() else 0
            if G <= 0:
                return torch.zeros_like(vis)
            member = (groups[:, None, :] == torch.arange(G, device=vis.device)[None, :, None]).reshape(B * G, S)
            k = split_budget(member.view(B, G, S).sum(-1), budget, self.min_per_group).reshape(-1)
            sample = torch.arange(B, device=vis.device).repeat_interleave(G)
        else:
            member, k, sample = vis, budget, torch.arange(B, device=vis.device)
        cols, valid = _compact(member)
        picked = maxmin_select(hidden[sample[:, None], cols], valid, k)
        kept = torch.zeros_like(member).scatter(1, cols, picked & valid)
        if self.per_group:
            kept = kept.view(B, -1, S).any(1)
        return kept & vis


@tokencomp.hookimpl
def register_selectors(register):
    register(DivPrune)
