"""HoliTom's mergers (cokeshao/HoliTom @ e9b2972).

``holitom`` (outside the LLM, with the ``holitom`` scorer and the same parameters): each kept static
cluster centre becomes ``β · c + (1 − β) · m``, ``c`` its own position's mean over the window's frames
and ``m`` the mean of the other member positions' window means, or ``c`` alone in a one-position
cluster (``holitom/llava_arch.py`` L100-L150 as shipped: ``NO_BETA`` unset, ``BETA = 0.6``);
``blend: false`` gives the ``NO_BETA=1`` variant, the mean of all the cluster's window means.

``holitom_inner`` (inside the LLM, ``holitom/modeling_qwen2.py`` L146-L183): each dropped vision
token, in sequence order, is folded into its most cosine-similar kept token by a running pairwise
average ``t ← (t + x) / 2``; so a kept token with dropped tokens ``x_1 … x_m`` (in order) becomes
``t / 2^m + Σ_i x_i / 2^(m − i + 1)``. Official selection there: the top ``round(n · (1 − r))`` by
the last token's head-averaged attention (a ``fastv`` stage; here ``int(n · keep)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger
from tokencomp.mergers.recycle import member_sums, shared_plan
from tokencomp.scorers.holitom import holitom_plan


@dataclass(frozen=True)
class HoliTomMerger(Merger):
    """HoliTom static tokens: each kept centre becomes the β blend of its static cluster over the window."""

    name = "holitom"

    tau: float = field(default=0.8, metadata={"min": -1.0, "max": 1.0})
    """The ``holitom`` scorer's ``tau``."""
    max_window: int = field(default=1024, metadata={"min": 2})
    """The ``holitom`` scorer's ``max_window``."""

    blend: bool = True
    """The official default (``NO_BETA`` unset): ``beta · centre + (1 − beta) · mean(other members)``;
    false: the plain mean of the cluster, centre included (``NO_BETA=1``)."""
    beta: float = field(default=0.6, metadata={"min": 0.0, "max": 1.0})
    """Weight of the centre's own window mean in the blend (official ``BETA``)."""

    def merge(self, view: LayerView, kept, dropped, summary):
        out = view.hidden.clone()
        for b, (_, (slots, members, owner), core) in enumerate(shared_plan(holitom_plan, view, self.tau, self.max_window)):
            if slots.numel() == 0:
                continue
            hb = view.hidden[b].float()
            # Every member counts (the official means take the whole cluster), also a member a larger
            # budget keeps on its own; equal frame counts per position make token means window means.
            c_sum, c_n = member_sums(hb, members, owner, core.float(), slots.numel())
            r_sum, r_n = member_sums(hb, members, owner, (~core).float(), slots.numel())
            if self.blend:
                centre = c_sum / c_n.clamp(min=1)[:, None]
                rest = r_sum / r_n.clamp(min=1)[:, None]
                merged = torch.where(r_n[:, None] > 0, self.beta * centre + (1 - self.beta) * rest, centre)
            else:
                merged = (c_sum + r_sum) / (c_n + r_n).clamp(min=1)[:, None]
            out[b, slots] = torch.where(kept[b, slots, None], merged.to(out.dtype), out[b, slots])
        return out, torch.zeros_like(kept)


@dataclass(frozen=True)
class HoliTomInnerMerger(Merger):
    """HoliTom inside the LLM: running pairwise average of each dropped token into its most similar kept one."""

    name = "holitom_inner"

    def merge(self, view: LayerView, kept, dropped, summary):
        h = view.hidden
        S = h.shape[1]
        ar = torch.arange(S, device=h.device)
        unit = torch.nn.functional.normalize(h.float(), dim=-1)
        sim = (unit @ unit.transpose(1, 2)).masked_fill(~kept[:, None, :], float("-inf"))
        target = torch.where(dropped, sim.argmax(-1), torch.full_like(ar, -1).expand_as(dropped))  # (B, S)
        same = (target[:, :, None] == target[:, None, :]) & dropped[:, None, :] & (ar[None, :] > ar[:, None])[None]
        later = same.sum(-1)  # dropped tokens after this one with the same target
        w = torch.where(dropped, torch.pow(0.5, (later + 1).float()), torch.zeros_like(later, dtype=torch.float32))
        m = torch.zeros(h.shape[:2], device=h.device).scatter_add(1, target.clamp(min=0), dropped.float())
        into = torch.where(dropped, target, ar.expand_as(target))
        w = torch.where(kept, torch.pow(0.5, m), w)
        weights = ((kept | dropped)[:, :, None] & (into[:, :, None] == ar)).float() * w[:, :, None]
        merged = (weights.transpose(1, 2) @ h.float()).to(h.dtype)
        return torch.where(kept[:, :, None], merged, h), torch.zeros_like(kept)


@tokencomp.hookimpl
def register_mergers(register):
    register(HoliTomMerger)
    register(HoliTomInnerMerger)
