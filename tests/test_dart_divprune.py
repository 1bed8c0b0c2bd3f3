"""DART (scorer ``dart``) and DivPrune (selector ``divprune``).

* the math against hand-written reference loops written like the official code (pure functions on
  small random tensors, no model): DART's per-pivot picks, DivPrune's greedy with a brute-force
  argmax at every step;
* on tiny models: padded batches equal per-sample runs, exact budget counts, keep = 1 is the
  identity, and the shipped recipes load and run.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokencomp
from tokencomp.accounting import kept_count, tokens_per_layer
from tokencomp.interfaces import LayerView
from tokencomp.ranking import best_mask
from tokencomp.scorers.dart import DARTScorer, python_set_order
from tokencomp.selectors.divprune import DivPrune, maxmin_select
from tokencomp.testing import build_tiny, make_inputs, suppress_ids, take_sample, vision_token_ids

# --------------------------------------------------------------------------------------------------
# Views built by hand: one sample laid out as [prefix text | vision | suffix text], optionally
# left-padded inside a batch.
# --------------------------------------------------------------------------------------------------


def make_view(hidden_rows, n_prefix, n_vision, pads, keep=0.5, groups_per_sample=None, layer=2):
    """A LayerView for samples given as unpadded (L_b, D) hidden tensors, after ``pads[b]`` pad slots
    (the rest of the row is padding too)."""
    B = len(hidden_rows)
    S = max(h.shape[0] + p for h, p in zip(hidden_rows, pads))
    D = hidden_rows[0].shape[1]
    hidden = torch.zeros(B, S, D)
    vis = torch.zeros(B, S, dtype=torch.bool)
    txt = torch.zeros(B, S, dtype=torch.bool)
    tok = torch.full((B, S), -1, dtype=torch.long)
    groups = torch.full((B, S), -1, dtype=torch.long)
    last = torch.zeros(B, dtype=torch.long)
    for b, (h, p) in enumerate(zip(hidden_rows, pads)):
        L = h.shape[0]
        start = p
        hidden[b, start : start + L] = h
        tok[b, start : start + L] = torch.arange(L)
        vis[b, start + n_prefix[b] : start + n_prefix[b] + n_vision[b]] = True
        txt[b, start : start + L] = True
        txt[b] &= ~vis[b]
        if groups_per_sample is not None:
            g = torch.arange(n_vision[b]) * groups_per_sample // n_vision[b]
            groups[b, start + n_prefix[b] : start + n_prefix[b] + n_vision[b]] = g
        else:
            groups[b][vis[b]] = 0
        last[b] = start + L - 1
    return LayerView(
        layer=layer,
        hidden=hidden,
        vision_mask=vis,
        text_mask=txt,
        last_index=last,
        positions=torch.arange(S).expand(B, S),
        groups=groups,
        token_index=tok,
        keep=keep,
    )


def sample(seed, n_prefix=5, n_vision=60, n_suffix=9, D=16):
    g = torch.Generator().manual_seed(seed)
    # A few clusters of near-duplicates, as vision tokens are.
    centers = torch.randn(6, D, generator=g)
    vision = centers[torch.randint(0, 6, (n_vision,), generator=g)] + 0.3 * torch.randn(n_vision, D, generator=g)
    text = torch.randn(n_prefix + n_suffix, D, generator=g)
    return torch.cat([text[:n_prefix], vision, text[n_prefix:]])


# --------------------------------------------------------------------------------------------------
# DART
# --------------------------------------------------------------------------------------------------


def dart_reference(h, start, length, budget, pivot_image=4, pivot_text=4, keys=None):
    """The official get_retained_image_token on one unpadded sample (ZichenWen1/DART), written as a
    plain loop: pivots by the L1 norm of ``keys`` (default: of ``h``), cosines on ``h``."""
    n_piv = pivot_image + pivot_text
    topk = (budget - pivot_image) // n_piv
    norms = (h if keys is None else keys).abs().sum(-1)
    pivot_text = min(pivot_text, len(norms) - start - length)  # a short question has fewer text tokens
    img = (norms[start : start + length].topk(pivot_image).indices + start).tolist()
    qry = (norms[start + length :].topk(pivot_text).indices + start + length).tolist()
    chosen = set(img + qry)
    valid = set(range(start, start + length)) - set(img)
    for item in list(chosen):
        valid_list = list(valid)
        sims = [torch.nn.functional.cosine_similarity(h[item], h[j], dim=0).item() for j in valid_list]
        order = sorted(range(len(valid_list)), key=lambda i: sims[i])[:topk]
        picks = [valid_list[i] for i in order]
        chosen.update(picks)
        valid.difference_update(picks)
    chosen.difference_update(qry)
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quota", [1, 3, 5])
def test_dart_matches_official_loop(seed, quota):
    """With budget = 4 + 8 * quota (the official 4 + 8 * TOPK), the top-budget tokens of the scores
    are exactly the official selection."""
    h = sample(seed)
    n = 60
    budget = 4 + 8 * quota
    keep = (budget + 0.5) / n
    assert kept_count(n, keep) == budget
    view = make_view([h], [5], [n], [0], keep=keep)
    scores = DARTScorer().score(view)
    kept = best_mask(scores, view.vision_mask, torch.tensor([budget]))
    assert kept[0].nonzero()[:, 0].tolist() == dart_reference(h, 5, n, budget)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_dart_on_a_model_uses_the_official_features(family):
    """In a model, DART ranks pivots by the L1 norm of layer K-1's keys (as it caches them: k-norm,
    RoPE, KV heads concatenated) and takes cosines on layer K-1's output through the final norm:
    the kept set equals the official loop fed those, captured here with hooks on the model itself
    (and differs from the loop fed the raw residual stream: the features matter)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny(family)
    inputs = make_inputs(model, batch=1, text_lens=[(5, 9)])  # at least 4 text tokens after the image
    vis = torch.isin(inputs["input_ids"][0], torch.tensor(vision_token_ids(model)))
    where = vis.nonzero()[:, 0]
    start, n = int(where[0]), int(vis.sum())
    assert int(where[-1]) == start + n - 1  # one contiguous vision block
    budget = 4 + 8 * ((n - 4) // 16)
    keep = (budget + 0.5) / n
    layers = model.get_decoder().layers
    seen = {}

    def take_rotary(m, args, kwargs):
        seen["cos_sin"] = kwargs["position_embeddings"]

    def take_k(m, args, out):
        seen["k"] = out

    def take_h(m, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    hooks = [layers[1].register_forward_pre_hook(take_rotary, with_kwargs=True),
             layers[1].self_attn.k_proj.register_forward_hook(take_k),
             layers[2].register_forward_pre_hook(take_h, with_kwargs=True)]
    with torch.no_grad():
        model(**inputs)
    for x in hooks:
        x.remove()
    attn = layers[1].self_attn
    k = seen["k"].view(1, seen["k"].shape[1], -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    cos, sin = seen["cos_sin"]
    k = k.transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    keys = k.transpose(1, 2).reshape(1, k.shape[2], -1)[0]
    with torch.no_grad():
        z = model.get_decoder().norm(seen["h"])[0]
    want = dart_reference(z.float(), start, n, budget, keys=keys.float())
    raw = dart_reference(seen["h"][0].float(), start, n, budget)
    assert want != raw
    rec = {"scorer": "dart", "schedule": {"stages": [{"layer": 2, "keep": keep}]}}
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        model(**inputs)
    assert h.stats.kept_positions[2][0].tolist() == want


def test_dart_pivots_are_kept_and_max_mode():
    h = sample(7)
    view = make_view([h], [5], [60], [0], keep=0.25)
    norms = h.abs().sum(-1)
    pivots = (norms[5:65].topk(4).indices + 5).tolist()
    for assign in ("per_pivot", "max"):
        scores = DARTScorer(assign=assign).score(view)
        assert torch.isinf(scores[0, pivots]).all() and (scores[0, pivots] > 0).all()
        assert torch.isfinite(scores[0][view.vision_mask[0]]).sum() == 56
    # ``max``: minus the similarity to the closest of the 8 pivots.
    qry = (norms[65:].topk(4).indices + 65).tolist()
    unit = torch.nn.functional.normalize(h, dim=-1)
    scores = DARTScorer(assign="max").score(view)[0]
    for j in range(5, 65):
        if j not in pivots:
            want = -max((unit[j] @ unit[p]).item() for p in pivots + qry)
            assert abs(scores[j].item() - want) < 1e-5


def test_dart_remainder_goes_to_least_duplicated():
    """A budget that is not 4 + 8k: the quota picks come first, the rest by -max cos."""
    h = sample(3)
    view = make_view([h], [5], [60], [0], keep=(4 + 8 * 2 + 5 + 0.5) / 60)
    scores = DARTScorer().score(view)[0]
    official = set(dart_reference(h, 5, 60, 4 + 8 * 2))
    ranked = torch.sort(torch.where(view.vision_mask[0], scores, torch.tensor(-1e9)), descending=True, stable=True).indices
    assert set(ranked[:20].tolist()) == official
    rest = [j for j in ranked[20:25].tolist()]
    max_scores = DARTScorer(assign="max").score(view)[0]
    others = [j for j in range(5, 65) if j not in official]
    assert rest == sorted(others, key=lambda j: (-max_scores[j].item(), j))[:5]


def test_dart_padding_independent():
    rows = [sample(1), sample(2, n_prefix=3, n_suffix=6)]
    solo = [DARTScorer().score(make_view([r], [p], [60], [0], keep=0.3)) for r, p in zip(rows, (5, 3))]
    batch = make_view(rows, [5, 3], [60, 60], [4, 9], keep=0.3)  # padding on both sides
    scores = DARTScorer().score(batch)
    for b in range(2):
        got = scores[b][batch.vision_mask[b]]
        want = solo[b][0][make_view([rows[b]], [(5, 3)[b]], [60], [0]).vision_mask[0]]
        assert torch.equal(got, want)


def test_python_set_order():
    values = [300, 41, 77, 290, 650, 33, 612, 640]
    assert [values[i] for i in python_set_order(values)] == list(set(values))


# --------------------------------------------------------------------------------------------------
# DivPrune
# --------------------------------------------------------------------------------------------------


def divprune_reference(x, k):
    """The official greedy (vbdi/divprune, llava_arch.py DivPrune), in float64, with the argmax done
    by brute force over every token: returns the picks in order."""
    x = x.double()
    unit = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    N = x.shape[0]
    picks = []
    for step in range(k):
        best, best_j = -math.inf, None
        for j in range(N):
            if j in picks:
                continue
            if step == 0:
                value = min(dist[i, j].item() for i in range(N) if i != j)  # second smallest of the column
            else:
                value = min(dist[s, j].item() for s in picks)
            if value > best:  # strict: ties to the earlier token, as torch.argmax
                best, best_j = value, j
        picks.append(best_j)
    return picks


@pytest.mark.parametrize("seed", range(3))
def test_maxmin_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 30, 8, generator=g)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 24:] = False  # a shorter row
    k = torch.tensor([9, 7])
    picked = maxmin_select(x, valid, k, chunk=7)
    for r in range(2):
        n = int(valid[r].sum())
        want = divprune_reference(x[r, :n], int(k[r]))
        assert sorted(want) == picked[r].nonzero()[:, 0].tolist()
    # Capped at the row's size; zero picks nothing.
    assert maxmin_select(x, valid, torch.tensor([40, 0])).sum(1).tolist() == [30, 0]


def test_divprune_selector_padding_and_groups():
    rows = [sample(4, n_vision=40), sample(5, n_prefix=2, n_vision=40)]
    budget = torch.tensor([11, 11])
    batch = make_view(rows, [5, 2], [40, 40], [6, 1], keep=0.3, groups_per_sample=2)
    for sel in (DivPrune(), DivPrune(per_group=True)):
        kept = sel.select(None, batch, budget)
        assert kept.sum(1).tolist() == [11, 11]
        assert not (kept & ~batch.vision_mask).any()
        for b in range(2):
            solo = make_view([rows[b]], [(5, 2)[b]], [40], [0], keep=0.3, groups_per_sample=2)
            one = sel.select(None, solo, budget[:1])
            assert batch.token_index[b][kept[b]].tolist() == solo.token_index[0][one[0]].tolist()
    # Ungrouped: the official greedy over all the sample's vision tokens.
    kept = DivPrune().select(None, batch, budget)
    want = divprune_reference(rows[0][5:45], 11)
    assert sorted(batch.token_index[0][kept[0]].tolist()) == sorted(5 + j for j in want)
    # Per group: each half of the sample is diversified on its own, with a split budget.
    kept = DivPrune(per_group=True).select(None, batch, budget)
    halves = [batch.token_index[0][kept[0]] < 25, batch.token_index[0][kept[0]] >= 25]
    assert sorted(int(h.sum()) for h in halves) == [5, 6]


# --------------------------------------------------------------------------------------------------
# On tiny models
# --------------------------------------------------------------------------------------------------

_models: dict = {}


def tiny(family, layers=6):
    if (family, layers) not in _models:
        _models[family, layers] = build_tiny(family, layers=layers)
    return _models[family, layers]


def gen_kwargs(model):
    return dict(
        max_new_tokens=3,
        do_sample=False,
        suppress_tokens=suppress_ids(model) + [model.generation_config.eos_token_id],
        output_scores=True,
        return_dict_in_generate=True,
    )


DART = {"scorer": "dart", "schedule": {"stages": [{"layer": 2, "keep": 0.3}, {"layer": 4, "keep": 0.5}]}}
DIVPRUNE = {"scorer": "none", "selector": "divprune", "schedule": {"stages": [{"layer": 1, "keep": 0.3}]}}
DIVPRUNE_GROUPS = {
    "scorer": "none",
    "selector": {"name": "divprune", "per_group": True},
    "schedule": {"stages": [{"layer": 1, "keep": 0.3}]},
}
CASES = [
    ("llava", DART, {}),
    ("llava", DIVPRUNE, {}),
    ("qwen2_vl", DART, dict(image_sizes=[(112, 224), (56, 112), (112, 112)])),
    ("qwen2_vl", DIVPRUNE, dict(image_sizes=[(112, 224), (56, 112), (112, 112)])),
    ("llava", DIVPRUNE_GROUPS, dict(n_images=2)),
]


@pytest.mark.parametrize("family,rec,kw", CASES, ids=[f"{f}-{r['selector'] if 'selector' in r else r['scorer']}" for f, r, _ in CASES])
def test_batch_equals_single(family, rec, kw):
    model = tiny(family)
    inputs = make_inputs(model, batch=len(kw.get("image_sizes", [0, 0, 0])), padding="left", **kw)
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        batched = model.generate(**inputs, **gen_kwargs(model))
        counts = h.stats.vision_tokens_per_layer
        kept = {k: [t.clone() for t in v] for k, v in h.stats.kept_positions.items()}
        n_new = batched.sequences.shape[1] - inputs["input_ids"].shape[1]
        for b in range(inputs["input_ids"].shape[0]):
            one = take_sample(inputs, b)
            solo = model.generate(**one, **gen_kwargs(model))
            assert h.stats.vision_tokens_per_layer[0] == counts[b]
            pad = int((inputs["attention_mask"][b] == 0).sum())
            for layer, rows in kept.items():
                assert (rows[b] - pad).tolist() == h.stats.kept_positions[layer][0].tolist()
            assert torch.equal(solo.sequences[0, -n_new:], batched.sequences[b, -n_new:])
            for x, y in zip(solo.scores, batched.scores):
                finite = torch.isfinite(x[0])
                assert (x[0][finite] - y[b][finite]).abs().max() < 1e-4


@pytest.mark.parametrize("rec", [DART, DIVPRUNE, DIVPRUNE_GROUPS], ids=["dart", "divprune", "divprune-groups"])
@pytest.mark.parametrize("keeps", [(0.3, 0.5), (0.77, 0.0), (0.05, 1.0)])
def test_exact_budget_counts(rec, keeps):
    model = tiny("llava")
    layers = (2, 4) if rec is DART else (1, 3)
    stages = [{"layer": layer, "keep": k} for layer, k in zip(layers, keeps)]
    rec = dict(rec, schedule={"stages": stages})
    inputs = make_inputs(model, batch=2, n_images=2 if rec is DIVPRUNE_GROUPS else 1)
    n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        model(**inputs)
        parsed = tokencomp.load_recipe(rec).stages(6)
        assert h.stats.vision_tokens_per_layer == [tokens_per_layer(parsed, 6, n)] * 2


@pytest.mark.parametrize("rec", [DART, DIVPRUNE, DIVPRUNE_GROUPS], ids=["dart", "divprune", "divprune-groups"])
def test_keep_one_is_identity(rec):
    model = tiny("llava")
    stages = [{"layer": s["layer"], "keep": 1.0} for s in rec["schedule"]["stages"]]
    inputs = make_inputs(model, batch=2, n_images=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokencomp.apply(model, dict(rec, schedule={"stages": stages})) as h:
            got = model(**inputs).logits
            assert all(row == [row[0]] * 6 for row in h.stats.vision_tokens_per_layer)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_dart_recipes(budget):
    """The official counts (4 + 8 * max_num_trunction // 8 vision tokens from layer 2 on) and a run."""
    recipe = tokencomp.load_recipe(f"dart/llava-1.5-7b-{budget}")
    stages = recipe.stages(32)
    assert [(s.layer, s.scorer.name, s.selector.name) for s in stages] == [(2, "dart", "topk")]
    assert tokens_per_layer(stages, 32, 576)[2] == 4 + 8 * (budget // 8)
    assert stages[0].scorer == DARTScorer()  # official defaults: 4 + 4 pivots, L1 norm, per-pivot quotas
    model = tiny("llava", 4)
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), tokencomp.apply(model, recipe) as h:
        out = model(**inputs)
        assert torch.isfinite(out.logits).all()
        assert h.stats.vision_tokens_per_layer == [tokens_per_layer(stages, 4, 64)] * 2
        model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=suppress_ids(model))


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_divprune_recipes(budget):
    """A single input stage (before layer 0) that keeps ``budget`` of 576, run on a tiny LLaVA."""
    recipe = tokencomp.load_recipe(f"divprune/llava-1.5-7b-{budget}")
    stages = recipe.stages(32)
    assert [(s.layer, s.selector.name) for s in stages] == [(0, "divprune")]
    assert tokens_per_layer(stages, 32, 576) == [budget] * 32
    model = tiny("llava", 4)
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), tokencomp.apply(model, recipe) as h:
        assert torch.isfinite(model(**inputs).logits).all()
        assert h.stats.vision_tokens_per_layer == [tokens_per_layer(stages, 4, 64)] * 2


def test_divprune_input_stage_is_official_greedy():
    """In an input stage the selector sees the input embeddings: the kept tokens are the official greedy's
    picks on the spliced image features, and a padded batch selects like each sample alone."""
    model = tiny("llava")
    rec = {"scorer": "none", "selector": "divprune", "schedule": {"stages": [{"phase": "input", "keep": 0.25}]}}
    inputs = make_inputs(model, batch=2)
    captured = {}
    lm = model.get_decoder()

    def grab(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    hook = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        model(**inputs)
        kept = h.stats.kept_positions[0]
    vis = inputs["input_ids"] == model.config.image_token_id
    for b in range(2):
        pos = vis[b].nonzero()[:, 0]
        want = divprune_reference(captured["h"][b, pos], kept_count(len(pos), 0.25))
        assert kept[b].tolist() == sorted(pos[want].tolist())
