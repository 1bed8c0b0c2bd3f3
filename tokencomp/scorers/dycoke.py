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
always kept, like every vision token outside a video (images); ties go to the earlier token; a
pruned frame's kept tokens stay in spatial order (officially in ``topk`` order, lowest similarity
first: with the contiguous positions of the official sequence, their positions differ within the
frame). The stage keeps ``int(n · keep)``: the shipped keep ratios give DyCoke's own count for their
frame count only; for any other input (other frame counts, images beside the video) the scorer says
so with a warning that gives the keep ratio matching that input.

Score tiers (so ``topk`` with the stage budget keeps DyCoke's set when the budget equals its count,
and degrades gracefully otherwise): 8 for whole-frame / unmatched / non-video tokens, ``4 + (1 − cos)``
for kept compared tokens, ``1 − cos`` for the others.

Frames come from ``view.groups`` (see :func:`video_index`): a *video* is the model adapter's
(``view.videos``: Qwen3-VL puts a timestamp between frames), or else a run of at least two consecutive
groups whose tokens are contiguous and whose frames have the first frame's size (a last frame one
larger: the OneVision newline). The stage-2 decode-time KV pruning comes with the engine's ``phase: decode``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.accounting import kept_count
from tokencomp.errors import UnsupportedModelError
from tokencomp.interfaces import LayerView, Scorer

KEEP, HIGH, LOW = 8.0, 4.0, 0.0


def video_index(view: LayerView) -> list[list[torch.Tensor]]:
    """Videos of every sample: ``out[b]`` lists sample ``b``'s videos, each a ``(T, P)`` long tensor of
    the sequence indices of its ``T ≥ 2`` frames' tokens in order, every frame of the first frame's
    size ``P`` (a last frame's extra tokens, e.g. OneVision's newline, are left out). Groups that are
    not frames of a video (images) are not listed.

    Where the model adapter says which frames form a video (``view.videos``), a video is exactly its
    groups, the last token of a prompt included (a frame keeps its shape though that token is no
    candidate); frames that are no longer whole and equal raise
    :class:`~tokencomp.UnsupportedModelError` (never silently treated as images). Otherwise a video
    is a run of consecutive groups (among each sample's vision tokens) whose tokens are contiguous and
    whose frames have the first frame's size, the last one possibly one larger. The runs are found
    with tensor ops over the whole batch and read back once (three small host syncs whatever the
    number of frames); only the grouping of the runs loops, on host integers."""
    explicit = view.videos is not None
    mask = view.vision_mask
    if explicit:
        last = torch.arange(mask.shape[1], device=mask.device)[None] == view.last_index[:, None]
        mask = (mask | last) & (view.videos >= 0)
    nz = mask.nonzero()
    out: list[list[torch.Tensor]] = [[] for _ in range(mask.shape[0])]
    if nz.shape[0] == 0:
        return out
    bi, si = nz[:, 0], nz[:, 1]
    g = view.groups[bi, si]
    new = torch.ones_like(bi, dtype=torch.bool)
    new[1:] = (bi[1:] != bi[:-1]) | (g[1:] != g[:-1])
    starts = new.nonzero().flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([bi.shape[0]])])
    if explicit:
        # Per run: start (in the flat list of video tokens), end, sample, video, group.
        runs = torch.stack([starts, ends, bi[starts], view.videos[bi[starts], si[starts]], g[starts]], 1).tolist()
        return _adapter_videos(runs, si, out)
    ti = view.token_index[bi, si]
    # Per run: start (in the flat vision list), end, sample, token index of its first and last token.
    runs = torch.stack([starts, ends, bi[starts], ti[starts], ti[ends - 1]], 1).tolist()
    videos: list[tuple[int, list]] = []
    cur: list = []
    for run in runs:
        s, e, b, first, _ = run
        if cur:
            ps, pe, pb, _, plast = cur[-1]
            P = cur[0][1] - cur[0][0]
            if b == pb and first == plast + 1 and pe - ps == P and e - s in (P, P + 1):
                cur.append(run)
                continue
            videos.append((cur[0][2], cur))
        cur = [run]
    videos.append((cur[0][2], cur))
    for b, v in videos:
        if len(v) < 2:
            continue
        s, P = v[0][0], v[0][1] - v[0][0]
        # Every frame but the last has exactly P tokens: the frames are one slice of the flat list.
        out[b].append(si[s : s + len(v) * P].view(len(v), P))
    return out


