"""PruneVid (ACL 2025): stage 1 merges static tokens over temporal windows and clusters the rest
before the LLM (scorer ``prunevid`` + merger ``prunevid``); stage 2 keeps the vision tokens the
question attends to inside the LLM (scorer ``prunevid_question``, with the ``quota`` selector).

Official code (Visual-AI/PruneVid @ b12600c, ``models/pllava/modeling_pllava.py``
``merge_frames_dynamic``; PLLaVA only, the LLaVA-OneVision code is unreleased), per video ``X``
(T frames × L tokens):

* frame descriptors ``f_t = mean_l X[t, l]``, DPC-kNN (``k = 7``) into ``int(T · 0.25)`` temporal
  clusters, each frame to its nearest centre; windows = runs of equal labels;
* static positions of a window of W frames: ``s_l = (Σ_{w,t} cos(X[w,l], X[t,l]) − W) / (W(W−1)) > τ``;
  a static position becomes its mean over the window;
* the static tokens of a window, and the dynamic tokens of each frame, are clustered by DPC-kNN
  (``k = 7``) into ``int(count · cluster_ratio)`` tokens when there are more than 14, each cluster the
  mean of its members (its centre included).

Stage 2 (``models/pllava/llama.py``, ``elastic_cache.py``): at layer 10 (0-based), ``score_j = max
over heads and text rows after the video of softmax(q kᵀ/√d)`` (pre-RoPE, no causal mask); each
window keeps ``int(static · α)`` static and each frame ``int(dynamic · α)`` dynamic tokens, α = 0.4.

Deviations. Stage 1: ``refine_clusters`` (making temporal clusters contiguous by relabelling short
runs) is not reproduced, windows are the plain runs of equal labels; a static cluster sits in its
centre's slot in the window's first frame; the merged value is the mean of all member tokens over
the window (the mean of window means); no density noise; the stage keeps exactly its budget: the
tokens PruneVid keeps rank first (4 + centre score), so a budget above their count keeps the next
tokens unmerged and a budget below drops the weakest centres. Stage 2: head-*averaged* attention
rows of the previous layer (after RoPE, causal) from the engine's probes, max over the text rows;
the per-window / per-frame α is the ``quota`` selector's proportional split over frames (a window's
static tokens live in its first frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer
from tokencomp.mergers.recycle import cluster_members, dpc_knn, pack_merges, top_stable
from tokencomp.scorers.dycoke import KEEP, video_frames


def temporal_windows(x: torch.Tensor, ratio: float, k: int = 7) -> list[tuple[int, int]]:
    """Runs ``(start, end)`` (inclusive) of frames in the same DPC-kNN temporal cluster."""
    T = x.shape[0]
    c = max(1, int(T * ratio))
    score, dist = dpc_knn(x.mean(1), k)
    labels = cluster_members(dist, top_stable(score, c)).tolist()
    out, s = [], 0
    for t in range(1, T + 1):
        if t == T or labels[t] != labels[t - 1]:
            out.append((s, t - 1))
            s = t
    return out


def _clusters(feat: torch.Tensor, ratio: float, k: int, threshold: int):
    """``(centres, assign, centre scores)`` of PruneVid's clustering of ``feat`` (n, D)."""
    n = feat.shape[0]
    if n <= threshold:
        ar = torch.arange(n, device=feat.device)
        return ar, ar, torch.ones(n, device=feat.device)
    c = int(n * ratio)
    score, dist = dpc_knn(feat, k)
    centres = top_stable(score, c)
    return centres, cluster_members(dist, centres), score[centres]


