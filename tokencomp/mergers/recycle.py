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

import threading
import weakref
from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger


def dpc_knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN centre scores of the rows of ``x`` (N, D), or of each ``(N, D)`` set of a batch ``x``
    (..., N, D): ``(ρ·δ, d)`` with ``d`` the scaled distances.

    The shared density-peaks step of SparseVLM, FastVID, HoliTom and PruneVid (their
    ``cluster_dpc_knn``): ``d = cdist / √D``, ``ρ = exp(−mean of the k smallest d², self included)``,
    ``δ`` = distance to the nearest row of higher density (``max d`` of its set if none). No noise.
    A batch gives each set the same result as alone (the video methods score all frames at once)."""
    N, D = x.shape[-2:]
    xf = x.float()
    dist = torch.cdist(xf, xf) / (D**0.5)
    k = max(1, min(k, N))
    if N == 0:
        return dist.sum(-1), dist
    near = torch.topk(dist, k, dim=-1, largest=False).values
    density = torch.exp(-(near**2).mean(-1))
    higher = density[..., None, :] > density[..., :, None]
    dmax = dist.amax((-2, -1), keepdim=True)
    delta = torch.where(higher, dist, dmax).min(-1).values
    return delta * density, dist


def top_stable(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``values`` along the last dimension (ties: the earlier one)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def cluster_members(dist: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index (into ``centres``) of each row's nearest centre; centres join themselves. Batched:
    ``dist`` (..., N, N) and ``centres`` (..., c) give (..., N)."""
    assign = dist.gather(-1, centres[..., None, :].expand(*dist.shape[:-1], centres.shape[-1])).argmin(-1)
    ar = torch.arange(centres.shape[-1], device=dist.device).expand_as(centres)
    return assign.scatter(-1, centres, ar)


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
        for b, c in enumerate(summary.tolist()):  # one host sync for the batch
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


_plans = threading.local()


def shared_plan(make, view: LayerView, *params):
    """``make(view, *params)``, computed once for a view: a stage's scorer and merger see the same
    :class:`LayerView` and need the same plan (FastVID, HoliTom, PruneVid), so the merger takes the
    scorer's. Only the last plan of the thread is kept, with a weak reference to its view (dropped
    with the view); the key holds the function, the parameters and the version of ``view.hidden``,
    so a changed view or an in-place edit recomputes."""
    key = (make, params, view.hidden._version)
    last = getattr(_plans, "last", None)
    if last is not None and last[0]() is view and last[1] == key:
        return last[2]
    plan = make(view, *params)
    _plans.last = (weakref.ref(view, _forget), key, plan)
    return plan


def _forget(ref) -> None:
    """Drop the kept plan once its view is gone."""
    last = getattr(_plans, "last", None)
    if last is not None and last[0] is ref:
        _plans.last = None


def pack_merges(slots: list, members: list, owner: list, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(slots, members, owner)`` triple :func:`apply_merges` reads, from lists of 1-D tensors
    built per group (three empty tensors when nothing merges)."""
    if not slots:
        return (torch.zeros(0, dtype=torch.long, device=device),) * 3
    return torch.cat(slots), torch.cat(members), torch.cat(owner)


def member_sums(hb: torch.Tensor, members: torch.Tensor, owner: torch.Tensor, weight: torch.Tensor, slots: int):
    """``(sums (M, D), counts (M,))``: the ``weight``-ed (0 / 1) states ``hb[members]`` summed per owner
    slot, and how many were counted, in member list order."""
    # scatter_add_ with a row-expanded index adds in the same (list) order as index_add_ over rows, in
    # one kernel: on CPU index_add_ dispatches per member row (3x slower for FastVID's ~5 rows per token).
    d = hb.shape[-1]
    sums = torch.zeros(slots, d, device=hb.device).scatter_add_(0, owner[:, None].expand(-1, d), hb[members] * weight[:, None])
    return sums, torch.zeros(slots, device=hb.device).index_add_(0, owner, weight)


def apply_merges(h: torch.Tensor, out: torch.Tensor, b: int, kept: torch.Tensor, merges, beta=None,
                 kept_members: bool = False) -> None:
    """Write merged states into ``out[b]``: ``merges`` is ``(slots (M,), members (E,), owner (E,))``,
    sequence indices of the merge targets (distinct), of the member tokens and the target each member
    goes to. A kept slot becomes the mean of its members, itself and the dropped ones (``beta``:
    FastVID's ``w·x + (1 − w)·mean`` with ``w = max(beta, 1 / (members + 1))``); slots the selector
    dropped are left alone. Members the selector kept (other than the slot) are left out of the mean,
    unless ``kept_members``: FastVID averages every listed member, including tokens that survive on
    their own (another anchor's context tokens). No host sync: excluded members add exact zeros,
    each slot's sum still adds its members in list order."""
    slots, members, owner = merges
    if slots.numel() == 0:
        return
    # Kept tokens other than the target survive on their own: not merged into it (unless the
    # method's own means count them, see kept_members).
    own = torch.ones_like(members, dtype=torch.float32) if kept_members else ((~kept[b, members]) | (members == slots[owner])).float()
    hb = h[b].float()
    sums, cnt = member_sums(hb, members, owner, own, slots.numel())
    mean = sums / cnt.clamp(min=1)[:, None]
    if beta is not None:
        w = torch.clamp(1.0 / (cnt + 1), min=beta)[:, None]
        mean = torch.where(cnt[:, None] > 0, w * hb[slots] + (1 - w) * mean, hb[slots])
    else:
        mean = torch.where(cnt[:, None] > 0, mean, hb[slots])
    ok = kept[b, slots, None]
    out[b, slots] = torch.where(ok, mean.to(out.dtype), out[b, slots])
