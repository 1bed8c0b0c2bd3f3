"""Video methods (DyCoke TTM, FastVID, HoliTom, PruneVid) and SparseVLM recycling: the math against
hand-written loops, the batched code paths against one set / one sample at a time, batch == single,
exact budgets, keep = 1 identity; frames found from the model adapter where text separates them
(Qwen3-VL), and a refusal where they are no longer whole (recipes: test_shipped_recipes)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import tokencomp
from tokencomp.accounting import tokens_per_layer
from tokencomp.interfaces import LayerView
from tokencomp.mergers.holitom import HoliTomInnerMerger
from tokencomp.mergers.fastvid import FastVIDMerger
from tokencomp.mergers.recycle import RecycleMerger, cluster_members, dpc_knn, shared_plan, top_stable
from tokencomp.ranking import best_mask
from tokencomp.scorers.dycoke import DyCokeScorer, ttm_passes, ttm_references, video_frames, video_index
from tokencomp.scorers.fastvid import fastvid_plan, segments
from tokencomp.scorers.holitom import holitom_plan, run_lengths, salience, static_windows
from tokencomp.scorers.prunevid import prunevid_plan
from tokencomp.testing import build_tiny, make_inputs, suppress_ids, take_sample, vision_token_ids


def video_view(T=8, P=6, D=5, prefix=3, suffix=4, seed=0, keep=0.5, attention=None):
    g = torch.Generator().manual_seed(seed)
    S = prefix + T * P + suffix
    h = torch.randn(1, S, D, generator=g)
    vis = torch.zeros(1, S, dtype=torch.bool)
    vis[0, prefix : prefix + T * P] = True
    groups = torch.full((1, S), -1)
    groups[0, prefix : prefix + T * P] = torch.arange(T * P) // P
    ar = torch.arange(S)[None]
    return LayerView(0, h, vis, ~vis, torch.tensor([S - 1]), ar, groups, ar, keep=keep, attention=attention)


def dycoke_reference(x, keep_ratio, P):
    """Literal loops of dycole_ttm: the kept token indices (within the video) of each frame."""
    T = x.shape[0] // P
    keep = int((1 - keep_ratio) * P)
    fr = lambda i: x[i * P : (i + 1) * P]
    kept = {}
    for i in range(0, T - 1, 2):
        sim = [float(torch.nn.functional.cosine_similarity(fr(i)[p], fr(i + 1)[p], dim=0)) for p in range(P)]
        kept[i] = list(range(P))
        kept[i + 1] = sorted(sorted(range(P), key=lambda p: (sim[p], p))[:keep])
    for i in range(0, T - 4, 4):
        sim = [float(torch.nn.functional.cosine_similarity(fr(i)[p], fr(i + 2)[p], dim=0)) for p in range(P)]
        kept[i + 2] = sorted(sorted(range(P), key=lambda p: (sim[p], p))[:keep])
    return kept


def test_dycoke_says_when_the_budget_is_not_its_own_count(monkeypatch):
    """The shipped keep 0.4941 is DyCoke's count at 32 OneVision frames only: at 16 frames the stage
    would keep fewer tokens than DyCoke, which is said (with the keep ratio that fits); the keep
    suggested gives DyCoke's count, and 32 frames say nothing."""
    import re
    import warnings

    import tokencomp.scorers.dycoke as dycoke
    from tokencomp.accounting import kept_count

    monkeypatch.setattr(dycoke, "_SAID", set())  # said once per kind of input and process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DyCokeScorer().score(video_view(T=32, P=196, D=8, keep=0.4941))
    view = video_view(T=16, P=196, D=8, keep=0.4941)
    with pytest.warns(UserWarning, match=r"keeps 1618 of its 3136 .* keeps 1549 \(fewer") as got:
        scores = DyCokeScorer().score(view)
    keep = float(re.search(r"keep: ([0-9.]+) gives", str(got[0].message)).group(1))
    assert kept_count(3136, keep) == 1618 == int(((scores >= 4.0) & view.vision_mask).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DyCokeScorer().score(dataclasses.replace(view, keep=keep))


@pytest.mark.parametrize("T", [8, 12])
def test_dycoke_matches_official_loops(T):
    P = 6
    view = video_view(T=T, P=P)
    scores = DyCokeScorer(k=0.7).score(view)
    ref = dycoke_reference(view.hidden[0, 3 : 3 + T * P], 0.7, P)
    count = sum(len(v) for v in ref.values())
    kept = best_mask(scores, view.vision_mask, torch.tensor([count]))[0, 3 : 3 + T * P].view(T, P)
    for t in range(T):
        assert kept[t].nonzero().flatten().tolist() == ref[t], t
    # The last group's frame i+2 stays whole (num_frames - 4 bound).
    assert len(ref[T - 2]) == P


def test_video_frames_newline_and_images():
    view = video_view(T=3, P=4)
    # A OneVision-like newline: one more token joins the last frame.
    vis = view.vision_mask.clone()
    vis[0, 3 + 12] = True
    groups = view.groups.clone()
    groups[0, 3 + 12] = 2
    v2 = LayerView(0, view.hidden, vis, ~vis, view.last_index, view.positions, groups, view.token_index)
    (frames,) = video_frames(v2, 0)
    assert [f.tolist() for f in frames] == [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]]
    # A single group is an image, not a video.
    groups1 = torch.where(vis, torch.zeros_like(groups), groups)
    assert video_frames(LayerView(0, view.hidden, vis, ~vis, view.last_index, view.positions, groups1, view.token_index), 0) == []


