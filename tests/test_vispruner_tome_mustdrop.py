"""VisPruner (selector ``vispruner``), ToMe (scorer + merger ``tome``) and MustDrop (scorers
``mustdrop_window`` / ``mustdrop``, merger ``window``).

* the math against hand-written reference loops written like the official code, on small tensors;
* on tiny LLaVA models: padded batches equal per-sample runs, exact budgets, keep = 1 is the
  identity, and the shipped recipes carry the published settings.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokencomp
from tokencomp.accounting import kept_count, tokens_per_layer
from tokencomp.interfaces import LayerView
from tokencomp.mergers.mustdrop import WindowMerger
from tokencomp.mergers.tome import ToMeMerger
from tokencomp.ranking import best_mask
from tokencomp.scorers.mustdrop import MustDropScorer, MustDropWindowScorer
from tokencomp.scorers.tome import ToMeScorer
from tokencomp.selectors.vispruner import VisPruner
from tokencomp.testing import make_inputs, take_sample

from test_engine import gen_kwargs, max_score_diff, tiny


def make_view(rows, n_prefix, n_vision, pads, keep=0.5, attention=None, signals=None):
    """LayerView of samples given as unpadded (L_b, D) tensors laid out [prefix | vision | suffix]."""
    B = len(rows)
    S = max(h.shape[0] + p for h, p in zip(rows, pads))
    hidden = torch.zeros(B, S, rows[0].shape[1])
    vis = torch.zeros(B, S, dtype=torch.bool)
    txt = torch.zeros(B, S, dtype=torch.bool)
    tok = torch.full((B, S), -1, dtype=torch.long)
    groups = torch.full((B, S), -1, dtype=torch.long)
    last = torch.zeros(B, dtype=torch.long)
    for b, (h, p) in enumerate(zip(rows, pads)):
        L = h.shape[0]
        hidden[b, p : p + L] = h
        tok[b, p : p + L] = torch.arange(L)
        vis[b, p + n_prefix[b] : p + n_prefix[b] + n_vision[b]] = True
        txt[b, p : p + L] = True
        txt[b] &= ~vis[b]
        groups[b][vis[b]] = 0
        last[b] = p + L - 1
    return LayerView(
        layer=0, hidden=hidden, vision_mask=vis, text_mask=txt, last_index=last,
        positions=torch.arange(S).expand(B, S), groups=groups, token_index=tok, keep=keep,
        attention=attention, signals=signals or {},
    )


def sample(seed, n_prefix=3, n_vision=36, n_suffix=5, D=8):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, D, generator=g)
    vision = centers[torch.randint(0, 5, (n_vision,), generator=g)] + 0.4 * torch.randn(n_vision, D, generator=g)
    text = torch.randn(n_prefix + n_suffix, D, generator=g)
    return torch.cat([text[:n_prefix], vision, text[n_prefix:]])


def cos(x, y):
    return (x @ y / (x.norm() * y.norm())).item()


# --------------------------------------------------------------------------------------------------
# VisPruner
# --------------------------------------------------------------------------------------------------


def vispruner_reference(feats, attn, T, ratio):
    """Official encode_images (Theia-4869/VisPruner llava_arch.py L141-L185) on one image, as loops
    with stable orders: returns the kept indices, sorted."""
    N = feats.shape[0]
    t_imp = int(T * ratio)
    t_div = T - t_imp
    order = sorted(range(N), key=lambda i: (-attn[i].item(), i))
    important, residual = order[:t_imp], order[t_imp:]
    while t_div > 0:
        r = min(8, len(residual) - t_div)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        scores = [max(cos(feats[i], feats[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda k: (-scores[k], k))
        residual = [a[k] for k in ranked[r:]] + b
    return sorted(important + (residual if t_div > 0 else []))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("T,ratio", [(12, 0.5), (8, 0.75), (20, 0.5), (5, 0.0), (6, 1.0), (36, 0.5), (9, 0.3)])
def test_vispruner_matches_official_loop(seed, T, ratio):
    h = sample(seed)
    attn = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(100 + seed))
    view = make_view([h], [3], [36], [0])
    kept = VisPruner(important_ratio=ratio).select(attn[None], view, torch.tensor([T]))
    assert (kept[0].nonzero()[:, 0] - 3).tolist() == vispruner_reference(h[3:39], attn[3:39], T, ratio)
    assert int(kept.sum()) == T


def test_vispruner_batch_equals_single_and_budgets():
    rows = [sample(1), sample(2, n_prefix=2, n_vision=30, n_suffix=7)]
    attn = [torch.rand(r.shape[0], generator=torch.Generator().manual_seed(i)) for i, r in enumerate(rows)]
    budgets = torch.tensor([13, 7])
    batch = make_view(rows, [3, 2], [36, 30], [4, 0])
    scores = torch.zeros(batch.vision_mask.shape)
    scores[0, 4 : 4 + rows[0].shape[0]] = attn[0]
    scores[1, : rows[1].shape[0]] = attn[1]
    kept = VisPruner().select(scores, batch, budgets)
    assert kept.sum(1).tolist() == [13, 7]
    for b, (p, pre, n) in enumerate([(4, 3, 36), (0, 2, 30)]):
        solo = VisPruner().select(attn[b][None], make_view([rows[b]], [pre], [n], [0]), budgets[b : b + 1])
        assert torch.equal(kept[b, p : p + rows[b].shape[0]], solo[0])


# --------------------------------------------------------------------------------------------------
# ToMe
# --------------------------------------------------------------------------------------------------


def tome_reference(x, k, r):
    """Official bipartite_soft_matching + merge_wavg (facebookresearch/ToMe merge.py) repeated until
    ``k`` tokens remain, as loops: returns {survivor index: sorted members}."""
    items = [(x[i].double().clone(), 1.0, [i], i) for i in range(x.shape[0])]  # (mean, size, members, slot)
    while len(items) > k:
        t = len(items)
        step = min(t // 2, t - k) if r <= 0 else min(r, t // 2, t - k)
        a, b = items[0::2], items[1::2]
        best = []
        for ai in a:
            sims = [cos(ai[0], bj[0]) for bj in b]
            j = max(range(len(b)), key=lambda q: (sims[q], -q))  # first maximum
            best.append((sims[j], j))
        ranked = sorted(range(len(a)), key=lambda q: (-best[q][0], q))
        b = list(b)
        for q in ranked[:step]:
            j = best[q][1]
            m, s, mem, slot = b[j]
            am, as_, amem, _ = a[q]
            b[j] = ((m * s + am * as_) / (s + as_), s + as_, mem + amem, slot)
        items = [a[q] for q in ranked[step:]] + b
    return {slot: sorted(mem) for _, _, mem, slot in items}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k,r", [(20, 16), (9, 16), (9, 0), (30, 4), (1, 3)])
def test_tome_matches_official_loop(seed, k, r):
    h = sample(seed)
    keep = (k + 0.5) / 36
    view = make_view([h], [3], [36], [0], keep=keep)
    scores = ToMeScorer(r=r).score(view)
    kept = best_mask(scores, view.vision_mask, torch.tensor([k]))
    groups = tome_reference(h[3:39], k, r)
    assert sorted(i + 3 for i in groups) == kept[0].nonzero()[:, 0].tolist()
    merged, slots = ToMeMerger(r=r).merge(view, kept, view.vision_mask & ~kept, torch.tensor([0]))
    assert not slots.any()
    for slot, members in groups.items():
        want = h[[m + 3 for m in members]].mean(0)
        assert torch.allclose(merged[0, slot + 3], want, atol=1e-5)
    assert torch.equal(merged[0, ~kept[0]], h[~kept[0]])


def test_tome_merger_falls_back_to_nearest():
    h = sample(4)
    view = make_view([h], [3], [36], [0], keep=0.5)
    kept = view.vision_mask.clone()
    kept[0, 3:21] = False  # not ToMe's survivors
    merged, _ = ToMeMerger().merge(view, kept, view.vision_mask & ~kept, torch.tensor([0]))
    unit = torch.nn.functional.normalize(h, dim=-1)
    into = {j: j for j in range(21, 39)}
    for i in range(3, 21):
        into[i] = max(range(21, 39), key=lambda j: ((unit[i] @ unit[j]).item(), -j))
    for j in range(21, 39):
        members = [i for i, t in into.items() if t == j]
        assert torch.allclose(merged[0, j], h[members].mean(0), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# MustDrop
# --------------------------------------------------------------------------------------------------


def windows_reference(side, w):
    """Window members (raster indices) of a side x side grid, destination = the last member."""
    out = {}
    for i in range(side * side):
        r, c = divmod(i, side)
        out.setdefault((r // w, c // w), []).append(i)
    return list(out.values())


@pytest.mark.parametrize("side", [6, 8])
def test_mustdrop_window_scores_and_merge(side):
    n = side * side
    h = sample(5, n_vision=n)
    view = make_view([h], [3], [n], [0])
    scores = MustDropWindowScorer().score(view)[0]
    wins = windows_reference(side, 3)  # an 8 x 8 grid has partial windows at the edges
    sims = []
    for members in wins:
        m = len(members)
        s = sum(cos(h[3 + i], h[3 + j]) for i in members for j in members if i != j) / (m * (m - 1))
        sims.append(s)
        dest = members[-1] + 3
        assert abs(scores[dest].item() - (2 - s)) < 1e-5
        for i in members[:-1]:
            assert abs(scores[i + 3].item() + s) < 1e-5
    # Budget merging the two most similar windows: their non-destination tokens are dropped.
    top = sorted(range(len(wins)), key=lambda k: -sims[k])[:2]
    budget = n - sum(len(wins[k]) - 1 for k in top)
    kept = best_mask(scores[None], view.vision_mask, torch.tensor([budget]))
    dropped_want = sorted(i + 3 for k in top for i in wins[k][:-1])
    dropped = view.vision_mask[0] & ~kept[0]
    assert dropped.nonzero()[:, 0].tolist() == dropped_want
    merged, slots = WindowMerger().merge(view, kept, view.vision_mask & ~kept, torch.tensor([0]))
    assert not slots.any()
    for k in top:
        dest = wins[k][-1] + 3
        assert torch.allclose(merged[0, dest], h[[i + 3 for i in wins[k]]].mean(0), atol=1e-5)
    untouched = kept[0].clone()
    for k in top:
        untouched[wins[k][-1] + 3] = False
    assert torch.equal(merged[0, untouched], h[untouched])


def test_mustdrop_dual_attention_matches_official_filter():
    """At the budget equal to the official filter's count, top-k keeps exactly the official set
    (without a key set); the key set is always kept."""
    g = torch.Generator().manual_seed(0)
    n_pre, n_vis, n_txt = 3, 40, 6
    L = n_pre + n_vis + n_txt
    h = torch.randn(L, 8, generator=g)
    att = torch.softmax(torch.randn(1, n_txt, L, generator=g) * 3, -1)
    att_full = torch.zeros(1, n_txt, L)
    att_full[0] = att[0]
    view = make_view([h], [n_pre], [n_vis], [0], attention=att_full)
    scorer = MustDropScorer(global_thr=0.02, individual_thr=0.05, key_ratio=0.0)
    q = scorer.queries(view)
    assert q[0].tolist() == list(range(n_pre + n_vis, L))
    A = att[0][:, n_pre : n_pre + n_vis]  # official: rows after the image, image columns
    gsum, gmax = A.sum(0), A.max(0).values
    drop = (gsum < gsum.sum() * 0.02) & (gmax < 0.05)
    official = (~drop).nonzero()[:, 0] + n_pre
    assert 0 < len(official) < n_vis
    scores = scorer.score(view)
    kept = best_mask(scores, view.vision_mask, torch.tensor([len(official)]))
    assert kept[0].nonzero()[:, 0].tolist() == official.tolist()
    # Key set: the top ceil(0.08 n) by the [CLS] signal score +inf.
    cls = torch.rand(1, L, generator=g) * view.vision_mask
    view = make_view([h], [n_pre], [n_vis], [0], attention=att_full, signals={"cls_attention": cls})
    s = MustDropScorer(global_thr=0.02, individual_thr=0.05).score(view)[0]
    keys = (cls[0, n_pre : n_pre + n_vis].topk(math.ceil(0.08 * n_vis)).indices + n_pre).tolist()
    assert torch.isinf(s[keys]).all() and int(torch.isinf(s).sum()) == len(keys)
    assert MustDropScorer(key_ratio=0).signals == () and MustDropScorer().signals == ("cls_attention",)


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------

RECIPES = {
    "vispruner": [{"phase": "input", "keep": 0.3, "scorer": "cls_attention", "selector": {"name": "vispruner"}}],
    "tome": [{"phase": "input", "keep": 0.2, "scorer": {"name": "tome", "r": 4}, "merge": {"name": "tome", "r": 4}}],
    "mustdrop": [
        {"phase": "input", "keep": 0.75, "scorer": "mustdrop_window", "merge": "window"},
        {"layer": 2, "keep": 0.5, "scorer": "mustdrop"},
        {"layer": 4, "keep": 0.5, "scorer": "mustdrop"},
    ],
}


def rec(stages):
    return {"schedule": {"stages": stages}}


@pytest.mark.parametrize("method", list(RECIPES))
def test_batch_equals_single_and_exact_budgets(method):
    model = tiny("llava")
    inputs = make_inputs(model, batch=3, padding="left")
    stages = RECIPES[method]
    with torch.no_grad(), tokencomp.apply(model, rec(stages)) as h:
        batched = model.generate(**inputs, **gen_kwargs(model))
        counts = h.stats.vision_tokens_per_layer
        n_new = batched.sequences.shape[1] - inputs["input_ids"].shape[1]
        recipe = tokencomp.load_recipe(rec(stages))
        L = model.config.text_config.num_hidden_layers
        n = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
        assert counts == [tokens_per_layer(recipe.stages(L), L, n_b) for n_b in n]
        for b in range(3):
            solo = model.generate(**take_sample(inputs, b), **gen_kwargs(model))
            assert h.stats.vision_tokens_per_layer[0] == counts[b]
            assert torch.equal(solo.sequences[0, -n_new:], batched.sequences[b, -n_new:])
            for x, y in zip(solo.scores, batched.scores):
                finite = torch.isfinite(x[0])
                assert (x[0][finite] - y[b][finite]).abs().max() < 1e-4


@pytest.mark.parametrize("method", list(RECIPES))
def test_keep_1_is_the_identity(method):
    model = tiny("llava")
    stages = [dict(s, keep=1.0) for s in RECIPES[method]]
    inputs = make_inputs(model, batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, **gen_kwargs(model))
        with tokencomp.apply(model, rec(stages)):
            got = model(**inputs).logits
            got_gen = model.generate(**inputs, **gen_kwargs(model))
    assert torch.equal(ref, got)
    assert torch.equal(ref_gen.sequences, got_gen.sequences)
    assert max_score_diff(ref_gen, got_gen) == 0


def test_shipped_recipes_carry_the_published_settings():
    for budget, keep in {192: 0.3334, 128: 0.2223, 64: 0.1112}.items():
        (stage,) = tokencomp.load_recipe(f"vispruner/llava-1.5-7b-{budget}").stages(32)
        assert stage.phase == "input" and stage.scorer.name == "cls_attention" and stage.keep == keep
        assert stage.selector.name == "vispruner" and stage.selector.important_ratio == 0.5
        assert tokens_per_layer([stage], 32, 576) == [budget] * 32
        (stage,) = tokencomp.load_recipe(f"tome/llava-1.5-7b-{budget}").stages(32)
        assert (stage.scorer.name, stage.scorer.r, stage.merger.name, stage.merger.r) == ("tome", 16, "tome", 16)
        assert tokens_per_layer([stage], 32, 576) == [budget] * 32
    for budget, (gt, it) in {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}.items():
        stages = tokencomp.load_recipe(f"mustdrop/llava-1.5-7b-{budget}").stages(32)
        assert [s.layer for s in stages] == [0, 3, 7, 11, 15]
        assert stages[0].scorer.name == "mustdrop_window" and stages[0].merger.name == "window"
        for s in stages[1:]:
            assert (s.scorer.name, s.scorer.global_thr, s.scorer.individual_thr, s.scorer.key_ratio) == ("mustdrop", gt, it, 0.08)
        assert sum(tokens_per_layer(stages, 32, 576)) == 32 * budget
