"""Video methods (DyCoke TTM, FastVID, HoliTom, PruneVid) and SparseVLM recycling: the math against
hand-written loops, batch == single, exact budgets, keep = 1 identity (recipes: test_shipped_recipes)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import tokencomp
from tokencomp.accounting import tokens_per_layer
from tokencomp.interfaces import LayerView
from tokencomp.mergers.holitom import HoliTomInnerMerger
from tokencomp.mergers.recycle import RecycleMerger, dpc_knn
from tokencomp.ranking import best_mask
from tokencomp.scorers.dycoke import DyCokeScorer, video_frames
from tokencomp.scorers.fastvid import segments
from tokencomp.scorers.holitom import static_windows
from tokencomp.scorers.prunevid import prunevid_plan
from tokencomp.testing import build_tiny, make_inputs, suppress_ids, take_sample


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
