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
  merged with the β blend of ``merge_tokens_by_clustering`` (L100-L150, L199-L213: the ``NO_BETA``
  switch of L137 defaults to "0", the blend; the ``"1"`` of L356 only feeds a log line):
  ``β · centre + (1 − β) · mean(other members)`` over window means, β = 0.6 (``BETA``);
* dynamic tokens: each frame keeps ``ceil(n_dyn · r′)`` by the ViT attention (``D = 0``: all dominant,
  none merged, L152-L161).

Here ``r`` is the stage's keep ratio and the kept set is scored in tiers (cluster centres 6 + their
density score, HoliTom's dynamic tokens 4 + salience, salience below), so ``topk`` keeps it when the
stage budget equals its count, fills by salience when larger, and trims dynamic tokens first when
smaller (the official count, with its per-frame ``ceil``, is usually a little above ``int(n · keep)``). A static cluster sits in its centre's slot in the window's first frame.
Deviations: the ViT attention is not available: salience is the dot product of a token with its
frame's normalised mean embedding (the features themselves are the official ones: the projector's
pooled outputs, the LLM input embeddings); no density noise; tokens outside a video (images, the
newline) are always kept; the official sequence puts a window's static tokens first, then its
dynamic tokens frame by frame, here every token stays in its frame's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer
from tokencomp.mergers.recycle import cluster_members, dpc_knn, pack_merges, shared_plan, top_stable
from tokencomp.scorers.dycoke import KEEP, frame_states, video_index

CENTRE = 6.0
"""Score tier of static cluster centres: above HoliTom's dynamic tokens (4 + salience), below ``KEEP``."""


def salience(x: torch.Tensor) -> torch.Tensor:
    """``(T, P)`` stand-in for the ViT attention: each token's dot product with its frame's unit mean."""
    g = torch.nn.functional.normalize(x.mean(1), dim=-1)
    return torch.einsum("tpd,td->tp", x, g)


def squash(v: torch.Tensor) -> torch.Tensor:
    """Order-preserving map into (0, 1) for scores inside a tier."""
    return torch.sigmoid(v.float())


def run_lengths(above: torch.Tensor) -> torch.Tensor:
    """``(T−1, P)`` long: for each transition ``t`` and position ``l``, how many consecutive transitions
    from ``t`` on have ``above`` (``above[t…t+n−1, l]`` all True for ``n ≤ run``)."""
    n = above.shape[0]
    t = torch.arange(n, device=above.device)[:, None]
    first_below = torch.where(above, n, t).flip(0).cummin(0).values.flip(0)
    return first_below - t


