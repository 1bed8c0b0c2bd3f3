"""FastVID (NeurIPS 2025) as an input stage: dynamic segmentation (DySeg), per-frame salient tokens
plus density-peak context tokens in anchor frames (STPrune), and merging of the rest into the
context tokens (DTM, the ``fastvid`` merger with the same parameters).

Official code (LunarShen/FastVID @ a40a109,
``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`` L900-L1075), per
video of T frames × N tokens, retention ``r``:

* DySeg (L912-L922): ``s_t = cos(g_t, g_{t+1})`` of the frames' global features; cuts after the
  ``c − 1`` lowest ``s_t`` and after every ``s_t < τ``;
* STPrune (L930-L960): ``retain = int(N·r)``, ``salient = retain − int(retain·d)`` top tokens of every
  frame by salience; ``context = retain − salient`` per frame, pooled per segment of L frames onto
  its anchor frames (every ``p``-th frame counted from the segment's end, ``ceil(L/p)`` of them), each
  ``context·L // ceil(L/p)``;
* context tokens (L966-L985, L1019-L1035): the top by DPC-kNN score (``k = 4``) among the frame's
  non-salient tokens;
* DTM (L987-L1060): every non-salient token of the segment (all its frames, the context tokens
  themselves included) goes to its most cosine-similar context token *of each anchor frame*; a
  context token becomes ``w·x + (1 − w)·mean(assigned)``, ``w = max(β, 1 / (assigned + 1))``.

Here ``r`` is the stage's keep ratio (recipe ``keep``); the kept set is scored in tiers (4 + salience
for salient and context tokens, salience below), so ``topk`` keeps FastVID's tokens when the budget
equals their count and fills by salience otherwise (``int(n·keep)`` is usually a few more).
Deviations: SigLIP's attention-pooling head is not available: the global feature is the frame's mean
embedding and salience the dot product with its unit mean; features are the LLM input embeddings;
no density noise; the newline and tokens outside a video are always kept (FastVID re-adds newlines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer
from tokencomp.mergers.recycle import dpc_knn, pack_merges, top_stable
from tokencomp.scorers.dycoke import KEEP, video_frames
from tokencomp.scorers.holitom import salience, squash


def segments(x: torch.Tensor, c: int, tau: float) -> list[int]:
    """DySeg segment sizes of the frames ``x`` (T, P, D)."""
    T = x.shape[0]
    g = torch.nn.functional.normalize(x.mean(1), dim=-1)
    s = (g[:-1] * g[1:]).sum(-1)
    cuts = set(torch.sort(s, stable=True).indices[: max(c - 1, 0)].tolist()) | set((s < tau).nonzero().flatten().tolist())
    bounds = [-1] + sorted(cuts) + [T - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def fastvid_plan(view: LayerView, c: int, tau: float, d: float, p: int, k: int = 4):
    """Per sample: ``(scores (S,), merges)`` (see :func:`tokencomp.mergers.recycle.apply_merges`)."""
    h = view.hidden
    dev = h.device
    plans = []
    for b in range(h.shape[0]):
        score = torch.full(view.vision_mask.shape[1:], KEEP, device=dev)
        slots, members, owner = [], [], []
        for frames in video_frames(view, b):
            idx = torch.stack(frames)
            T, P = idx.shape
            x = h[b, idx].float()
            sal = squash(salience(x))
            retain = int(P * view.keep)
            n_sal = retain - int(retain * d)
            n_ctx = retain - n_sal
            tier = torch.zeros(T, P, device=dev)
            rest = []
            for t in range(T):
                top = top_stable(sal[t], n_sal)
                tier[t, top] = 4.0
                mask = torch.ones(P, dtype=torch.bool, device=dev)
                mask[top] = False
                rest.append(mask.nonzero().flatten())
            start = 0
            for L in segments(x, c, tau):
                anchors = [start + j for j in range(L) if (L - 1 - j) % p == 0]
                per = n_ctx * L // len(anchors)
                seg_tok = torch.cat([idx[t, rest[t]] for t in range(start, start + L)])
                seg_x = torch.cat([x[t, rest[t]] for t in range(start, start + L)])
                unit = torch.nn.functional.normalize(seg_x, dim=-1)
                for a in anchors:
                    dscore, _ = dpc_knn(x[a, rest[a]], k)
                    ctx = rest[a][top_stable(dscore, per)]
                    if ctx.numel() == 0:
                        continue
                    tier[a, ctx] = 4.0
                    cu = torch.nn.functional.normalize(x[a, ctx], dim=-1)
                    assign = (unit @ cu.T).argmax(-1)
                    base = len(slots)
                    slots.extend(idx[a, ctx].unbind(0))
                    members.append(seg_tok)
                    owner.append(assign + base)
                start += L
            score[idx] = tier + sal
        plans.append((score, pack_merges(slots, members, owner, dev)))
    return plans


@dataclass(frozen=True)
class FastVIDScorer(Scorer):
    """FastVID: per-frame salient tokens plus density-peak context tokens of each segment's anchor frames."""

    name = "fastvid"

    c: int = field(default=8, metadata={"min": 1})
    """DySeg: at least this many segments (``c − 1`` cuts at the lowest similarities)."""
    tau: float = field(default=0.9, metadata={"min": -1.0, "max": 1.0})
    """DySeg: also cut where consecutive frames' similarity is below ``tau``."""
    d: float = field(default=0.4, metadata={"min": 0.0, "max": 1.0})
    """STPrune: context share of each frame's retained tokens."""
    p: int = field(default=4, metadata={"min": 1})
    """Anchor frame every ``p`` frames (from the segment's end)."""

    def score(self, view: LayerView):
        return torch.stack([s for s, _ in fastvid_plan(view, self.c, self.tau, self.d, self.p)])


@tokencomp.hookimpl
def register_scorers(register):
    register(FastVIDScorer)