def _adapter_videos(runs: list, si: torch.Tensor, out: list) -> list[list[torch.Tensor]]:
    """:func:`video_index` from the adapter's videos: ``runs`` are ``[start, end, sample, video,
    group]`` of every frame in sequence order, ``si`` the sequence index of each listed token."""
    videos: dict[tuple[int, int], list] = {}
    for run in runs:
        videos.setdefault((run[2], run[3]), []).append(run)
    for (b, v), frames in videos.items():
        if len(frames) < 2:
            continue  # a one-frame video is a picture to these methods
        sizes = [e - s for s, e, *_ in frames]
        groups = [r[4] for r in frames]
        P = sizes[0]
        if any(n != P for n in sizes[:-1]) or sizes[-1] not in (P, P + 1) or groups != list(range(groups[0], groups[0] + len(groups))):
            raise UnsupportedModelError(
                f"a video method needs whole video frames, but video {v} of sample {b} has frames {groups} of "
                f"{sizes} live tokens (did an earlier stage drop some? run the video method first)"
            )
        s = frames[0][0]
        out[b].append(si[s : s + len(frames) * P].view(len(frames), P))
    return out


def video_frames(view: LayerView, b: int) -> list[list[torch.Tensor]]:
    """Videos of sample ``b`` as lists (≥ 2) of frames, each the ``(P,)`` sequence indices of its
    tokens (:func:`video_index` of that sample, one tensor per frame)."""
    return [list(v.unbind(0)) for v in video_index(view)[b]]


def frame_states(h: torch.Tensor, b: int, idx: torch.Tensor) -> torch.Tensor:
    """``(T, P, D)`` float32 states of sample ``b``'s video frames ``idx`` (T, P) (a row gather)."""
    return h[b].index_select(0, idx.flatten()).view(*idx.shape, h.shape[-1]).float()


def ttm_references(num_frames: int, skip_last_group: bool = True) -> dict[int, int]:
    """Frame -> the frame it is compared with (frames not listed stay whole)."""
    ref = {i + 1: i for i in range(0, num_frames - 1, 2)}
    bound = num_frames - 4 if skip_last_group else num_frames - 2
    for i in range(0, bound, 4):
        ref[i + 2] = i
    return ref


def ttm_passes(num_frames: int, skip_last_group: bool = True) -> tuple[int, int]:
    """How many frames each pass of :func:`ttm_references` compares: ``(m1, m2)``, frames ``1, 3, …,
    2·m1 − 1`` with the frame before them, then frames ``2, 6, …, 4·m2 − 2`` with the frame two before."""
    bound = num_frames - 4 if skip_last_group else num_frames - 2
    return num_frames // 2, len(range(0, bound, 4))


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
        for b, videos in enumerate(video_index(view)):
            for idx in videos:
                T, P = idx.shape
                keep = int((1 - self.k) * P)
                m1, m2 = ttm_passes(T, self.skip_last_group)
                x = frame_states(h, b, idx)
                # Both passes on strided views of the frames (odd frames against the one before,
                # frames 2, 6, … against the one two before): (m1 + m2, P) similarities.
                sim = torch.cat([
                    torch.nn.functional.cosine_similarity(x[1 : 2 * m1 : 2], x[0 : 2 * m1 : 2], dim=-1),
                    torch.nn.functional.cosine_similarity(x[2::4][:m2], x[0::4][:m2], dim=-1),
                ])
                order = torch.sort(sim, dim=-1, stable=True).indices  # lowest similarity first
                tier = torch.full_like(sim, LOW).scatter_(1, order[:, :keep], HIGH)
                out[b, torch.cat([idx[1 : 2 * m1 : 2], idx[2::4][:m2]])] = tier + (1 - sim)
        _warn_if_budget_differs(out, view)
        return out


_SAID: set = set()


def _warn_if_budget_differs(scores: torch.Tensor, view: LayerView) -> None:
    """Say so when the stage's budget ``int(n · keep)`` is not DyCoke's own count for this input (a
    fixed ratio fits one frame count: 0.4941 is 32 OneVision frames; images beside a video take
    budget the official code leaves them outside of). One host sync per stage."""
    if view.keep >= 1.0:
        return  # everything stays: the stage is switched off, not mis-sized
    vis = view.vision_mask
    n = vis.sum(1)
    own = ((scores >= HIGH) & vis).sum(1)
    budget = kept_count(n, view.keep)
    if not bool((own != budget).any()):
        return
    b = int((own != budget).nonzero()[0, 0])
    x, total, got = int(own[b]), int(n[b]), int(budget[b])
    if (x, total, got) in _SAID:
        return  # once per kind of input (an evaluation repeats its frame count)
    _SAID.add((x, total, got))
    warnings.warn(
        f"tokencomp: DyCoke: sample {b} keeps {x} of its {total} vision tokens under DyCoke's own rule "
        f"({len(video_index(view)[b])} video(s); tokens outside a video are all kept), but the stage's keep "
        f"{view.keep:g} keeps {got} ({'fewer' if got < x else 'more'}, by score); keep: {(x + 0.5) / total:.6f} "
        "gives DyCoke's count for this input (shipped recipes are for a set frame count)",
        stacklevel=2,
    )


@tokencomp.hookimpl
def register_scorers(register):
    register(DyCokeScorer)