def test_holitom_windows_maximise_saved_tokens():
    torch.manual_seed(0)
    for T in (3, 5, 6):
        sim = torch.rand(T - 1, 7) * 0.6 + 0.5
        windows, saved = static_windows(sim, 0.8, 1024)
        assert windows[0][0] == 0 and windows[-1][1] == T - 1
        assert all(a[1] + 1 == b[0] for a, b in zip(windows, windows[1:]))

        def gain(s, e):
            return 0 if e == s else int((sim[s:e] > 0.8).all(0).sum()) * (e - s)

        best = 0
        for cuts in itertools.product([0, 1], repeat=T - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [T]
            best = max(best, sum(gain(a, b - 1) for a, b in zip(bounds[:-1], bounds[1:])))
        assert saved == best == sum(gain(s, e) for s, e in windows)


def holitom_static_video(T=6, P=12, D=8, static=8, seed=4):
    """A video view whose first ``static`` positions barely change over the frames (HoliTom's static tokens)."""
    view = video_view(T=T, P=P, D=D, prefix=3, suffix=2, seed=seed, keep=0.3)
    h = view.hidden.clone()
    g = torch.Generator().manual_seed(seed + 1)
    base = torch.randn(static, D, generator=g)
    for t in range(T):
        h[0, 3 + t * P : 3 + t * P + static] = base + 0.01 * torch.randn(static, D, generator=g)
    return LayerView(**{**view.__dict__, "hidden": h})


def holitom_reference(x, keep, tau, beta, blend=True, k=7):
    """Literal loops of HoliTom's outer static merge (llava_arch.py L100-L150, L199-L213, L295-L303):
    ``{(frame, position): merged state}`` of every static cluster centre (in its window's first frame)."""
    T, P, _ = x.shape
    sim = torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1)
    windows, saved = static_windows(sim, tau, 1024)
    r = min(keep / ((T * P - saved) / (T * P)), 1.0)
    out = {}
    for s, e in windows:
        if e == s:
            continue
        static = [l for l in range(P) if all(float(sim[t, l]) > tau for t in range(s, e))]
        c = round(len(static) * r)
        if c <= 0:
            continue
        feats = torch.stack([x[s : e + 1, l].mean(0) for l in static])  # window means
        score, dist = dpc_knn(feats, min(k, c))
        centres = top_stable(score, c).tolist()
        others = [i for i in range(len(static)) if i not in centres]
        near = {i: min(range(c), key=lambda j: (float(dist[i, centres[j]]), j)) for i in others}
        for j, ci in enumerate(centres):
            members = [feats[i] for i in others if near[i] == j]
            if not members:
                merged = feats[ci]
            elif blend:
                merged = beta * feats[ci] + (1 - beta) * torch.stack(members).mean(0)
            else:
                merged = torch.stack([feats[ci]] + members).mean(0)
            out[(s, static[ci])] = merged
    return out


@pytest.mark.parametrize("blend", [True, False])
def test_holitom_static_merge_matches_official_loops(blend):
    """Each kept static centre is the official β blend of its cluster's window means (``NO_BETA``
    unset, β = 0.6), or with ``blend: false`` the plain mean (``NO_BETA=1``)."""
    from tokencomp.mergers.holitom import HoliTomMerger

    T, P = 6, 12
    view = holitom_static_video(T, P)
    x = view.hidden[0, 3 : 3 + T * P].view(T, P, -1)
    ref = holitom_reference(x, 0.3, 0.8, 0.6, blend)
    assert ref
    kept = torch.zeros_like(view.vision_mask)
    for t, l in ref:
        kept[0, 3 + t * P + l] = True
    out, _ = HoliTomMerger(tau=0.8, blend=blend).merge(view, kept, view.vision_mask & ~kept, torch.zeros(1, dtype=torch.long))
    for (t, l), want in ref.items():
        assert torch.allclose(out[0, 3 + t * P + l], want, atol=1e-5), (t, l)


def test_holitom_budget_below_its_count_trims_dynamic_tokens_not_clusters():
    """A budget below HoliTom's own count (its per-frame ceil) drops dynamic tokens: every static
    cluster centre (which stands for its whole cluster over the window) stays."""
    from tokencomp.scorers.holitom import HoliTomScorer

    T, P = 6, 12
    view = holitom_static_video(T, P)
    x = view.hidden[0, 3 : 3 + T * P].view(T, P, -1)
    centres = {3 + t * P + l for t, l in holitom_reference(x, 0.3, 0.8, 0.6)}
    scores = HoliTomScorer(tau=0.8).score(view)
    own = int((scores[0] >= 4.0).logical_and(view.vision_mask[0]).sum())
    assert own > len(centres) + 3
    kept = best_mask(scores, view.vision_mask, torch.tensor([len(centres) + 3]))[0]  # far below its count
    assert centres and centres <= set(kept.nonzero().flatten().tolist())


def test_holitom_inner_is_the_official_running_average():
    torch.manual_seed(2)
    view = video_view(T=2, P=8)
    h = view.hidden
    kept = view.vision_mask & (torch.arange(h.shape[1]) % 3 == 0)
    dropped = view.vision_mask & ~kept
    out, _ = HoliTomInnerMerger().merge(view, kept, dropped, torch.zeros(1, dtype=torch.long))
    ref = h.clone()
    ks = kept[0].nonzero().flatten()
    for i in dropped[0].nonzero().flatten().tolist():  # official: sequential, on the original states
        sims = torch.nn.functional.cosine_similarity(h[0, i][None], h[0, ks], dim=-1)
        t = int(ks[int(sims.argmax())])
        ref[0, t] = (ref[0, t] + h[0, i]) / 2
    assert torch.allclose(out[0, ks], ref[0, ks], atol=1e-5)


