"""SparseVLM token recycling (ICML 2025; Gumpest/SparseVLMs @ 26a5f48, v1/v1.5 only): the tokens a
stage prunes are not all lost; the most text-relevant of them are clustered and each cluster comes
back as one token.

Official code (``llava/model/language_model/modelling_sparse_llama.py`` L271-L300 and
``utils.py`` ``cluster_and_merge`` L179-L225), on the pruning layer's *output* states:

* candidates: the ``int(0.3 * n_pruned) + 1`` pruned image tokens with the highest rater score
  ``r`` (``relation_vis_text``: the mean over rater rows of the head-averaged attention);
* ``c = int(candidates / 10) + 1`` clusters by DPC-kNN: ``d_ij = ‖x_i − x_j‖₂ / √D``,
  ``ρ_i = exp(−mean of d² over the k = c nearest, self included)`` (+ U(0, 1e-6) noise),
  ``δ_i`` = distance to the nearest token of higher density (the global maximum if none),
  centres = top-``c`` of ``ρ·δ``; each token joins its nearest centre, each centre itself;
* each recycled token is the uniform mean of its cluster; it is inserted after the kept image tokens.

Here the recycled tokens are *summary tokens*: the stage keeps exactly its budget ``k``, of which
``c = tokens`` are recycled (so a recipe asks for ``official kept + c``), and each recycled token
sits in its centre's slot (the centre's original position; SparseVLM v1 renumbers the compacted
sequence). ``r`` comes from the stage's attention rows when its scorer requested them (``sparsevlm``:
mean over the rater rows, as the official relation scores); without attention every pruned token
is a candidate in sequence order. No density noise: ties go to the earlier token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger


def dpc_knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN centre scores of the rows of ``x`` (N, D): ``(ρ·δ, d)`` with ``d`` the scaled distances.

    The shared density-peaks step of SparseVLM, FastVID, HoliTom and PruneVid (their
    ``cluster_dpc_knn``): ``d = cdist / √D``, ``ρ = exp(−mean of the k smallest d², self included)``,
    ``δ`` = distance to the nearest row of higher density (``max d`` if none). No noise."""
    N, D = x.shape
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None])[0] / (D**0.5)
    k = max(1, min(k, N))
    near = torch.topk(dist, k, dim=-1, largest=False).values
    density = torch.exp(-(near**2).mean(-1))
    higher = density[None, :] > density[:, None]
    dmax = dist.max() if N else dist.new_zeros(())
    delta = torch.where(higher, dist, dmax).min(-1).values if N else density
    return delta * density, dist


def top_stable(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``values`` (ties: the earlier one)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


def cluster_members(dist: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index (into ``centres``) of each row's nearest centre; centres join themselves."""
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(len(centres), device=dist.device)
    return assign


def relation_scores(view: LayerView) -> torch.Tensor:
    """``(B, S)`` rater relation ``r``: mean over the non-empty attention rows (zeros without attention)."""
    if view.attention is None:
        return torch.zeros(view.vision_mask.shape, device=view.hidden.device)
    att = view.attention.float()
    rows = (att.sum(-1) > 0).sum(1, keepdim=True).clamp(min=1)
    return att.sum(1) / rows


@dataclass(frozen=True)
class RecycleMerger(Merger):
    """SparseVLM recycling: cluster the most relevant pruned tokens (DPC-kNN), one mean token per cluster."""

    name = "recycle"

    tokens: int = field(default=9, metadata={"min": 1})
    """Recycled tokens per sample (official: ``int((int(0.3 * n_pruned) + 1) / 10) + 1``), taken from the budget."""
    ratio: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})
    """Fraction of the pruned tokens that are candidates (official 0.3, plus one)."""

    def summary_tokens(self, budget):
        return torch.clamp(budget, max=self.tokens)

    def merge(self, view: LayerView, kept, dropped, summary):
        h = view.hidden
        out = h.clone()
        slots = torch.zeros_like(kept)
        rel = relation_scores(view)
        for b in range(h.shape[0]):
            c = int(summary[b])
            if c <= 0:
                continue
            idx = dropped[b].nonzero().flatten()
            n_cand = max(c, min(len(idx), int(len(idx) * self.ratio) + 1))
            cand = idx[top_stable(rel[b, idx], n_cand)]
            score, dist = dpc_knn(h[b, cand], c)
            centres = top_stable(score, c)
            assign = cluster_members(dist, centres)
            onehot = (assign[:, None] == torch.arange(c, device=h.device)).float()  # (N, c)
            means = (onehot.T @ h[b, cand].float()) / onehot.sum(0)[:, None]
            out[b, cand[centres]] = means.to(h.dtype)
            slots[b, cand[centres]] = True
        return out, slots


@tokencomp.hookimpl
def register_mergers(register):
    register(RecycleMerger)


def pack_merges(slots: list, members: list, owner: list, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(slots, members, owner)`` triple :func:`apply_merges` reads, from lists built per group
    (three empty tensors when nothing merges)."""
    if not slots:
        return (torch.zeros(0, dtype=torch.long, device=device),) * 3
    return torch.stack(slots), torch.cat(members), torch.cat(owner)


def apply_merges(h: torch.Tensor, out: torch.Tensor, b: int, kept: torch.Tensor, merges, beta=None) -> None:
    """Write merged states into ``out[b]``: ``merges`` is ``(slots (M,), members (E,), owner (E,))``,
    sequence indices of the merge targets, of the member tokens and the target each member goes to.
    A kept slot becomes the mean of its members, itself and the dropped ones (``beta``: FastVID's ``w·x + (1 − w)·mean`` with
    ``w = max(beta, 1 / (members + 1))``); slots the selector dropped are left alone."""
    slots, members, owner = merges
    if slots.numel() == 0:
        return
    # Kept tokens other than the target survive on their own: not merged into it.
    own = (~kept[b, members]) | (members == slots[owner])
    members, owner = members[own], owner[own]
    hb = h[b].float()
    sums = torch.zeros(slots.numel(), hb.shape[-1], device=h.device).index_add_(0, owner, hb[members])
    cnt = torch.zeros(slots.numel(), device=h.device).index_add_(0, owner, torch.ones_like(owner, dtype=torch.float32))
    mean = sums / cnt.clamp(min=1)[:, None]
    if beta is not None:
        w = torch.clamp(1.0 / (cnt + 1), min=beta)[:, None]
        mean = torch.where(cnt[:, None] > 0, w * hb[slots] + (1 - w) * mean, hb[slots])
    else:
        mean = torch.where(cnt[:, None] > 0, mean, hb[slots])
    ok = kept[b, slots]
    out[b, slots[ok]] = mean[ok].to(out.dtype)