def prunevid_plan(view: LayerView, tau: float, temporal_ratio: float, cluster_ratio: float, k: int = 7, threshold: int = 14):
    """Per sample: ``(scores (S,), merges)`` (see :func:`tokencomp.mergers.recycle.apply_merges`)."""
    h = view.hidden
    dev = h.device
    plans = []
    for b in range(h.shape[0]):
        score = torch.full(view.vision_mask.shape[1:], KEEP, device=dev)
        slots, members, owner = [], [], []

        def add(centre_tok, toks, assign, n_centres):
            base = len(slots)
            slots.extend(centre_tok.unbind(0))
            members.append(toks)
            owner.append(assign + base)

        for frames in video_frames(view, b):
            idx = torch.stack(frames)
            T, P = idx.shape
            x = h[b, idx].float()
            unit = torch.nn.functional.normalize(x, dim=-1)
            tier = torch.zeros(T, P, device=dev)
            for s, e in temporal_windows(x, temporal_ratio, k):
                W = e - s + 1
                if W > 1:
                    u = unit[s : e + 1]  # (W, P, D)
                    pair = torch.einsum("wpd,tpd->p", u, u)
                    static = (pair - W) / (W * (W - 1)) > tau
                else:
                    static = torch.zeros(P, dtype=torch.bool, device=dev)
                pos = static.nonzero().flatten()
                if pos.numel():
                    centres, assign, cs = _clusters(x[s : e + 1, pos].mean(0), cluster_ratio, k, threshold)
                    tier[s, pos[centres]] = 4.0 + torch.sigmoid(cs)
                    toks = idx[s : e + 1][:, pos]  # (W, n): every frame's token at each static position
                    add(idx[s, pos[centres]], toks.flatten(), assign.repeat(W), len(centres))
                dyn = (~static).nonzero().flatten()
                for t in range(s, e + 1):
                    centres, assign, cs = _clusters(x[t, dyn], cluster_ratio, k, threshold)
                    tier[t, dyn[centres]] = 4.0 + torch.sigmoid(cs)
                    add(idx[t, dyn[centres]], idx[t, dyn], assign, len(centres))
            score[idx] = tier
        plans.append((score, pack_merges(slots, members, owner, dev)))
    return plans


@dataclass(frozen=True)
class PruneVidScorer(Scorer):
    """PruneVid stage 1: static-token windows and DPC-kNN clusters; their centres rank first."""

    name = "prunevid"

    tau: float = field(default=0.8, metadata={"min": -1.0, "max": 1.0})
    """Static threshold on the mean pairwise cosine over a window."""
    temporal_ratio: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0})
    """Temporal clusters per frame (``temporal_segment_ratio``)."""
    cluster_ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """Clusters per token of a static set or a frame's dynamic set (when more than 14)."""

    def score(self, view: LayerView):
        return torch.stack([s for s, _ in prunevid_plan(view, self.tau, self.temporal_ratio, self.cluster_ratio)])


@dataclass(frozen=True)
class PruneVidQuestionScorer(Scorer):
    """PruneVid stage 2: the most attention any text token after the vision tokens pays each vision token."""

    name = "prunevid_question"
    attention = "previous"

    max_queries: int = field(default=256, metadata={"min": 1})
    """At most this many text rows (the last ones)."""

    def queries(self, view: LayerView) -> torch.Tensor:
        S = view.vision_mask.shape[1]
        ar = torch.arange(S, device=view.vision_mask.device)
        last_vis = torch.where(view.vision_mask, ar, torch.full_like(ar, -1)).max(1).values
        rows = view.text_mask & (ar[None] > last_vis[:, None]) & (ar[None] <= view.last_index[:, None])
        rows[torch.arange(S, device=ar.device)[None] == view.last_index[:, None]] = True
        Q = min(self.max_queries, int(rows.sum(1).max()))
        # The last Q rows of each sample, padded with -1.
        key = torch.where(rows, ar, torch.full_like(ar, -1))
        top = torch.sort(key, dim=1, descending=True, stable=True).values[:, :Q]
        return top

    def score(self, view: LayerView):
        return view.attention.max(1).values


@tokencomp.hookimpl
def register_scorers(register):
    register(PruneVidScorer)
    register(PruneVidQuestionScorer)
