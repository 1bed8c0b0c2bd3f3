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
window keeps ``int(static · α)`` static and each frame ``int(dynamic · α)`` dynamic tokens, α = 0.4;
the dropped tokens leave the KV cache of layers 0-10 too (``elastic_cache.py`` L183-L185): the
recipes' stage 2 has ``evict_earlier: true``.

Windows are the runs of equal labels after ``refine_clusters`` (short runs relabelled, see
:func:`refine_labels`).

Deviations. Stage 1: a static cluster sits in its
centre's slot in the window's first frame; the merged value is the mean of all member tokens over
the window (the mean of window means); no density noise; the stage keeps exactly its budget: the
tokens PruneVid keeps rank first (4 + centre score), so a budget above their count keeps the next
tokens unmerged (all other tokens score 0: ties go to the earlier token, so those come from the
first frames on, and they leave their clusters' means) and a budget below drops the weakest centres. Stage 2: the attention rows of the previous layer
are the official ones (un-rotated q/k, no mask, max over heads, then max over the text rows), from
the engine's probes (q/k projections of the captured rows, no attention matrix); the per-window / per-frame α is the ``quota`` selector's proportional split over frames (a window's
static tokens live in its first frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer
from tokencomp.mergers.recycle import cluster_members, dpc_knn, pack_merges, shared_plan, top_stable
from tokencomp.scorers.dycoke import KEEP, frame_states, video_index


def refine_labels(labels: list[int]) -> list[int]:
    """PruneVid's ``refine_clusters`` (``modeling_pllava.py`` L213-L316) on one video's frame labels:
    each cluster keeps its longest run(s) of consecutive frames (a cluster whose runs are all single
    frames keeps none); every other run is relabelled, left to right, with the label of the longer of
    its two neighbouring runs (the left one on a tie; label 0 when it has no neighbour)."""
    out = list(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            runs.setdefault(labels[start], []).append((start, t - 1))
            start = t
    for segs in runs.values():
        longest = max(e - s + 1 for s, e in segs)
        for s, e in segs:
            if longest == 1 or e - s + 1 != longest:
                out[s : e + 1] = [-1] * (e - s + 1)
    t, n = 0, len(out)
    while t < n:
        if out[t] != -1:
            t += 1
            continue
        s = t
        while t < n and out[t] == -1:
            t += 1
        e = t - 1
        left = right = None
        left_len = right_len = 0
        if s > 0:
            left, j = out[s - 1], s - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_len = s - 1 - j
        if e < n - 1:
            right, j = out[e + 1], e + 1
            while j < n and out[j] == right:
                j += 1
            right_len = j - e - 1
        label = left if left_len > right_len else right if right_len > left_len else (left if left is not None else right)
        out[s : e + 1] = [0 if label is None else label] * (e - s + 1)
    return out


def temporal_windows(x: torch.Tensor, ratio: float, k: int = 7) -> list[tuple[int, int]]:
    """Runs ``(start, end)`` (inclusive) of frames in the same DPC-kNN temporal cluster, after the
    official refinement (:func:`refine_labels`; one host sync)."""
    T = x.shape[0]
    c = max(1, int(T * ratio))
    score, dist = dpc_knn(x.mean(1), k)
    labels = refine_labels(cluster_members(dist, top_stable(score, c)).tolist())
    ends = [t for t in range(T - 1) if labels[t + 1] != labels[t]] + [T - 1]
    return [(a + 1, e) for a, e in zip([-1] + ends[:-1], ends)]


def _clusters(feat: torch.Tensor, ratio: float, k: int, threshold: int):
    """``(centres, assign, centre scores)`` of PruneVid's clustering of ``feat`` (n, D), or of each set
    of a batch (..., n, D). ``assign`` is None when no cluster is made (``int(n · ratio) = 0``)."""
    n = feat.shape[-2]
    if n <= threshold:
        ar = torch.arange(n, device=feat.device).expand(feat.shape[:-1])
        return ar, ar, torch.ones(feat.shape[:-1], device=feat.device)
    c = int(n * ratio)
    score, dist = dpc_knn(feat, k)
    centres = top_stable(score, c)
    if c == 0:
        return centres, None, score[..., :0]
    return centres, cluster_members(dist, centres), score.gather(-1, centres)


def prunevid_plan(view: LayerView, tau: float, temporal_ratio: float, cluster_ratio: float, k: int = 7, threshold: int = 14):
    """Per sample: ``(scores (S,), merges)`` (see :func:`tokencomp.mergers.recycle.apply_merges`).

    Static positions of every window at once; the clustering loops over the windows, all frames of a
    window clustered together."""
    h = view.hidden
    dev = h.device
    plans = []
    for b, videos in enumerate(video_index(view)):
        score = torch.full(view.vision_mask.shape[1:], KEEP, device=dev)
        slots, members, owner = [], [], []
        n_slots = 0
        for idx in videos:
            T, P = idx.shape
            x = frame_states(h, b, idx)
            unit = torch.nn.functional.normalize(x, dim=-1)
            tier = torch.zeros(T, P, device=dev)
            windows = temporal_windows(x, temporal_ratio, k)
            # s_l = (Σ_{w,t} cos(X[w,l], X[t,l]) − W) / (W(W−1)), Σ_{w,t} = |Σ_w unit|² (as einsum computes it).
            sums = torch.stack([unit[s : e + 1].sum(0) for s, e in windows])  # (n_windows, P, D)
            pair = torch.bmm(sums.view(-1, 1, sums.shape[-1]), sums.view(-1, sums.shape[-1], 1)).view(len(windows), P)
            W = torch.tensor([e - s + 1 for s, e in windows], device=dev, dtype=pair.dtype)[:, None]
            static = ((pair - W) / (W * (W - 1)) > tau) & (W > 1)
            n_static = static.sum(1).tolist()
            # Per window: static positions, then dynamic ones, each in order (stable sort).
            order = torch.sort((~static).to(torch.int8), dim=1, stable=True).indices
            for w, (s, e) in enumerate(windows):
                n_win = e - s + 1
                pos, dyn = order[w, : n_static[w]], order[w, n_static[w] :]
                if n_static[w]:
                    # Static positions: their mean over the window, clustered; a cluster's members are
                    # its positions' tokens in every frame.
                    centres, assign, cs = _clusters(x[s : e + 1, pos].mean(0), cluster_ratio, k, threshold)
                    tier[s, pos[centres]] = 4.0 + torch.sigmoid(cs)
                    if assign is not None:
                        slots.append(idx[s, pos[centres]])
                        members.append(idx[s : e + 1][:, pos].flatten())
                        owner.append((assign + n_slots).repeat(n_win))
                        n_slots += centres.numel()
                # Dynamic positions: each frame's tokens clustered on their own, all frames at once
                # (the same clusters as frame by frame; a centre's sigmoid score may differ in the last
                # bit, as CPU kernels round a vector's tail elements differently).
                centres, assign, cs = _clusters(x[s : e + 1][:, dyn], cluster_ratio, k, threshold)  # (W, c)
                cpos = dyn[centres]
                tier[s : e + 1].scatter_(1, cpos, 4.0 + torch.sigmoid(cs))
                if assign is not None:
                    c = centres.shape[-1]
                    slots.append(idx[s : e + 1].gather(1, cpos).flatten())
                    members.append(idx[s : e + 1][:, dyn].flatten())
                    owner.append((assign + n_slots + c * torch.arange(n_win, device=dev)[:, None]).flatten())
                    n_slots += n_win * c
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
        return torch.stack([s for s, _ in shared_plan(prunevid_plan, view, self.tau, self.temporal_ratio, self.cluster_ratio)])


@dataclass(frozen=True)
class PruneVidQuestionScorer(Scorer):
    """PruneVid stage 2: the most attention any text token after the vision tokens pays each vision token."""

    name = "prunevid_question"
    attention = "previous"
    # As elastic_cache.py / llama.py: rows from the un-rotated q/k over every key, max over heads.
    attention_rows = MappingProxyType({"rope": False, "causal": False, "heads": "max"})

    max_queries: int = field(default=0, metadata={"min": 0})
    """At most this many text rows (the last ones); 0: every text row after the video, as the official code."""

    def queries(self, view: LayerView) -> torch.Tensor:
        S = view.vision_mask.shape[1]
        ar = torch.arange(S, device=view.vision_mask.device)
        last_vis = torch.where(view.vision_mask, ar, torch.full_like(ar, -1)).max(1).values
        rows = view.text_mask & (ar[None] > last_vis[:, None]) & (ar[None] <= view.last_index[:, None])
        rows[torch.arange(S, device=ar.device)[None] == view.last_index[:, None]] = True
        n = int(rows.sum(1).max())
        Q = min(self.max_queries, n) if self.max_queries else n
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
