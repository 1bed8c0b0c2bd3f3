"""DART (EMNLP 2025, arXiv 2502.11494, "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More"): keep the vision tokens that duplicate a few *pivot* tokens least.

Official algorithm (ZichenWen1/DART, ``get_retained_image_token`` in the LLaVA model code, read from
its mirror xqy1111111/DART ``llava/model/language_model/modeling_llama_self.py`` L397-L448; defaults
in ``llava/eval/model_vqa_loader.py`` L170-L178), run before decoder layer ``K = 2``:

1. pivots: the ``pivot_image_token = 4`` image tokens and the ``pivot_text_token = 4`` tokens after
   the image with the largest L1 norm of their layer ``K-1`` key vectors (all heads concatenated);
2. ``TOPK = max_num_trunction // 8`` (8 = number of pivots);
3. for each pivot ``p`` in turn (iterating the Python ``set`` of pivot indices), take the ``TOPK``
   remaining candidates (image tokens minus image pivots) with the lowest cosine similarity to
   ``p``'s hidden state, keep them and remove them from the candidates; the hidden states are layer
   ``K-1``'s output after the model's final RMSNorm;
4. keep the image pivots and all picks (``4 + 8 * TOPK`` image tokens: 132 for ``max_num_trunction``
   128).

Here (a scorer under the default ``topk`` selector):

* pivots are ranked by the L1 (or L2) norm of layer ``K-1``'s keys as it caches them (all KV heads
  concatenated, after RoPE: ``view.prev_keys``; the Qwen2-VL copy uses post-RoPE keys, the LLaVA
  code's are not confirmed), and cosines are taken on layer ``K-1``'s output through the decoder's
  final norm (``view.final_normed``), as the official code; in an input stage, where no layer ran
  before, both fall back to the residual stream;
* ``assign: per_pivot`` (default) reproduces step 3: the budget ``floor(n * keep)`` (the count the
  engine will keep) minus the image pivots is split into ``(budget - image pivots) // pivots`` picks
  per pivot, taken pivot by pivot in the order CPython iterates the official ``set`` of pivot
  indices (indices counted among the sample's real tokens, as in the unpadded official run);
  tokens the quota leaves over (the division's remainder) go to the least duplicated remaining
  candidates, by ``-max_p cos(h, h_p)``;
  (the budget is computed from ``view.keep``; under a schedule that solves keep ratios per sample,
  e.g. ``budget``, the engine's count may differ and the quota picks then just come first);
* ``assign: max`` scores every candidate by ``-max_p cos(h, h_p)`` alone (least duplicated of any
  pivot first), which does not depend on the budget;
* image pivots score ``+inf``: they are always kept.

Everything is per sample and independent of padding and of the other samples; the only loop is
over the (at most ``pivot_image_tokens + pivot_text_tokens``) pivots. Several images in one prompt
are one set of candidates: image pivots are ranked over all of them and text pivots come from the
text after the last one (the official code handles one image block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

import tokencomp
from tokencomp.accounting import kept_count
from tokencomp.interfaces import LayerView, Scorer

_PICKED = 4.0
"""Offset of per-pivot picks: ``4 - cos`` lies in [3, 5], above any ``-max cos`` in [-1, 1]."""


def python_set_order(values: list[int]) -> list[int]:
    """Positions (into ``values``) in the order CPython iterates ``set(values)``: the order in which
    the official code visits its pivots (first occurrence of each value)."""
    first = {}
    for i, v in enumerate(values):
        first.setdefault(v, i)
    return [first[v] for v in set(values)]


def _top_indices(metric: torch.Tensor, mask: torch.Tensor, k: int):
    """``(B, k)`` indices of the ``k`` largest ``metric`` entries among ``mask`` (descending, ties to
    the earlier token) and ``(B, k)`` validity (a row may have fewer than ``k`` entries)."""
    masked = torch.where(mask, metric, torch.full_like(metric, float("-inf")))
    # Stable sort on (not in mask, -metric): in-mask entries first, larger metric first.
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort((~mask.gather(1, order)).to(torch.int8), dim=1, stable=True).indices)
    idx = order[:, :k]
    valid = torch.arange(k, device=mask.device)[None, :] < mask.sum(1, keepdim=True)
    return idx, valid


@dataclass(frozen=True)
class DARTScorer(Scorer):
    """Duplication-aware: keeps the vision tokens least similar to a few pivot tokens (DART)."""

    name = "dart"
    needs_prev_keys = True
    needs_final_norm = True

    pivot_image_tokens: int = field(default=4, metadata={"min": 0})
    """Vision tokens with the largest norm used as pivots, always kept (official ``pivot_image_token``)."""
    pivot_text_tokens: int = field(default=4, metadata={"min": 0})
    """Tokens after the last vision token with the largest norm used as pivots (``pivot_text_token``)."""
    norm: Literal["l1", "l2"] = "l1"
    """Norm of layer K-1's keys that ranks pivot candidates (official: L1)."""
    assign: Literal["per_pivot", "max"] = "per_pivot"
    """``per_pivot``: the official per-pivot quotas; ``max``: rank by ``-max cos`` to the pivots."""

    def score(self, view: LayerView) -> torch.Tensor:
        vis, hidden = view.vision_mask, view.hidden
        B, S = vis.shape
        dev = hidden.device
        if self.pivot_image_tokens + self.pivot_text_tokens == 0:
            return torch.zeros(B, S, device=dev)
        # Official features: pivots by the norm of layer K-1's keys, cosines on the final-normed
        # states (a view without them, e.g. an input stage, falls back to the residual stream).
        keys = view.prev_keys if view.prev_keys is not None else hidden
        h = (view.final_normed if view.final_normed is not None else hidden).float()
        metric = torch.linalg.vector_norm(keys.float(), ord=1 if self.norm == "l1" else 2, dim=-1)
        # Text pivots: real text tokens after the sample's last vision token (the question and the
        # assistant prompt in LLaVA-1.5's template; official ``K_states[0][start + length:]``).
        tok = view.token_index
        last_vis = torch.where(vis, tok, torch.full_like(tok, -1)).amax(1, keepdim=True)
        after = view.text_mask & (tok > last_vis) & (last_vis >= 0)
        img_idx, img_ok = _top_indices(metric, vis, self.pivot_image_tokens)
        txt_idx, txt_ok = _top_indices(metric, after, self.pivot_text_tokens)
        piv_idx = torch.cat([img_idx, txt_idx], 1)  # (B, P), each part in descending norm order
        piv_ok = torch.cat([img_ok, txt_ok], 1)
        is_img_pivot = torch.zeros_like(vis).scatter(1, img_idx, img_ok) & vis

        unit = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp(min=1e-12)
        # (B, P, S) cosines; an elementwise product and a sum over D (no batched matmul), so every
        # sample gets the same numbers whatever batch it is in.
        piv = unit.gather(1, piv_idx[..., None].expand(-1, -1, unit.shape[-1]))
        cos = torch.stack([(unit * piv[:, j, None, :]).sum(-1) for j in range(piv.shape[1])], 1)
        cos = torch.where(piv_ok[..., None], cos, torch.full_like(cos, float("-inf")))
        worst = cos.amax(1)  # the similarity to the closest pivot
        any_pivot = piv_ok.any(1, keepdim=True)
        scores = torch.where(any_pivot, -worst, torch.zeros_like(worst))

        if self.assign == "per_pivot":
            scores = self._per_pivot(view, scores, cos, piv_idx, piv_ok, is_img_pivot)
        return torch.where(is_img_pivot, torch.full_like(scores, float("inf")), scores)

    def _per_pivot(self, view, scores, cos, piv_idx, piv_ok, is_img_pivot):
        vis = view.vision_mask
        B, S = vis.shape
        n = vis.sum(1)
        budget = kept_count(n, float(view.keep))
        n_piv = piv_ok.sum(1)
        quota = torch.div((budget - is_img_pivot.sum(1)).clamp(min=0), n_piv.clamp(min=1), rounding_mode="floor")
        # Visit the pivots in the order the official code iterates its Python set of indices.
        tok_at = view.token_index.gather(1, piv_idx)
        order = []
        for b, (vals, ok) in enumerate(zip(tok_at.tolist(), piv_ok.tolist())):
            kept = [j for j, o in enumerate(ok) if o]
            order.append([kept[i] for i in python_set_order([vals[j] for j in kept])] + [j for j, o in enumerate(ok) if not o])
        order = torch.tensor(order, dtype=torch.long, device=vis.device).reshape(B, -1)
        remaining = vis & ~is_img_pivot
        picked = torch.zeros_like(vis)
        pick_score = torch.zeros_like(scores)
        ar = torch.arange(S, device=vis.device).expand(B, S)
        for step in range(order.shape[1]):
            j = order[:, step]
            c = cos.gather(1, j[:, None, None].expand(-1, 1, S))[:, 0]  # (B, S)
            ok = piv_ok.gather(1, j[:, None])[:, 0]
            # The ``quota`` least similar remaining candidates (ties to the earlier token).
            key = torch.where(remaining, c, torch.full_like(c, float("inf")))
            by = torch.sort(key, dim=1, stable=True).indices
            by = by.gather(1, torch.sort((~remaining.gather(1, by)).to(torch.int8), dim=1, stable=True).indices)
            rank = torch.empty_like(by).scatter_(1, by, ar)
            take = remaining & (rank < quota[:, None]) & ok[:, None]
            picked |= take
            remaining &= ~take
            pick_score = torch.where(take, _PICKED - c, pick_score)
        return torch.where(picked, pick_score, scores)


@tokencomp.hookimpl
def register_scorers(register):
    register(DARTScorer)
