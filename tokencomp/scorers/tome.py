"""ToMe (Token Merging, Bolya et al., ICLR 2023, arXiv 2210.09461) as a vision-token reducer: rounds
of bipartite soft matching until the stage's budget is left, every merge a size-weighted average.

Official matching (facebookresearch/ToMe @ af95e4b, ``tome/merge.py`` ``bipartite_soft_matching``
L17-L97, ``merge_wavg`` L210-L224), per round on the current token list:

* ``r = min(r, t // 2)`` (L43-L44: at most half the tokens per round);
* ``m̂ = m / ‖m‖``; set A = list positions ``0, 2, 4, …``, set B = ``1, 3, 5, …`` (L50-L51);
* ``S = m̂_A m̂_Bᵀ``; each A token's best match ``node_idx = argmax_B S``, ``node_max`` (L52-L59);
* A sorted by ``node_max`` descending: the first ``r`` are merged into their match, the rest stay
  (L60-L64); the new list is ``[unmerged A (in that order), all of B]`` (L80);
* ``merge_wavg``: ``x ← (Σ size·x) / Σ size`` over each B token and the A tokens merged into it,
  sizes add up (L217-L224).

Here ``m`` is the tokens' current state (the stage's hidden states, then the merged means): ToMe's
metric is the head-mean *keys* of the ViT block, which an input stage does not have. Rounds repeat
with ``r`` tokens each (``r = 0``: as many as a round allows, ``t // 2``) until the budget ``k`` is
left, the last round merging just ``t - k``; sizes carry across rounds (official ToMe), so a
merged token is the mean of all the original tokens in its group. All the vision tokens of a sample
form one list: several images (or frames) in one prompt can merge into each other and share the
budget unevenly (ToMe in a vision encoder matches within each image).

How it fits the engine (selector keeps the budget, merger folds the dropped tokens in): the
``tome`` *scorer* runs the rounds for the stage's budget ``floor(n * keep)`` and scores the
survivors 1, the merged-away tokens 0, so ``topk`` keeps exactly the survivors; the ``tome``
*merger* runs the same rounds again and replaces each survivor by the mean of its group. Use both
with the same ``r``; if the kept set is not ToMe's (another scorer or selector), the merger folds
every dropped token into its most similar kept token instead (as ``nearest``), averaging by size.

Differences from the official use in VLMs (LightCompress ``tome.py`` merges inside every CLIP block
with ``r = 16``, no size propagation, no proportional attention): here all rounds run at one stage
on the LLM-side embeddings (post-projector); the LLM never sees token sizes (no proportional
attention); each survivor keeps its own original position (ToMe reorders the sequence); ties go
to the earlier token (stable sorts, ``argmax``'s first maximum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.accounting import kept_count
from tokencomp.interfaces import LayerView, Scorer


def _pack(member: torch.Tensor):
    """Columns bringing each row's members to the front in order: ``(B, M)`` and their validity."""
    M = int(member.sum(1).max()) if member.numel() else 0
    cols = torch.sort((~member).to(torch.int8), dim=1, stable=True).indices[:, :M]
    return cols, member.gather(1, cols)


