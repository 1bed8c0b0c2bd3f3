"""MustDrop (arXiv 2411.10803, "Multi-Stage Vision Token Dropping"): a spatial merge of uniform 3×3
windows before the LLM (scorer ``mustdrop_window`` with the merger ``window``) and a dual-attention
filter inside the LLM prefill (scorer ``mustdrop``). Its decode-time KV-cache policy is not here.

Official code: liuting20/MustDrop @ 909afa5.

**Vision stage** (``llava/model/multimodal_encoder/local_merge.py`` ``conditional_pooling`` L30-L117,
called after CLIP layer 0 with ``τ = 0.8``, window 3×3, ``clip_encoder.py`` L111): the 24×24 patch
grid is cut into non-overlapping 3×3 windows; a window's similarity is its mean pairwise cosine,
self-pairs excluded, ``sim_w = Σ_{i≠j} cos(x_i, x_j) / (9·8)`` (L63-L70); the ``r`` windows with
``sim_w ≥ τ`` (most similar first) each become one token, the mean of their 9 tokens, held by the
window's last (bottom-right) token (L114-L117, ``merge`` L120-). Here ``mustdrop_window`` scores so
that top-k drops the 8 non-destination tokens of the most similar windows first: a window's
destination scores ``2 - sim_w``, its other tokens ``-sim_w``; ``floor(n·keep) = n - 8r`` merges
exactly ``r`` windows (LightCompress's fixed-count form, ``fix_r = (577 - retained) // 8``, instead
of the official adaptive ``τ``). The ``window`` merger (``tokencomp/mergers/mustdrop.py``) replaces
each kept token by the mean of itself and the dropped tokens of its window.

**LLM prefill** (``llava/model/language_model/modelling_sparse_llama.py``: pruning after layers
``[2, 6, 10, 14]`` L103, ``dual_attention_filter`` L336-L354): with ``A`` the head-mean attention of
the pruning layer from the text tokens after the image (rows) to the image tokens (columns),
``g_j = Σ_i A[i, j]``, ``m_j = max_i A[i, j]``; token ``j`` is dropped iff ``g_j < global_thr · Σ_j g_j``
and ``m_j < individual_thr`` (L348); the key set (top ``⌈0.08·(N'−1)⌉`` tokens by the [CLS]
attention of CLIP layer 23, ``clip_encoder.py`` L102-L107) is never dropped (L256). Here the
``mustdrop`` scorer gives ``max(g_j / (global_thr·Σg), m_j / individual_thr)``: a token passes the
official filter iff its score is ``≥ 1``, so top-k keeps the official set whenever the budget equals
its size, and otherwise the tokens closest to passing; key tokens score ``+inf``. Use it at layer
``l + 1`` with ``attention = "previous"`` for a pruning after layer ``l`` (stage layers 3/7/11/15).

Differences from the official code:

* fixed budgets (the engine's ``floor(n · keep)`` per stage) instead of the adaptive thresholds;
  the shipped recipes choose counts whose layer average is the label (the official "192/128/64"
  are layer averages too, tuned per benchmark with the thresholds);
* the window merge runs on the projected LLM input embeddings (official: CLIP layer-0 outputs, which
  then go through 23 more CLIP layers); merged tokens keep their destination's position;
* the key set uses the ``cls_attention`` signal (the [CLS] attention of the layer the projector
  reads, −2, over the unmerged tokens) instead of layer 23's over the merged ones, and is recomputed
  at each stage as the top ``⌈key_ratio · n⌉`` of the ``n`` live tokens (the official set is fixed
  once at ``⌈0.08·(N'−1)⌉``); ``key_ratio: 0`` drops the key set and the signal requirement;
* attention rows come from the layer's own q/k for the text rows only (no full attention matrix,
  SDPA / FlashAttention keep running), every sample in a batch (the official uses item 0);
* grids are laid out as the model adapter says (``LayerView.grid_widths``: Qwen-VL's images and
  frames of any aspect ratio); where it cannot tell, a group of ``n = s²`` tokens is an ``s × s``
  grid and any other group one row of ``n`` tokens (1×3 windows).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer
from tokencomp.ranking import best_mask


def window_destinations(view: LayerView, window: int) -> torch.Tensor:
    """``(B, S)`` long: for each vision token, the sequence index of its window's destination (the
    window's last token in raster order), ``-1`` elsewhere. Windows are ``window × window`` blocks of
    each image's (group's) grid of tokens, partial at the right / bottom edges; the grid's width is
    the adapter's (``view.grid_widths``), else the group is taken as square (or as one row)."""
    vis = view.vision_mask
    B, S = vis.shape
    dev = vis.device
    groups = torch.where(vis, view.groups.clamp(min=0), torch.zeros_like(view.groups))
    G = int(groups.max()) + 1 if vis.any() else 1
    vrank = torch.cumsum(vis.long(), 1) - 1
    big = torch.full((B, G), S, dtype=torch.long, device=dev)
    first = big.scatter_reduce(1, groups, torch.where(vis, vrank, torch.full_like(vrank, S)), reduce="amin")
    count = torch.zeros(B, G, dtype=torch.long, device=dev).scatter_add(1, groups, vis.long())
    n_g = count.gather(1, groups).clamp(min=1)
    j = (vrank - first.gather(1, groups)).clamp(min=0)
    side = torch.sqrt(n_g.double()).round().long()
    width = torch.where(side * side == n_g, side, n_g)
    if view.grid_widths is not None:  # the adapter knows each picture's grid (Qwen: any aspect ratio)
        width = torch.where(vis & (view.grid_widths > 0), view.grid_widths, width)
    elif bool((vis & (side * side != n_g)).any()):
        # Said, not silent: the windows of such a group are 1 x window strips of its tokens in order.
        warnings.warn(
            "tokencomp: MustDrop windows: a picture's vision tokens do not form a square grid and the model "
            "adapter does not give its width (e.g. LLaVA-NeXT's high-resolution view); its windows are taken "
            f"as runs of {window} tokens in order",
            stacklevel=2,
        )
    height = (n_g + width - 1) // width
    row, col = j // width, j % width
    d_row = torch.minimum((row // window) * window + window - 1, height - 1)
    d_col = torch.minimum((col // window) * window + window - 1, width - 1)
    d_vrank = first.gather(1, groups) + d_row * width + d_col
    cols = torch.sort((~vis).to(torch.int8), dim=1, stable=True).indices  # vision columns first, in order
    dest = cols.gather(1, d_vrank.clamp(0, S - 1))
    return torch.where(vis, dest, torch.full_like(dest, -1))


def window_similarity(view: LayerView, dest: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` float32: the mean pairwise cosine (self-pairs excluded) of each vision token's
    window, ``-1`` for one-token windows and non-vision tokens."""
    vis = view.vision_mask
    h = view.hidden.float()
    unit = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp(min=1e-12)
    unit = unit * vis[..., None]
    idx = dest.clamp(min=0)
    sums = torch.zeros_like(unit).scatter_add(1, idx[..., None].expand_as(unit), unit)
    sq = torch.zeros(vis.shape, device=h.device).scatter_add(1, idx, (unit * unit).sum(-1))
    m = torch.zeros(vis.shape, device=h.device).scatter_add(1, idx, vis.float())
    sim = ((sums * sums).sum(-1) - sq) / (m * (m - 1)).clamp(min=1)
    sim = torch.where(m > 1, sim, torch.full_like(sim, -1.0))
    return torch.where(vis, sim.gather(1, idx), torch.full_like(sim, -1.0))


@dataclass(frozen=True)
class MustDropWindowScorer(Scorer):
    """MustDrop's spatial merge: drop the non-destination tokens of the most uniform windows first."""

    name = "mustdrop_window"

    window: int = field(default=3, metadata={"min": 1})
    """Window side (official: 3); use the same in the ``window`` merger."""

    def __post_init__(self):
        if self.window < 1:
            raise ValueError("window must be at least 1")

    def score(self, view: LayerView):
        dest = window_destinations(view, self.window)
        sim = window_similarity(view, dest)
        is_dest = dest == torch.arange(dest.shape[1], device=dest.device)[None]
        return torch.where(is_dest, 2.0 - sim, -sim)


@dataclass(frozen=True)
class MustDropScorer(Scorer):
    """MustDrop's dual-attention filter: global and individual text→vision attention at the previous layer."""

    name = "mustdrop"
    attention = "previous"
    signals = ("cls_attention",)

    global_thr: float = field(default=0.001, metadata={"min": 0.0})
    """A token passes if its summed attention is at least this share of all vision tokens' (official 0.001 / 0.0012 / 0.011)."""
    individual_thr: float = field(default=0.001, metadata={"min": 0.0})
    """... or if one text token gives it at least this attention (official 0.001 / 0.001 / 0.01)."""
    key_ratio: float = field(default=0.08, metadata={"min": 0.0, "max": 1.0})
    """Share of the live tokens with the highest [CLS] attention that is never dropped (0: none, no signal needed)."""
    max_queries: int = field(default=0, metadata={"min": 0})
    """At most this many text rows (the last ones after the image); 0: all of them, as the official code."""

    def __post_init__(self):
        if self.global_thr <= 0 or self.individual_thr <= 0:
            raise ValueError("global_thr and individual_thr must be positive")
        if not 0.0 <= self.key_ratio <= 1.0:
            raise ValueError("key_ratio must be in [0, 1]")
        if self.max_queries < 0:
            raise ValueError("max_queries must be 0 (no limit) or more")
        if self.key_ratio == 0:
            object.__setattr__(self, "signals", ())  # no key set: no vision-tower signal needed

    def queries(self, view: LayerView) -> torch.Tensor:
        vis, txt = view.vision_mask, view.text_mask
        B, S = vis.shape
        ar = torch.arange(S, device=vis.device)[None]
        last_vis = torch.where(vis, ar, torch.full_like(ar, -1)).amax(1)
        q = txt & (ar > last_vis[:, None])
        q[torch.arange(B, device=vis.device), view.last_index] = True
        from_end = q.sum(1, keepdim=True) - torch.cumsum(q.long(), 1)
        if self.max_queries:
            q &= from_end < self.max_queries
        Q = int(q.sum(1).max())
        cols = torch.sort((~q).to(torch.int8), dim=1, stable=True).indices[:, :Q]
        return torch.where(q.gather(1, cols), cols, torch.full_like(cols, -1))

    def score(self, view: LayerView):
        att = view.attention  # (B, Q, S), rows of padding queries are 0
        vis = view.vision_mask
        g = att.sum(1)
        m = att.amax(1)
        total = (g * vis).sum(1, keepdim=True)
        score = torch.maximum(g / (self.global_thr * total).clamp(min=1e-30), m / self.individual_thr)
        if self.key_ratio > 0:
            n = vis.sum(1)
            k = torch.tensor([math.ceil(self.key_ratio * int(x)) for x in n.tolist()], device=vis.device)
            key = best_mask(view.signals["cls_attention"], vis, k)
            score = torch.where(key, torch.full_like(score, float("inf")), score)
        return score


@tokencomp.hookimpl
def register_scorers(register):
    register(MustDropWindowScorer)
    register(MustDropScorer)
