"""DyCoke (CVPR 2025) stage 1, token temporal merging (TTM), as an input-stage scorer.

Official ``dycole_ttm`` (KD-TAO/DyCoke @ dd74634, ``llava/model/llava_arch.py`` L35-L91), on the
pooled frame tokens of one video (196 per frame on LLaVA-OneVision), ``keep = int((1 - k) · N_f)``
(k = 0.7: 58):

* pairs (i, i+1), i = 0, 2, 4, … (L41-L65): cosine of the tokens at the *same spatial index*; frame i
  stays whole, frame i+1 keeps its ``keep`` tokens with the *lowest* similarity;
* groups of four, i = 0, 4, … < num_frames − 4 (L69-L87): frame i+2 is redone against the whole
  frame i (replacing its pass-1 version, it was whole after pass 1).

So in each group of four, frame 0 is whole, frames 1 and 2 keep the tokens least like frame 0 and
frame 3 those least like frame 2. Nothing is averaged ("merging" is selection).

Quirks reproduced: the ``num_frames − 4`` bound skips the last group's (i, i+2) pass, so with 32
frames frame 30 stays whole (9 whole frames, 23 of 58: 3098 tokens; ``skip_last_group: false``
gives the bound ``i + 2 < num_frames``). Not reproduced: an odd last frame (officially dropped) stays
whole here; the newline token (appended after TTM officially) is a token with no counterpart and is
always kept, like every vision token outside a video (images); ties go to the earlier token.

Score tiers (so ``topk`` with the stage budget keeps DyCoke's set when the budget equals its count,
and degrades gracefully otherwise): 8 for whole-frame / unmatched / non-video tokens, ``4 + (1 − cos)``
for kept compared tokens, ``1 − cos`` for the others.

Frames come from ``view.groups``: a *video* is a run of at least two consecutive groups whose tokens
are contiguous and whose frames have the first frame's size (a last frame one larger: the OneVision
newline). The stage-2 decode-time KV pruning comes with the engine's ``phase: decode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer

KEEP, HIGH, LOW = 8.0, 4.0, 0.0


def video_frames(view: LayerView, b: int) -> list[list[torch.Tensor]]:
    """Videos of sample ``b``: lists (≥ 2) of frames, each the ``(P,)`` sequence indices of its tokens in
    order, all of the first frame's size ``P`` (a last frame's extra tokens, e.g. OneVision's newline,
    are left out). Groups that are not frames of a video (images) are not listed."""
    idx = view.vision_mask[b].nonzero().flatten()
    if idx.numel() == 0:
        return []
    g = view.groups[b, idx].tolist()
    ti = view.token_index[b, idx].tolist()
    runs, start = [], 0
    for j in range(1, len(g) + 1):
        if j == len(g) or g[j] != g[j - 1]:
            runs.append((start, j))
            start = j
    videos, cur = [], []
    for s, e in runs:
        size = e - s
        if cur:
            ps, pe = cur[-1]
            P = cur[0][1] - cur[0][0]
            if ti[s] == ti[pe - 1] + 1 and (pe - ps) == P and size in (P, P + 1):
                cur.append((s, e))
                continue
            videos.append(cur)
        cur = [(s, e)]
    if cur:
        videos.append(cur)
    out = []
    for v in videos:
        if len(v) < 2:
            continue
        P = v[0][1] - v[0][0]
        out.append([idx[s : s + P] for s, _ in v])
    return out


def ttm_references(num_frames: int, skip_last_group: bool = True) -> dict[int, int]:
    """Frame -> the frame it is compared with (frames not listed stay whole)."""
    ref = {i + 1: i for i in range(0, num_frames - 1, 2)}
    bound = num_frames - 4 if skip_last_group else num_frames - 2
    for i in range(0, bound, 4):
        ref[i + 2] = i
    return ref


@dataclass(frozen=True)
class DyCokeScorer(Scorer):
    """DyCoke TTM: frames of a video keep the tokens least similar to the same position of a reference frame."""

    name = "dycoke"

    k: float = field(default=0.7, metadata={"min": 0.0, "max": 1.0})
    """Merging ratio: a compared frame keeps ``int((1 - k) * tokens_per_frame)`` tokens (DyCoke ``dycoke_k``)."""
    skip_last_group: bool = True
    """Reproduce the official ``range(0, num_frames - 4, 4)`` bound of the second pass."""

    def score(self, view: LayerView):
        h = view.hidden
        out = torch.full(view.vision_mask.shape, KEEP, dtype=torch.float32, device=h.device)
        for b in range(h.shape[0]):
            for frames in video_frames(view, b):
                P = frames[0].numel()
                keep = int((1 - self.k) * P)
                for j, r in ttm_references(len(frames), self.skip_last_group).items():
                    sim = torch.nn.functional.cosine_similarity(h[b, frames[j]].float(), h[b, frames[r]].float(), dim=-1)
                    order = torch.sort(sim, stable=True).indices  # lowest similarity first
                    tier = torch.full_like(sim, LOW)
                    tier[order[:keep]] = HIGH
                    out[b, frames[j]] = tier + (1 - sim)
        return out


@tokencomp.hookimpl
def register_scorers(register):
    register(DyCokeScorer)