def bipartite_rounds(x: torch.Tensor, length: torch.Tensor, target: torch.Tensor, r: int = 0) -> torch.Tensor:
    """Repeated ToMe bipartite soft matching on ordered lists, independently per row.

    ``x`` (R, M, D) features of each row's list (entries past ``length[r]`` are padding), ``target``
    (R,) tokens to leave. Returns ``dest`` (R, M) long: the list entry each entry's group ended in
    (itself for a survivor); padding entries point to themselves.
    """
    R, M, D = x.shape
    dev = x.device
    state = x.float().clone()
    size = torch.ones(R, M, device=dev)
    dest = torch.arange(M, device=dev).expand(R, M).clone()
    lst = dest.clone()
    cur = length.clone().long()
    target = torch.minimum(target.long().clamp(min=0), cur)
    rows = torch.arange(R, device=dev)
    while True:
        step = cur // 2 if r <= 0 else torch.clamp(cur // 2, max=r)
        step = torch.minimum(step, cur - target)
        active = step > 0
        if not bool(active.any()):
            break
        a, b = lst[:, 0::2], lst[:, 1::2]
        a_ok = 2 * torch.arange(a.shape[1], device=dev)[None] < cur[:, None]
        b_ok = 2 * torch.arange(b.shape[1], device=dev)[None] + 1 < cur[:, None]
        unit = state / torch.linalg.vector_norm(state, dim=-1, keepdim=True).clamp(min=1e-12)
        ua = unit[rows[:, None], a]
        ub = unit[rows[:, None], b]
        sim = torch.bmm(ua, ub.transpose(1, 2)).masked_fill(~b_ok[:, None, :], float("-inf"))
        node_max, node_idx = sim.max(-1).values, sim.argmax(-1)
        node_max = node_max.masked_fill(~a_ok, float("-inf"))
        order = torch.sort(node_max, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(a.shape[1], device=dev).expand_as(order))
        src = a_ok & (rank < step[:, None]) & active[:, None]  # (R, |a|) merged this round
        dst = b.gather(1, node_idx)  # list entry of each A token's match
        # Size-weighted merge: Σ size·x and Σ size into the destinations.
        wsum = state * size[..., None]
        add_x = torch.where(src[..., None], wsum[rows[:, None], a], torch.zeros_like(ua))
        add_s = torch.where(src, size[rows[:, None], a], torch.zeros_like(size[:, : a.shape[1]]))
        wsum = wsum.scatter_add(1, dst[..., None].expand(-1, -1, D), add_x)
        size = size.scatter_add(1, dst, add_s)
        state = torch.where(size[..., None] > 0, wsum / size[..., None].clamp(min=1e-12), state)
        # Groups of merged A tokens move to their destination.
        remap = torch.arange(M, device=dev).expand(R, M).clone()
        remap = remap.scatter(1, a, torch.where(src, dst, a))  # a: distinct entries
        dest = remap.gather(1, dest)
        # New list: [unmerged A in descending node_max, all of B].
        a_sorted = a.gather(1, order)
        keep_a = (a_ok & ~src).gather(1, order)
        cand = torch.cat([a_sorted, b], 1)
        flag = torch.cat([keep_a, b_ok], 1)
        pack = torch.sort((~flag).to(torch.int8), dim=1, stable=True).indices[:, :M]
        lst = torch.where(active[:, None], cand.gather(1, pack), lst)
        cur = torch.where(active, cur - step, cur)
    return dest


def tome_groups(view: LayerView, budget: torch.Tensor, r: int):
    """``(cols, valid, dest)``: the vision tokens packed per sample, and the packed entry each one's
    group ended in after :func:`bipartite_rounds` leaves ``budget`` of them."""
    cols, valid = _pack(view.vision_mask)
    h = view.hidden.gather(1, cols[..., None].expand(-1, -1, view.hidden.shape[-1]))
    dest = bipartite_rounds(h, valid.sum(1), budget, r)
    return cols, valid, dest


@dataclass(frozen=True)
class ToMeScorer(Scorer):
    """ToMe bipartite soft matching: 1 for the tokens left after merging down to the budget, 0 for the merged."""

    name = "tome"

    r: int = field(default=16, metadata={"min": 0})
    """Tokens merged per matching round (0: the most a round allows, half the tokens)."""

    def __post_init__(self):
        if self.r < 0:
            raise ValueError("r must be at least 0")

    def score(self, view: LayerView):
        vis = view.vision_mask
        budget = kept_count(vis.sum(1), view.keep).to(vis.device)
        cols, valid, dest = tome_groups(view, budget, self.r)
        M = cols.shape[1]
        survivor = valid & (dest == torch.arange(M, device=vis.device)[None])
        out = torch.zeros(vis.shape, dtype=torch.float32, device=vis.device)
        return out.scatter_add(1, cols, (survivor & valid).float())


@tokencomp.hookimpl
def register_scorers(register):
    register(ToMeScorer)
