"""VisPruner (ICCV 2025, arXiv 2412.01818v2, "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs"): keep the *important* tokens by the vision encoder's [CLS]
attention, then a *diverse* set of the rest by iterative duplicate removal.

Official algorithm (Theia-4869/VisPruner @ aefa01a, ``llava/model/llava_arch.py`` ``encode_images``
L141-L185), for ``T`` kept tokens and ``important_ratio`` ``r``:

* ``T_imp = int(T * r)``, ``T_div = T - T_imp`` (L150-L151);
* ``order = argsort(cls_attention, descending)``; ``important = order[:T_imp]``, the residual list
  ``R = order[T_imp:]`` stays in descending-attention order (L154-L157);
* ``F̂ = F / ‖F‖`` (L160); while ``T_div > 0`` (L161-L176): ``r_step = min(8, |R| - T_div)``, stop when
  ``r_step <= 0``; split ``R`` by list position, ``a = R[0::2]``, ``b = R[1::2]``; ``s(a_i) =
  max_j cos(a_i, b_j)``; drop the ``r_step`` tokens of ``a`` with the highest ``s`` (the most
  duplicated); the new list is ``[surviving a in descending s, all of b]``;
* kept = ``important ∪ R``, in raster order (boolean index mask).

Here the selector receives the importance as its ``scores`` argument (recipe: ``scorer:
cls_attention``, the head-averaged [CLS]→patch attention of the layer the projector reads, as the
official ``feature_select``), and the budget ``T`` per sample from the engine. Differences:

* the duplicate matching runs on ``view.hidden``: the projected LLM input embeddings for an input
  stage, where the official code matches the *pre-projector* CLIP features of layer −2 (the
  projector's output is the only per-token state the engine sees);
* batched with per-sample budgets and per-sample round counts (the official code flattens a batch
  into one sequence: correct only for batch 1); similarities in float32;
* ties go to the earlier token (stable sorts) in both the attention order and the duplicate order
  (``torch.argsort`` order is unspecified among ties);
* an odd ``|R|`` works (``a`` takes the extra token; the official indexing assumes it is even), and a
  round drops at most all of ``a`` (``r_step`` can exceed ``|a|`` on a list shorter than 16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.accounting import kept_count
from tokencomp.interfaces import LayerView, Selector


def _desc_order(scores: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Column order putting members first by descending score (ties: earlier column), others after."""
    masked = torch.where(member, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    return order.gather(1, torch.sort((~member.gather(1, order)).to(torch.int8), dim=-1, stable=True).indices)


def remove_duplicates(unit: torch.Tensor, length: torch.Tensor, target: torch.Tensor, step: int = 8) -> torch.Tensor:
    """VisPruner's iterative duplicate removal on ordered lists, independently per row.

    ``unit`` (R, M, D) L2-normalised features of each row's list in order (entries past
    ``length[r]`` are padding), ``target`` (R,) how many to keep. Returns the (R, M) bool mask of the
    list entries that survive (``min(length, max(target, ...))``: exactly ``target`` when
    ``0 < target <= length``; the whole list when ``target <= 0``, as the official ``while T_div > 0``).
    """
    R, M = unit.shape[:2]
    dev = unit.device
    gram = torch.bmm(unit, unit.transpose(1, 2)) if M else unit.new_zeros(R, 0, 0)
    lst = torch.arange(M, device=dev).expand(R, M).clone()  # list entries: indices into the original order
    cur = length.clone().long()
    target = target.long()
    rows = torch.arange(R, device=dev)
    while True:
        # At most all of set a per round (|a| = ceil(n / 2) can be below 8 on a short list).
        r = torch.minimum(torch.clamp(cur - target, max=step), (cur + 1) // 2)
        active = (target > 0) & (r > 0)
        if not bool(active.any()):
            break
        a, b = lst[:, 0::2], lst[:, 1::2]
        a_ok = 2 * torch.arange(a.shape[1], device=dev)[None] < cur[:, None]
        b_ok = 2 * torch.arange(b.shape[1], device=dev)[None] + 1 < cur[:, None]
        sim = gram[rows[:, None, None], a[:, :, None], b[:, None, :]]  # (R, |a|, |b|)
        sim = sim.masked_fill(~b_ok[:, None, :], float("-inf"))
        s = sim.amax(-1) if b.shape[1] else torch.full(a.shape, float("-inf"), device=dev)
        # Descending duplicate score among the valid a entries (ties: earlier in the list).
        order = _desc_order(s, a_ok)
        a_sorted = a.gather(1, order)
        rank = torch.arange(a.shape[1], device=dev)[None]
        a_keep = a_ok.gather(1, order) & (rank >= r[:, None])
        cand = torch.cat([a_sorted, b], 1)
        flag = torch.cat([a_keep, b_ok], 1)
        pack = torch.sort((~flag).to(torch.int8), dim=1, stable=True).indices[:, :M]
        new = cand.gather(1, pack)
        lst = torch.where(active[:, None], new, lst)
        cur = torch.where(active, cur - r, cur)
    alive = torch.arange(M, device=dev)[None] < cur[:, None]
    out = torch.zeros(R, M, dtype=torch.bool, device=dev)
    return out.scatter(1, lst, alive)


@dataclass(frozen=True)
class VisPruner(Selector):
    """Important tokens by the scores ([CLS] attention), the rest by iterative duplicate removal (VisPruner)."""

    name = "vispruner"

    important_ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """Share of the budget taken by the highest-scoring tokens: ``T_imp = int(T * important_ratio)``."""
    step: int = field(default=8, metadata={"min": 1})
    """Tokens dropped per matching round (official: 8)."""

    def __post_init__(self):
        if not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError("important_ratio must be in [0, 1]")
        if self.step < 1:
            raise ValueError("step must be at least 1")

    def select(self, scores, view: LayerView, budget):
        vis = view.vision_mask
        B, S = vis.shape
        n = vis.sum(1)
        T = torch.minimum(budget.to(vis.device).long().clamp(min=0), n)
        t_imp = kept_count(T, self.important_ratio)
        t_div = T - t_imp
        order = _desc_order(scores, vis)  # vision tokens by descending importance, then the rest
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=vis.device).expand(B, S))
        important = vis & (rank < t_imp[:, None])
        # Residual list (descending importance), packed to the front: entries t_imp .. n-1 of ``order``.
        M = int((n - t_imp).max()) if B else 0
        pos = (t_imp[:, None] + torch.arange(M, device=vis.device)[None]).clamp(max=S - 1)
        res = order.gather(1, pos)  # (B, M) sequence indices
        length = n - t_imp
        feats = view.hidden.gather(1, res[..., None].expand(-1, -1, view.hidden.shape[-1])).float()
        unit = feats / torch.linalg.vector_norm(feats, dim=-1, keepdim=True).clamp(min=1e-12)
        alive = remove_duplicates(unit, length, t_div, self.step)
        alive &= (torch.arange(M, device=vis.device)[None] < length[:, None]) & (t_div > 0)[:, None]
        # Padding entries of ``res`` repeat a real index: accumulate, so they cannot overwrite it.
        diverse = torch.zeros(B, S, dtype=torch.long, device=vis.device).scatter_add(1, res, alive.long()) > 0
        return (important | diverse) & vis


@tokencomp.hookimpl
def register_selectors(register):
    register(VisPruner)