def dpc_reference(x, k):
    N, D = x.shape
    d = [[float((x[i] - x[j]).norm()) / math.sqrt(D) for j in range(N)] for i in range(N)]
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[:k]) / k) for i in range(N)]
    dmax = max(max(r) for r in d)
    delta = [min([d[i][j] for j in range(N) if rho[j] > rho[i]], default=dmax) for i in range(N)]
    return [r * s for r, s in zip(rho, delta)]


def test_dpc_knn_matches_loops():
    x = torch.randn(11, 4, generator=torch.Generator().manual_seed(5))
    score, _ = dpc_knn(x, 3)
    assert torch.allclose(score, torch.tensor(dpc_reference(x, 3)), atol=1e-5)


def test_recycle_matches_official_loop():
    T, P = 2, 10
    view = video_view(T=T, P=P, seed=4)
    S = view.hidden.shape[1]
    att = torch.rand(1, 3, S, generator=torch.Generator().manual_seed(1))
    view = LayerView(**{**view.__dict__, "attention": att})
    kept = view.vision_mask & (torch.arange(S) % 4 == 0)
    dropped = view.vision_mask & ~kept
    out, slots = RecycleMerger(tokens=2).merge(view, kept, dropped, torch.tensor([2]))
    h = view.hidden[0]
    r = att[0].mean(0)
    pruned = dropped[0].nonzero().flatten().tolist()
    n_cand = int(len(pruned) * 0.3) + 1
    cand = sorted(pruned, key=lambda i: (-float(r[i]), i))[:n_cand]
    sc = dpc_reference(h[cand], 2)
    centres = sorted(range(len(cand)), key=lambda i: (-sc[i], i))[:2]
    assert sorted(slots[0].nonzero().flatten().tolist()) == sorted(cand[c] for c in centres)
    for j, c in enumerate(centres):
        members = [cand[i] for i in range(len(cand)) if i in centres and i == c or i not in centres and min(centres, key=lambda q: (float((h[cand[i]] - h[cand[q]]).norm()), centres.index(q))) == c]
        assert torch.allclose(out[0, cand[c]], h[members].mean(0), atol=1e-5)


def test_fastvid_segments_reference():
    x = torch.randn(9, 4, 6, generator=torch.Generator().manual_seed(3))
    g = torch.nn.functional.normalize(x.mean(1), dim=-1)
    s = [float(g[t] @ g[t + 1]) for t in range(8)]
    cuts = set(sorted(range(8), key=lambda t: (s[t], t))[:3]) | {t for t in range(8) if s[t] < 0.5}
    sizes, start = [], 0
    for t in range(9):
        if t in cuts or t == 8:
            sizes.append(t + 1 - start)
            start = t + 1
    assert segments(x, 4, 0.5) == sizes


def fastvid_reference(x, keep, c, tau, d, p, beta, k=4):
    """Literal loops of FastVID's STPrune + DTM (modeling_qwen2.py L930-L1060) on frames ``x`` (T, P, D):
    ``{(frame, token): merged state}`` of every context token. Each anchor frame's context tokens take
    the mean of *all* the segment's non-salient tokens most similar to them (other anchors' context
    tokens included)."""
    T, P, _ = x.shape
    sal = salience(x)
    retain = int(P * keep)
    n_sal = retain - int(retain * d)
    n_ctx = retain - n_sal
    top = top_stable(sal, n_sal)
    ref, start = {}, 0
    for L in segments(x, c, tau):
        anchors = [start + j for j in range(L) if (L - 1 - j) % p == 0]
        per_anchor = n_ctx * L // len(anchors)
        rest = [[q for q in range(P) if q not in top[t].tolist()] for t in range(start, start + L)]
        seg = torch.stack([x[start + i, q] for i in range(L) for q in rest[i]])
        for a in anchors:
            fa = rest[a - start]
            score, _ = dpc_knn(x[a, fa], k)
            ctx = top_stable(score, per_anchor)
            ctx_x = x[a, fa][ctx]
            sim = torch.nn.functional.normalize(seg, dim=-1) @ torch.nn.functional.normalize(ctx_x, dim=-1).T
            assign = sim.argmax(1)
            for j in range(per_anchor):
                m = seg[assign == j]
                w = max(beta, 1 / (m.shape[0] + 1))
                ref[(a, fa[int(ctx[j])])] = w * ctx_x[j] + (1 - w) * m.mean(0) if m.shape[0] else ctx_x[j]
        start += L
    return ref


@pytest.mark.parametrize("seed", [1, 2])
def test_fastvid_merge_matches_official_loops(seed):
    """DTM with several anchor frames per segment (p = 2): every context token equals the official
    blend, whose mean counts the other anchors' context tokens too (they are kept: a merge that left
    kept members out, as the other merging methods do, differs here)."""
    T, P, D, prefix = 8, 20, 16, 3
    c, tau, d, p, beta = 2, -1.0, 0.4, 2, 0.6
    view = video_view(T=T, P=P, D=D, prefix=prefix, suffix=2, seed=seed, keep=0.5)
    x = view.hidden[0, prefix : prefix + T * P].view(T, P, D)
    assert max(segments(x, c, tau)) >= 3  # some segment has two anchor frames
    ((score, _),) = fastvid_plan(view, c, tau, d, p)
    kept = (score >= 4.0)[None] & view.vision_mask  # FastVID's own tokens (the budget equals them)
    out, _ = FastVIDMerger(c=c, tau=tau, d=d, p=p, beta=beta).merge(view, kept, view.vision_mask & ~kept, torch.zeros(1, dtype=torch.long))
    ref = fastvid_reference(x, 0.5, c, tau, d, p, beta)
    assert len(ref) > 0
    for (t, q), want in ref.items():
        assert torch.allclose(out[0, prefix + t * P + q], want, atol=1e-5), (t, q)


