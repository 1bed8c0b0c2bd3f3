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
embedding and salience the dot product with its unit mean (so ``tau``, tuned on SigLIP's pooled
features, may cut segments differently on these); features are the LLM input embeddings;
no density noise; the newline and tokens outside a video are always kept (FastVID re-adds newlines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer
from tokencomp.mergers.recycle import dpc_knn, pack_merges, shared_plan, top_stable
from tokencomp.scorers.dycoke import KEEP, frame_states, video_index
from tokencomp.scorers.holitom import salience, squash


def segments(x: torch.Tensor, c: int, tau: float) -> list[int]:
    """DySeg segment sizes of the frames ``x`` (T, P, D) (one host sync)."""
    T = x.shape[0]
    g = torch.nn.functional.normalize(x.mean(1), dim=-1)
    s = (g[:-1] * g[1:]).sum(-1)
    cut = s < tau
    cut[torch.sort(s, stable=True).indices[: max(c - 1, 0)]] = True
    bounds = [-1] + [t for t, v in enumerate(cut.tolist()) if v] + [T - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def fastvid_plan(view: LayerView, c: int, tau: float, d: float, p: int, k: int = 4):
    """Per sample: ``(scores (S,), merges)`` (see :func:`tokencomp.mergers.recycle.apply_merges`).

    Batched over the frames of a video: the salient tokens of every frame, the density scores of
    every anchor frame at once; the merge assignment loops over the segments (a few kernels each)."""
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
            sal = squash(salience(x))
            retain = int(P * view.keep)
            n_sal = retain - int(retain * d)
            n_ctx = retain - n_sal
            n_rest = P - n_sal
            top = top_stable(sal, n_sal)  # (T, n_sal) salient tokens of every frame
            tier = torch.zeros(T, P, device=dev).scatter_(1, top, 4.0)
            salient = torch.zeros(T, P, dtype=torch.bool, device=dev).scatter_(1, top, True)
            # The other tokens of each frame, in order (stable sort: False first).
            rest = torch.sort(salient.to(torch.int8), dim=1, stable=True).indices[:, :n_rest]  # (T, n_rest)
            if n_ctx > 0 and n_rest > 0:
                # Anchor frames of every segment (every p-th from its end), their context counts and
                # the index of their first context token among the merge targets.
                anchors, per, seg_of, base = [], [], [], []
                start = 0
                for L in segments(x, c, tau):
                    a = [start + j for j in range(L) if (L - 1 - j) % p == 0]
                    cnt = min(n_ctx * L // len(a), n_rest)
                    seg_of.append((start, L, len(anchors), len(a), cnt))
                    base += [n_slots + i * cnt for i in range(len(a))]
                    n_slots += len(a) * cnt
                    anchors += a
                    per += [cnt] * len(a)
                    start += L
                anc = torch.tensor(anchors, device=dev)
                x_rest = x.gather(1, rest[:, :, None].expand(T, n_rest, x.shape[-1]))  # (T, n_rest, D)
                dscore, _ = dpc_knn(x_rest[anc], k)  # (A, n_rest)
                ranked = top_stable(dscore, n_rest)  # (A, n_rest) by density
                ctx = rest[anc].gather(1, ranked)  # positions in the anchor frames
                width = torch.tensor(per, device=dev)
                ctx_mask = torch.zeros(len(anchors), P, dtype=torch.bool, device=dev)
                ctx_mask.scatter_(1, ctx, torch.arange(n_rest, device=dev)[None] < width[:, None])
                tier[anc] = torch.where(ctx_mask, 4.0, tier[anc])
                # DTM: each segment's non-salient tokens go to the most similar context token of
                # each of its anchors.
                unit = torch.nn.functional.normalize(x_rest, dim=-1)
                ctx_unit = unit[anc[:, None], ranked]  # (A, n_rest, D)
                ctx_tok = idx[anc[:, None], ctx]
                first_slot = torch.tensor(base, device=dev)[:, None]
                tok = idx.gather(1, rest)
                for start, L, first, n_anc, cnt in seg_of:
                    if cnt == 0:
                        continue
                    seg_unit = unit[start : start + L].reshape(L * n_rest, -1)
                    cu = ctx_unit[first : first + n_anc, :cnt]
                    # One (N, D) @ (D, cnt) product per anchor, as the official per-anchor loop.
                    assign = torch.matmul(seg_unit, cu.transpose(1, 2)).argmax(-1)  # (n_anc, N)
                    slots.append(ctx_tok[first : first + n_anc, :cnt].flatten())
                    members.append(tok[start : start + L].flatten().repeat(n_anc))
                    owner.append((assign + first_slot[first : first + n_anc]).flatten())
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
        return torch.stack([s for s, _ in shared_plan(fastvid_plan, view, self.c, self.tau, self.d, self.p)])


@tokencomp.hookimpl
def register_scorers(register):
    register(FastVIDScorer)