def _windows(runs: torch.Tensor, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """HoliTom's dynamic programming over frames, from :func:`run_lengths` (one host sync)."""
    n, P = runs.shape
    T = n + 1
    # gain[s][w]: positions static over the w transitions after frame s, times w (the frames saved).
    hist = torch.zeros(n, T, dtype=torch.long, device=runs.device).scatter_add_(1, runs, torch.ones_like(runs))
    gain = (hist.flip(1).cumsum(1).flip(1) * torch.arange(T, device=runs.device)).tolist()
    dp, prev = [0] * T, [0] * T
    for i in range(T):
        best, best_j = (dp[i - 1] if i > 0 else 0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            val = (dp[j] if j >= 0 else 0) + gain[j + 1][w - 1]
            if val > best:
                best, best_j = val, j + 1
        dp[i], prev[i] = best, best_j
    out, i = [], T - 1
    while i >= 0:
        out.append((prev[i], i))
        i = prev[i] - 1
    return out[::-1], float(dp[-1])


def static_windows(sim: torch.Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """HoliTom's windows ``[(start, end)]`` (inclusive) and the tokens they save, from the ``(T−1, P)``
    similarities of adjacent frames: ``dp[i] = max(dp[i−1], max_{w ≥ 2} dp[i−w] + gain(i−w+1, i))``
    (first strict maximum), ``gain`` = positions above ``tau`` on every transition of the window times
    its transitions. The gains come from run lengths in a few tensor ops; the recurrence runs on host
    integers (exact, so the same windows as the float loops of the official code)."""
    return _windows(run_lengths(sim > tau), max_window)


def holitom_plan(view: LayerView, tau: float, max_window: int, k: int = 7):
    """Per sample: ``(scores (S,), merges, core)``: ``merges`` as :func:`tokencomp.mergers.recycle.apply_merges`
    reads them, ``core`` (E,) bool marks the members at their cluster centre's own position (the
    centre's window mean, which the official β blend weighs apart from the other members).

    Batched over the frames of a video: static positions of every window and the dynamic top tokens of
    every frame at once; the clustering loops over the windows that have static tokens."""
    h = view.hidden
    dev = h.device
    plans = []
    for b, videos in enumerate(video_index(view)):
        score = torch.full(view.vision_mask.shape[1:], KEEP, device=dev)
        slots, members, owner, core = [], [], [], []
        n_slots = 0
        for idx in videos:  # (T, P)
            T, P = idx.shape
            x = frame_states(h, b, idx)
            sal = squash(salience(x))
            sim = torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1)
            runs = run_lengths(sim > tau)
            windows, saved = _windows(runs, max_window)
            r = min(view.keep / ((T * P - saved) / (T * P)), 1.0) if T * P > saved else 1.0
            start = torch.tensor([s for s, _ in windows], device=dev)
            width = torch.tensor([e - s for s, e in windows], device=dev)
            # static[w, l]: above tau on every transition of window w (none in a one-frame window).
            static = (runs[start.clamp(max=T - 2)] >= width[:, None]) & (width > 0)[:, None]
            n_static = static.sum(1).tolist()
            frame_window = torch.repeat_interleave(torch.arange(len(windows), device=dev), width + 1, output_size=T)
            # Each frame keeps its window's ceil(n_dyn · r) dynamic tokens with the highest salience.
            n_keep = torch.tensor([math.ceil((P - n) * r) for n in n_static], device=dev)[frame_window]
            order = top_stable(sal.masked_fill(static[frame_window], float("-inf")), P)
            top = torch.arange(P, device=dev)[None] < n_keep[:, None]
            tier = torch.zeros(T, P, device=dev).scatter_(1, order, top.float() * 4.0)
            static_first = torch.sort((~static).to(torch.int8), dim=1, stable=True).indices  # in order
            for w, (s, e) in enumerate(windows):
                c = round(n_static[w] * r)
                if c <= 0:
                    continue
                pos = static_first[w, : n_static[w]]
                means = x[s : e + 1, pos].mean(0)
                cscore, dist = dpc_knn(means, min(k, c))
                centres = top_stable(cscore, c)
                assign = cluster_members(dist, centres)
                cpos = pos[centres]
                # Centres rank above the dynamic tokens: a budget below HoliTom's own count (its
                # per-frame ceil makes it a few more than int(n · keep)) trims single dynamic tokens,
                # not whole clusters.
                tier[s, cpos] = CENTRE + squash(cscore[centres]) - sal[s, cpos]
                # Cluster j's members: its positions' tokens in every frame of the window.
                slots.append(idx[s, cpos])
                members.append(idx[s : e + 1][:, pos].flatten())
                owner.append((assign + n_slots).repeat(e - s + 1))
                core.append(torch.zeros(len(pos), dtype=torch.bool, device=dev).scatter_(0, centres, True).repeat(e - s + 1))
                n_slots += c
            score[idx] = tier + sal
        plans.append((score, pack_merges(slots, members, owner, dev), torch.cat(core) if core else torch.zeros(0, dtype=torch.bool, device=dev)))
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
        return torch.stack([plan[0] for plan in shared_plan(holitom_plan, view, self.tau, self.max_window)])


@tokencomp.hookimpl
def register_scorers(register):
    register(HoliTomScorer)