@pytest.mark.parametrize("labels, want", [
    ([0, 0, 0, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]),  # shorter runs go to the longer neighbour
    ([0, 1, 0, 1], [0, 0, 0, 0]),  # only single-frame runs: no cluster stays, no neighbour: 0
    ([2, 2, 1, 2, 2], [2, 2, 2, 2, 2]),  # equally long runs all stay; a tie goes left
    ([1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]),  # no left neighbour: the right one
    ([3, 3, 1, 1, 1, 3], [3, 3, 1, 1, 1, 1]),
])
def test_prunevid_refines_temporal_clusters_as_the_official_code(labels, want):
    """``refine_clusters`` (modeling_pllava.py L213-L316): each cluster keeps its longest run(s),
    other runs join the longer neighbouring run (checked against the official function on 3000
    random label sequences while porting)."""
    from tokencomp.scorers.prunevid import refine_labels

    assert refine_labels(labels) == want


def test_prunevid_static_positions_and_merge():
    """One window (all frames alike): static positions by the mean pairwise cosine, merged over frames."""
    T, P = 4, 6
    view = video_view(T=T, P=P, seed=7)
    h = view.hidden.clone()
    base = h[0, 3 : 3 + P].clone()
    for t in range(T):  # positions 0..2 static, 3..5 change
        h[0, 3 + t * P : 3 + t * P + 3] = base[:3] + 0.01 * t
    view = LayerView(**{**view.__dict__, "hidden": h})
    (score, (slots, members, owner)), = prunevid_plan(view, 0.8, 0.25, 0.5)
    x = h[0, 3 : 3 + T * P].view(T, P, -1)
    u = torch.nn.functional.normalize(x, dim=-1)
    s = [(sum(float(u[w, l] @ u[t, l]) for w in range(T) for t in range(T)) - T) / (T * (T - 1)) for l in range(P)]
    static = [l for l in range(P) if s[l] > 0.8]
    assert static == [0, 1, 2]
    first = slots[: len(static)].tolist()
    assert first == [3 + l for l in static]  # <= 14 static tokens: each its own cluster, in frame 0
    kept = torch.zeros_like(view.vision_mask)
    kept[0, slots] = True
    out = view.hidden.clone()
    from tokencomp.mergers.recycle import apply_merges

    apply_merges(view.hidden, out, 0, kept, (slots, members, owner))
    for l in static:
        assert torch.allclose(out[0, 3 + l], x[:, l].mean(0), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Batched code paths: the same results as one frame / one set / one sample at a time
# --------------------------------------------------------------------------------------------------


def ragged_view(samples, D=12, seed=0, keep=0.3, adapter=False):
    """A left-padded batch: per sample a list of ``("text", n)``, ``("image", n)`` or
    ``("video", T, P, newline[, gap])``; frames alike but for some positions (so windows and static
    tokens occur), ``gap`` text tokens before every frame but the first (Qwen3-VL's timestamp and
    vision start / end; their states come from another generator, so the frames' states do not depend
    on the gaps). ``adapter``: the view carries the videos as a model adapter gives them."""
    g, gap_g = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    rows = []
    for segs in samples:
        hs, vis, grp, vid, gid, n_vid = [], [], [], [], 0, 0
        for kind, *a in segs:
            if kind == "video":
                T, P, newline, gap = (*a, 0)[:4]
                base = torch.randn(P, D, generator=g)
                moving = torch.rand(P, 1, generator=g) < 0.4
                x = base + 0.05 * torch.randn(T, P, D, generator=g) + moving * torch.randn(T, P, D, generator=g)
                for t in range(T):
                    if t and gap:
                        hs.append(torch.randn(gap, D, generator=gap_g))
                        vis += [False] * gap
                        grp += [-1] * gap
                        vid += [-1] * gap
                    hs.append(x[t])
                    vis += [True] * P
                    grp += [gid + t] * P
                    vid += [n_vid] * P
                if newline:
                    hs.append(torch.randn(1, D, generator=g))
                    vis.append(True)
                    grp.append(gid + T - 1)
                    vid.append(n_vid)
                gid += T
                n_vid += 1
            else:
                hs.append(torch.randn(a[0], D, generator=g))
                vis += [kind == "image"] * a[0]
                grp += [gid if kind == "image" else -1] * a[0]
                vid += [-1] * a[0]
                gid += kind == "image"
        rows.append((torch.cat(hs), vis, grp, vid))
    B, S = len(rows), max(len(r[1]) for r in rows)
    h = torch.zeros(B, S, D)
    vm, valid = torch.zeros(B, S, dtype=torch.bool), torch.zeros(B, S, dtype=torch.bool)
    groups, videos = torch.full((B, S), -1), torch.full((B, S), -1)
    for b, (x, v, gr, vi) in enumerate(rows):
        n = len(v)
        h[b, S - n :], vm[b, S - n :], valid[b, S - n :] = x, torch.tensor(v), True
        groups[b, S - n :], videos[b, S - n :] = torch.tensor(gr), torch.tensor(vi)
    ar = torch.arange(S).expand(B, S)
    ti = torch.cumsum(valid.long(), 1) - 1
    return LayerView(0, h, vm, valid & ~vm, torch.full((B,), S - 1), ar, groups, ti, keep=keep, videos=videos if adapter else None)


RAGGED = [
    [("text", 3), ("image", 7), ("video", 9, 12, True), ("text", 5)],
    [("text", 6), ("video", 4, 12, True), ("text", 2)],
    [("text", 4), ("video", 6, 8, False), ("text", 2), ("video", 3, 5, False), ("text", 1), ("video", 1, 6, False), ("text", 2)],
]


def sample_view(view, b):
    """Sample ``b`` of ``view`` alone, its padding removed."""
    pad = int((view.token_index[b] < 0).sum())
    row = lambda t: t[b : b + 1, pad:]
    S = view.hidden.shape[1] - pad
    ar = torch.arange(S)[None]
    return LayerView(0, row(view.hidden), row(view.vision_mask), row(view.text_mask), torch.tensor([S - 1]), ar,
                     row(view.groups), row(view.token_index), keep=view.keep,
                     videos=None if view.videos is None else row(view.videos)), pad


def test_video_index_layout_of_a_ragged_batch():
    view = ragged_view(RAGGED)
    videos = video_index(view)
    S = view.hidden.shape[1]
    # Sample 0: text 3, image 7, then 9 frames of 12 (newline left out); sample 1: 4 frames of 12.
    (v0,), (v1,) = videos[0], videos[1]
    start0 = S - (3 + 7 + 9 * 12 + 1 + 5) + 10
    assert torch.equal(v0, torch.arange(start0, start0 + 108).view(9, 12))
    start1 = S - (6 + 4 * 12 + 1 + 2) + 6
    assert torch.equal(v1, torch.arange(start1, start1 + 48).view(4, 12))
    # Sample 2: two videos (6 x 8 after text, then 3 x 5); the one-frame "video" is no video.
    start2 = S - (4 + 48 + 2 + 15 + 1 + 6 + 2) + 4
    assert [v.shape for v in videos[2]] == [(6, 8), (3, 5)]
    assert torch.equal(videos[2][0], torch.arange(start2, start2 + 48).view(6, 8))
    assert torch.equal(videos[2][1], torch.arange(start2 + 50, start2 + 65).view(3, 5))
    # video_frames: the same, one tensor per frame.
    assert [[f.tolist() for f in v] for v in video_frames(view, 2)] == [v.tolist() for v in videos[2]]


# Qwen3-VL-like: text between a video's frames (its timestamp, vision end / start).
GAPPED = [
    [("text", 3), ("image", 7), ("video", 5, 12, False, 3), ("text", 5)],
    [("text", 6), ("video", 4, 12, True, 2), ("text", 2)],
    [("text", 4), ("video", 6, 8, False, 3), ("text", 2), ("video", 3, 5, False, 1), ("text", 1), ("video", 1, 6, False), ("text", 2)],
]


def contiguous(samples):
    """The same samples without the gaps."""
    return [[seg[:4] if seg[0] == "video" else seg for seg in segs] for segs in samples]


def frame_positions(view, b):
    """Positions of sample ``b``'s video frame tokens, per video and frame, from ``view.videos``
    (a newline is in its video but no frame of its own: left out, as video_index does)."""
    out = []
    for v in view.videos[b].unique().tolist():
        if v < 0:
            continue
        pos = (view.videos[b] == v).nonzero().flatten()
        frames = [pos[view.groups[b, pos] == g] for g in view.groups[b, pos].unique().tolist()]
        P = frames[0].numel()
        if len(frames) > 1:
            out.append(torch.stack([f[:P] for f in frames]))
    return out


def test_video_index_from_the_adapter_finds_separated_frames():
    view = ragged_view(GAPPED, adapter=True)
    videos = video_index(view)
    assert [[tuple(v.shape) for v in vs] for vs in videos] == [[(5, 12)], [(4, 12)], [(6, 8), (3, 5)]]
    for b in range(3):
        assert [v.tolist() for v in videos[b]] == [v.tolist() for v in frame_positions(view, b)]
    # The contiguity guess sees no video where text separates the frames (sample 2's second video
    # has gaps of one token: its frames are not contiguous either).
    guessed = video_index(LayerView(**{**view.__dict__, "videos": None}))
    assert guessed == [[], [], []]
    # Without the gaps, the guess and the adapter agree.
    flat = ragged_view(contiguous(GAPPED), adapter=True)
    assert [[v.tolist() for v in vs] for vs in video_index(flat)] == [
        [v.tolist() for v in vs] for vs in video_index(LayerView(**{**flat.__dict__, "videos": None}))
    ]


def test_video_index_from_the_adapter_refuses_partial_frames():
    view = ragged_view(GAPPED, adapter=True)
    vm = view.vision_mask.clone()
    vm[1, (view.videos[1] == 0).nonzero()[20, 0]] = False  # a token of the second frame is gone
    with pytest.raises(tokencomp.UnsupportedModelError, match="whole video frames"):
        video_index(LayerView(**{**view.__dict__, "vision_mask": vm}))
    # A whole frame gone: the frames left are not the video's consecutive frames.
    second = view.groups[0][view.videos[0] == 0].min() + 1  # sample 0's second frame
    vm = view.vision_mask.clone()
    vm[0] &= ~((view.videos[0] == 0) & (view.groups[0] == second))
    with pytest.raises(tokencomp.UnsupportedModelError, match="whole video frames"):
        video_index(LayerView(**{**view.__dict__, "vision_mask": vm}))
    # The prompt's last token (pinned, no candidate) stays part of its frame.
    last = torch.full_like(view.last_index, -1)
    last[1] = int((view.videos[1] == 0).nonzero()[-1, 0])
    vm = view.vision_mask.clone()
    vm[1, last[1]] = False
    got = video_index(LayerView(**{**view.__dict__, "vision_mask": vm, "last_index": last}))
    assert [v.tolist() for v in got[1]] == [v.tolist() for v in video_index(view)[1]]


@pytest.mark.parametrize("method", ["dycoke", "fastvid", "holitom", "prunevid"])
def test_separated_frames_give_the_contiguous_result(method):
    """The frames of a video separated by text (the adapter's videos) give exactly the scores and
    merges of the same frames laid out contiguously (the contiguity guess)."""
    gapped = ragged_view(GAPPED, keep=0.35, seed=2, adapter=True)
    flat = ragged_view(contiguous(GAPPED), keep=0.35, seed=2)
    if method == "dycoke":
        plans = [(x, None) for x in DyCokeScorer().score(gapped)], [(x, None) for x in DyCokeScorer().score(flat)]
    else:
        make, params = PLANS[method]
        plans = make(gapped, *params), make(flat, *params)
    for b in range(3):
        # Position in the contiguous view of every vision token of the separated one.
        where = torch.full((gapped.hidden.shape[1],), -1)
        where[gapped.vision_mask[b]] = flat.vision_mask[b].nonzero().flatten()
        (score, merges, *_), (score_flat, merges_flat, *_) = plans[0][b], plans[1][b]
        assert torch.equal(score[gapped.vision_mask[b]], score_flat[flat.vision_mask[b]])
        if merges is not None:
            assert torch.equal(where[merges[0]], merges_flat[0]) and torch.equal(where[merges[1]], merges_flat[1])
            assert torch.equal(merges[2], merges_flat[2])


@pytest.mark.parametrize("T", range(1, 15))
def test_ttm_passes_are_the_official_pairs(T):
    for skip in (True, False):
        m1, m2 = ttm_passes(T, skip)
        pairs = {j: j - 1 for j in range(1, 2 * m1, 2)} | {j: j - 2 for j in range(2, 4 * m2, 4)}
        assert pairs == ttm_references(T, skip)


def test_dpc_knn_and_clusters_batched_equal_one_set_at_a_time():
    x = torch.randn(5, 30, 16, generator=torch.Generator().manual_seed(1))
    score, dist = dpc_knn(x, 7)
    centres = top_stable(score, 6)
    assign = cluster_members(dist, centres)
    for i in range(5):
        s1, d1 = dpc_knn(x[i], 7)
        assert torch.equal(score[i], s1) and torch.equal(dist[i], d1)
        c1 = top_stable(s1, 6)
        assert torch.equal(centres[i], c1) and torch.equal(assign[i], cluster_members(d1, c1))
    assert dpc_knn(x[0, :0], 3)[0].shape == (0,)


def test_run_lengths_and_windows_match_loops():
    torch.manual_seed(4)
    for T in (2, 5, 9):
        above = torch.rand(T - 1, 6) < 0.7
        runs = run_lengths(above)
        for t in range(T - 1):
            for l in range(6):
                n = 0
                while t + n < T - 1 and above[t + n, l]:
                    n += 1
                assert int(runs[t, l]) == n
    # Long static stretches: windows are capped by max_window and still cover every frame.
    sim = torch.full((11, 4), 0.95)
    windows, saved = static_windows(sim, 0.8, 3)
    assert all(e - s + 1 <= 3 for s, e in windows) and windows[0][0] == 0 and windows[-1][1] == 11
    assert saved == sum(4 * (e - s) for s, e in windows)


PLANS = {
    "fastvid": (fastvid_plan, (3, 0.5, 0.4, 2)),
    "holitom": (holitom_plan, (0.8, 1024)),
    "prunevid": (prunevid_plan, (0.5, 0.5, 0.5)),
}


@pytest.mark.parametrize("layout", ["contiguous", "separated"])
@pytest.mark.parametrize("plan", ["fastvid", "holitom", "prunevid"])
def test_plans_same_in_a_batch_as_alone(plan, layout):
    view = ragged_view(RAGGED, keep=0.35, seed=2) if layout == "contiguous" else ragged_view(GAPPED, keep=0.35, seed=2, adapter=True)
    make, params = PLANS[plan]
    plans = make(view, *params)
    for b in range(3):
        alone, pad = sample_view(view, b)
        ((score, merges, *_),) = make(alone, *params)
        assert torch.equal(plans[b][0][pad:], score)
        for got, want in zip(plans[b][1][:2], merges[:2]):
            assert torch.equal(got, want + pad)
        assert torch.equal(plans[b][1][2], merges[2])


def test_shared_plan_once_per_view():
    calls = []

    def make(view, k):
        calls.append(k)
        return object()

    view = video_view()
    first = shared_plan(make, view, 1)
    assert shared_plan(make, view, 1) is first and calls == [1]  # the merger reuses the scorer's plan
    shared_plan(make, view, 2)  # other parameters
    shared_plan(make, LayerView(**view.__dict__), 2)  # another view
    assert len(calls) == 3
    view.hidden.add_(0)  # an in-place edit of the states
    shared_plan(make, view, 2)
    assert len(calls) == 4
    # The scorer's and the merger's plan are the same object: computed once per stage.
    v = ragged_view(RAGGED, keep=0.3)
    assert shared_plan(fastvid_plan, v, 8, 0.9, 0.4, 4) is shared_plan(fastvid_plan, v, 8, 0.9, 0.4, 4)


def test_fastvid_members_go_to_their_most_similar_context_token():
    """DTM: each merge member of a segment lands on the context token of each anchor frame it is the
    most cosine-similar to (the per-anchor products are batched over the anchors of a segment)."""
    view = ragged_view([[("text", 2), ("video", 8, 20, False), ("text", 2)]], D=16, keep=0.5, seed=3)
    ((_, (slots, members, owner)),) = fastvid_plan(view, 3, 0.5, 0.4, 2)
    h = view.hidden[0]
    frame = lambda i: (i - 2) // 20
    by_anchor = {}
    for j, s in enumerate(slots.tolist()):
        by_anchor.setdefault(frame(s), []).append(j)
    for m, o in zip(members.tolist(), owner.tolist()):
        ctx = by_anchor[frame(int(slots[o]))]
        sims = torch.nn.functional.cosine_similarity(h[m][None], h[slots[ctx]], dim=-1)
        assert float(sims[ctx.index(o)]) >= float(sims.max()) - 1e-6


def test_prunevid_without_clusters_merges_nothing():
    view = ragged_view([[("text", 2), ("video", 6, 30, False), ("text", 2)]], keep=0.5)
    ((score, (slots, members, owner)),) = prunevid_plan(view, 0.8, 0.25, 0.0)  # int(n * 0) clusters
    # Sets of more than 14 tokens make no cluster; smaller ones stay tokens of their own.
    assert torch.equal(slots[owner], members)
    assert torch.isfinite(score).all()


# --------------------------------------------------------------------------------------------------
# On the tiny models
# --------------------------------------------------------------------------------------------------

METHODS = {
    "dycoke": [{"phase": "input", "keep": 0.5, "scorer": "dycoke"}],
    "fastvid": [{"phase": "input", "keep": 0.3, "scorer": "fastvid", "merge": "fastvid"}],
    "holitom": [{"phase": "input", "keep": 0.4, "scorer": "holitom", "merge": "holitom"}, {"layer": 3, "keep": 0.5, "scorer": "fastv", "merge": "holitom_inner"}],
    "prunevid": [{"phase": "input", "keep": 0.5, "scorer": "prunevid", "merge": "prunevid"}, {"layer": 3, "keep": 0.4, "scorer": "prunevid_question", "selector": "quota"}],
    "recycle": [{"layer": 2, "keep": 0.5, "scorer": "sparsevlm", "merge": {"name": "recycle", "tokens": 3}}],
}
FAMILIES = {
    "llava_onevision": dict(video=True, n_images=0),
    "qwen2_vl": dict(video=True, n_images=1, image_sizes=[(112, 224), (224, 224)]),
    "qwen3_vl": dict(video=True, n_images=1, image_sizes=[(112, 224), (224, 224)]),
}
_models: dict = {}


def tiny(family):
    if family not in _models:
        _models[family] = build_tiny(family, layers=6)
    return _models[family]


def rec(stages):
    return {"schedule": {"stages": stages}}


def gen_kwargs(model):
    return dict(max_new_tokens=2, do_sample=False, suppress_tokens=suppress_ids(model) + [model.generation_config.eos_token_id], output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(METHODS))
def test_batch_equals_single(family, method):
    model = tiny(family)
    inputs = make_inputs(model, batch=2, padding="left", seed=3, **FAMILIES[family])
    with torch.no_grad(), tokencomp.apply(model, rec(METHODS[method])) as h:
        batched = model.generate(**inputs, **gen_kwargs(model))
        counts = h.stats.vision_tokens_per_layer
        kept = {k: [t.clone() for t in v] for k, v in h.stats.kept_positions.items()}
        for b in range(2):
            solo = model.generate(**take_sample(inputs, b), **gen_kwargs(model))
            assert h.stats.vision_tokens_per_layer[0] == counts[b]
            pad = int((inputs["attention_mask"][b] == 0).sum())
            for layer, rows in kept.items():
                assert (rows[b] - pad).tolist() == h.stats.kept_positions[layer][0].tolist()
            for x, y in zip(solo.scores, batched.scores):
                finite = torch.isfinite(x[0])
                assert (x[0][finite] - y[b][finite]).abs().max() < 1e-4


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("keeps", [(0.7, 0.5), (0.2, 0.0), (0.05, 1.0)])
def test_exact_budget_counts(method, keeps):
    model = tiny("llava_onevision")
    stages = [dict(s, keep=k) for s, k in zip(METHODS[method], keeps)]
    if method == "recycle":
        stages = [dict(stages[0], keep=keeps[0])]
    inputs = make_inputs(model, batch=2, **FAMILIES["llava_onevision"])
    n = int((inputs["input_ids"][0] == model.config.video_token_id).sum())
    with torch.no_grad(), tokencomp.apply(model, rec(stages)) as h:
        model(**inputs)
        parsed = tokencomp.load_recipe(rec(stages)).stages(6)
        assert h.stats.vision_tokens_per_layer == [tokens_per_layer(parsed, 6, n)] * 2


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(METHODS))
def test_keep_one_is_identity(family, method):
    model = tiny(family)
    stages = [dict(s, keep=1.0) for s in METHODS[method]]
    inputs = make_inputs(model, batch=2, **FAMILIES[family])
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokencomp.apply(model, rec(stages)):
            got = model(**inputs).logits
    assert torch.allclose(ref, got, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Where the video's frames are: the model adapter's word (Qwen3-VL separates frames by timestamps)
# --------------------------------------------------------------------------------------------------

VIDEO_METHODS = ["dycoke", "fastvid", "holitom", "prunevid"]
DEFAULT_PLANS = {"fastvid": (fastvid_plan, (8, 0.9, 0.4, 4)), "holitom": (holitom_plan, (0.8, 1024)), "prunevid": (prunevid_plan, (0.8, 0.25, 0.5))}


@pytest.fixture
def seen_videos(monkeypatch):
    """``(view, video_index(view))`` of every call the video scorers and mergers make."""
    import tokencomp.scorers.dycoke
    import tokencomp.scorers.fastvid
    import tokencomp.scorers.holitom
    import tokencomp.scorers.prunevid

    seen = []

    def spy(view):
        out = video_index(view)
        seen.append((view, out))
        return out

    for mod in (tokencomp.scorers.dycoke, tokencomp.scorers.fastvid, tokencomp.scorers.holitom, tokencomp.scorers.prunevid):
        monkeypatch.setattr(mod, "video_index", spy)
    return seen


def grid_frames(inputs, b, model):
    """``(T, P)`` positions of sample ``b``'s video frames: its placeholders in order, split by its grid."""
    t, h, w = inputs["video_grid_thw"][b].tolist()
    return (inputs["input_ids"][b] == model.config.video_token_id).nonzero().flatten().view(t, h * w // 4)


@pytest.mark.parametrize("method", VIDEO_METHODS)
def test_qwen3_video_frames_are_found(method, seen_videos):
    """Qwen3-VL writes a timestamp and vision start / end between a video's frames: the methods see
    the video's frames (forward, and generate with pre-encoded features), each frame keeps tokens
    and merges stay within the video; the contiguity guess alone would have seen no video."""
    model = tiny("qwen3_vl")
    # Video only: an image's tokens always rank first and could take the whole budget.
    inputs = make_inputs(model, batch=2, padding="left", seed=3, video=True, n_images=0)
    frames = [grid_frames(inputs, b, model) for b in range(2)]
    assert frames[0].shape == (2, 16) and bool((frames[0][1:, 0] > frames[0][:-1, -1] + 1).all())  # separated
    # DyCoke keeps frame 0 whole and int(0.3 * 16) = 4 tokens of frame 1: 20 of 32.
    stages = [{"phase": "input", "keep": 0.625, "scorer": "dycoke"}] if method == "dycoke" else METHODS[method]
    with torch.no_grad(), tokencomp.apply(model, rec(stages)) as h:
        model(**inputs)
        kept = [set(t.tolist()) for t in h.stats.kept_positions[0]]
        model.generate(**inputs, **gen_kwargs(model))
    views = [(v, out) for v, out in seen_videos if v.layer == 0]
    assert len({id(v) for v, _ in views}) == 2  # the forward's input stage and generate's
    for view, videos in views:
        assert [[v.tolist() for v in vs] for vs in videos] == [[f.tolist()] for f in frames]
        assert video_index(dataclasses.replace(view, videos=None)) == [[], []]  # the guess: images only
        if method in DEFAULT_PLANS:
            make, params = DEFAULT_PLANS[method]
            for b, (_, (slots, members, _), *_) in enumerate(make(view, *params)):
                assert set(slots.tolist()) | set(members.tolist()) <= set(frames[b].flatten().tolist())
    for b in range(2):
        for frame in frames[b]:
            assert kept[b] & set(frame.tolist()), f"{method}: a frame of sample {b} was emptied"


def test_qwen3_video_frames_found_for_inputs_embeds(seen_videos):
    """An inputs_embeds call (vision mask from the caller): the adapter reads the video placeholders
    from the processor's token types."""
    model = tiny("qwen3_vl")
    inputs = make_inputs(model, batch=2, padding="left", seed=3, **FAMILIES["qwen3_vl"])
    ids = inputs.pop("input_ids")
    mask = torch.isin(ids, torch.tensor(vision_token_ids(model)))
    with torch.no_grad(), tokencomp.apply(model, rec(METHODS["dycoke"])) as h, h.vision_mask(mask):
        model(inputs_embeds=model.get_input_embeddings()(ids), **inputs)
    ((view, videos),) = seen_videos
    assert [[v.tolist() for v in vs] for vs in videos] == [[grid_frames(dict(inputs, input_ids=ids), b, model).tolist()] for b in range(2)]


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_contiguous_videos_as_before(family, seen_videos):
    """OneVision's adapter leaves videos to the contiguity guess; the Qwen adapter's videos are what
    the guess finds where frames are contiguous (Qwen2-VL)."""
    model = tiny(family)
    inputs = make_inputs(model, batch=2, padding="left", seed=3, **FAMILIES[family])
    with torch.no_grad(), tokencomp.apply(model, rec(METHODS["dycoke"])):
        model(**inputs)
    ((view, videos),) = seen_videos
    assert (view.videos is None) == (family == "llava_onevision")
    assert [[tuple(v.shape) for v in vs] for vs in videos] == [[(8, 4)]] * 2 if family == "llava_onevision" else [[(2, 16)]] * 2
    if view.videos is not None:
        guessed = video_index(dataclasses.replace(view, videos=None))
        assert [[v.tolist() for v in vs] for vs in videos] == [[v.tolist() for v in vs] for vs in guessed]


def test_video_method_after_a_drop_refuses_on_known_videos():
    """Once another stage dropped tokens the frames are not whole: where the adapter says which frames
    form a video, a video method refuses instead of silently treating them as pictures."""
    model = tiny("qwen3_vl")
    inputs = make_inputs(model, batch=2, **FAMILIES["qwen3_vl"])
    stages = [{"layer": 1, "keep": 0.7, "scorer": "fastv"}, {"layer": 3, "keep": 0.5, "scorer": "dycoke"}]
    with torch.no_grad(), tokencomp.apply(model, rec(stages)):
        with pytest.raises(tokencomp.UnsupportedModelError, match="whole video frames"):
            model(**inputs)

