"""HoliTom (NeurIPS 2025) outside-LLM stage: temporal windows of static tokens, merged; per-frame
top tokens of the rest. With the ``holitom`` merger; the inside-LLM part is a ``fastv`` stage with
the ``holitom_inner`` merger (see ``tokencomp/mergers/holitom.py``).

Official code (cokeshao/HoliTom @ e9b2972, ``holitom/llava_arch.py``), per video of T frames × N
pooled tokens ``X``:

* ``sim[t, l] = cos(X[t, l], X[t+1, l])`` (L376-L380);
* windows by dynamic programming (``select_static_windows`` L53-L98): ``count[s, e]`` = positions
  with ``sim > τ`` on every transition of ``s…e``, times ``e − s`` (the frames they save);
  ``dp[i] = max(dp[i−1], max_{w ≥ 2} dp[i−w] + count[i−w+1, i])`` (first strict maximum), windows by
  back-tracking;
* ``r′ = min(r / ((T·N − saved) / (T·N)), 1)`` (L388-L390);
* a window of ≥ 2 frames: static positions (``sim > τ`` throughout, L295-L297) become their mean over
  the window (L303), then ``round(n_static · r′)`` DPC-kNN clusters (``k = min(7, clusters)``), each
  the mean of its members, centre included (``NO_BETA=1`` default, L100-L150, L199-L213);
* dynamic tokens: each frame keeps ``ceil(n_dyn · r′)`` by the ViT attention (``D = 0``: all dominant,
  none merged, L152-L161).

Here ``r`` is the stage's keep ratio and the kept set is scored in tiers (4 + salience for HoliTom's
tokens, salience below), so ``topk`` keeps it when the stage budget equals its count and fills or
trims by salience otherwise. A static cluster sits in its centre's slot in the window's first frame.
Deviations: the ViT attention is not available: salience is the dot product of a token with its
frame's normalised mean embedding; the input embeddings (after the projector) replace the pooled
ViT features; no density noise; tokens outside a video (images, the newline) are always kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer
from tokencomp.mergers.recycle import cluster_members, dpc_knn, pack_merges, top_stable
from tokencomp.scorers.dycoke import KEEP, video_frames


def salience(x: torch.Tensor) -> torch.Tensor:
    """``(T, P)`` stand-in for the ViT attention: each token's dot product with its frame's unit mean."""
    g = torch.nn.functional.normalize(x.mean(1), dim=-1)
    return torch.einsum("tpd,td->tp", x, g)


def squash(v: torch.Tensor) -> torch.Tensor:
    """Order-preserving map into (0, 1) for scores inside a tier."""
    return torch.sigmoid(v.float())


def static_windows(sim: torch.Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """HoliTom's windows ``[(start, end)]`` (inclusive) and the tokens they save."""
    T = sim.shape[0] + 1
    above = (sim > tau).float()
    count = torch.zeros(T, T, device=sim.device)
    for s in range(T - 1):
        run = torch.cumprod(above[s:], dim=0).sum(-1)  # static positions over s..s+1+j
        count[s, s + 1 :] = run * torch.arange(1, T - s, device=sim.device)
    count = count.tolist()
    dp, prev = [0.0] * T, [0] * T
    for i in range(T):
        best, best_j = (dp[i - 1] if i > 0 else 0.0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            val = (dp[j] if j >= 0 else 0.0) + count[j + 1][i]
            if val > best:
                best, best_j = val, j + 1
        dp[i], prev[i] = best, best_j
    out, i = [], T - 1
    while i >= 0:
        out.append((prev[i], i))
        i = prev[i] - 1
    return out[::-1], dp[-1]


def holitom_plan(view: LayerView, tau: float, max_window: int, k: int = 7):
    """Per sample: ``(scores (S,), merges)`` (see :func:`tokencomp.mergers.recycle.apply_merges`)."""
    h = view.hidden
    dev = h.device
    plans = []
    for b in range(h.shape[0]):
        score = torch.full(view.vision_mask.shape[1:], KEEP, device=dev)
        slots, members, owner = [], [], []
        for frames in video_frames(view, b):
            idx = torch.stack(frames)  # (T, P)
            T, P = idx.shape
            x = h[b, idx].float()
            sal = squash(salience(x))
            sim = torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1)
            windows, saved = static_windows(sim, tau, max_window)
            r = min(view.keep / ((T * P - saved) / (T * P)), 1.0) if T * P > saved else 1.0
            tier = torch.zeros(T, P, device=dev)
            for s, e in windows:
                static = (sim[s:e] > tau).all(0) if e > s else torch.zeros(P, dtype=torch.bool, device=dev)
                dyn = (~static).nonzero().flatten()
                n_keep = math.ceil(dyn.numel() * r)
                for t in range(s, e + 1):
                    top = dyn[top_stable(sal[t, dyn], n_keep)]
                    tier[t, top] = 4.0
                pos = static.nonzero().flatten()
                c = round(pos.numel() * r)
                if c > 0:
                    means = x[s : e + 1, pos].mean(0)
                    cscore, dist = dpc_knn(means, min(k, c))
                    centres = top_stable(cscore, c)
                    assign = cluster_members(dist, centres)
                    tier[s, pos[centres]] = 4.0 + squash(cscore[centres]) - sal[s, pos[centres]]
                    for j in range(c):
                        mem = pos[assign == j]
                        toks = idx[s : e + 1][:, mem].flatten()
                        slots.append(idx[s, pos[centres[j]]])
                        members.append(toks)
                        owner.append(torch.full_like(toks, len(slots) - 1))
            score[idx] = tier + sal
        plans.append((score, pack_merges(slots, members, owner, dev)))
    return plans


@dataclass(frozen=True)
class HoliTomScorer(Scorer):
    """HoliTom outside the LLM: static windows (merged by the ``holitom`` merger) and per-frame top tokens."""

    name = "holitom"

    tau: float = field(default=0.8, metadata={"min": -1.0, "max": 1.0})
    """Static threshold ``T`` (official 0.65 at 10% retention, 0.80 at 15% / 20%)."""
    max_window: int = field(default=1024, metadata={"min": 2})
    """Longest window (``MAX_WINDOW_SIZE``)."""

    def score(self, view: LayerView):
        return torch.stack([s for s, _ in holitom_plan(view, self.tau, self.max_window)])


@tokencomp.hookimpl
def register_scorers(register):
    register(HoliTomScorer)
