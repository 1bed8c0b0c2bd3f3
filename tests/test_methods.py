"""The methods: V²Drop math, attention probes against eager attention, attention scorers, baselines,
selectors, the budget solver and depth scaling, swapping and combining scorers in recipes.

Reference values come from ../shared/reference/methods.md (V²Drop paper App. A, FastV, PDrop,
SparseVLM). Everything runs on tiny random-weight models (``tokencomp.testing``) on CPU.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokencomp
import tokencomp.prefill
from tokencomp import plugins
from tokencomp.accounting import average_tokens, tokens_per_layer
from tokencomp.interfaces import LayerView, Scorer, Stage
from tokencomp.schedules.budget import BudgetSchedule, solve_keep
from tokencomp.schedules.depth_scaled import V2DropSchedule, scale_layers
from tokencomp.scorers.baselines import NoneScorer, RandomScorer, UniformScorer
from tokencomp.scorers.sparsevlm import SparseVLMScorer
from tokencomp.scorers.v2drop import V2DropScorer
from tokencomp.selectors.quota import PerGroupQuota, split_budget
from tokencomp.selectors.topk import TopK
from tokencomp.testing import build_tiny, make_inputs, suppress_ids

PROBE_TOL = 1e-5


_MODELS: dict = {}


def tiny(family: str, layers: int = 6, attn: str = "sdpa", seed: int = 1):
    key = (family, layers, attn, seed)
    if key not in _MODELS:
        _MODELS[key] = build_tiny(family, layers=layers, attn=attn, seed=seed)
    return _MODELS[key]


def vision_ids(model) -> torch.Tensor:
    cfg = model.config
    return torch.tensor([cfg.image_token_id] + [v for v in [getattr(cfg, "video_token_id", None)] if v is not None])


def make_view(hidden, *, vision=None, text=None, groups=None, prev=None, embeddings=None, attention=None, last=None, layer=3):
    """A LayerView over ``hidden`` (B, S, D) with sensible defaults: every token a vision token."""
    B, S = hidden.shape[:2]
    vision = torch.ones(B, S, dtype=torch.bool) if vision is None else vision
    text = ~vision if text is None else text
    if groups is None:
        groups = torch.where(vision, torch.zeros(B, S, dtype=torch.long), torch.full((B, S), -1))
    if last is None:
        last = torch.full((B,), S - 1)
    return LayerView(
        layer=layer,
        hidden=hidden,
        vision_mask=vision,
        text_mask=text,
        last_index=last,
        positions=torch.arange(S).expand(B, S),
        groups=groups,
        token_index=torch.arange(S).expand(B, S),
        prev_hidden=prev,
        embeddings=embeddings,
        attention=attention,
    )


def kept_sets(handle, layer) -> list[list[int]]:
    return [t.tolist() for t in handle.stats.kept_positions[layer]]


def topk_positions(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> list[int]:
    """Sorted positions of the k highest scores among candidates (1-D)."""
    pos = candidates.nonzero().flatten()
    return sorted(pos[torch.topk(scores[pos], k).indices].tolist())


# --------------------------------------------------------------------------------------------------
# V²Drop scorer math
# --------------------------------------------------------------------------------------------------

# Three tokens, D = 2, hand-computed:
#   token 0: h = (3, 4), prev = (3, 0)  -> delta (0, 4):  l2 4,       l1 4, 1 - cos = 1 - 9/15 = 0.4
#   token 1: h = (1, 2), prev = (1, 0)  -> delta (0, 2):  l2 2,       l1 2, 1 - cos = 1 - 1/sqrt(5)
#   token 2: h = (0, 5), prev = (-1, 1) -> delta (1, 4):  l2 sqrt(17), l1 5, 1 - cos = 1 - 1/sqrt(2)
H = torch.tensor([[[3.0, 4.0], [1.0, 2.0], [0.0, 5.0]]])
PREV = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [-1.0, 1.0]]])
EXPECTED_V2DROP = {
    "l2": [4.0, 2.0, math.sqrt(17.0)],
    "l1": [4.0, 2.0, 5.0],
    "cosine": [0.4, 1 - 1 / math.sqrt(5.0), 1 - 1 / math.sqrt(2.0)],
}
EXPECTED_TOP2 = {"l2": [0, 2], "l1": [0, 2], "cosine": [0, 1]}


@pytest.mark.parametrize("metric", ["l2", "l1", "cosine"])
def test_v2drop_scores_match_hand_computed_values(metric):
    # A batch of two: the second sample is the first scaled by 2 (norms double, cosine unchanged).
    hidden, prev = torch.cat([H, 2 * H]), torch.cat([PREV, 2 * PREV])
    h0, p0 = hidden.clone(), prev.clone()
    view = make_view(hidden, prev=prev)
    scores = V2DropScorer(metric=metric).score(view)
    want = torch.tensor(EXPECTED_V2DROP[metric])
    factor = 1.0 if metric == "cosine" else 2.0
    torch.testing.assert_close(scores, torch.stack([want, factor * want]), rtol=1e-6, atol=1e-6)
    assert torch.equal(hidden, h0) and torch.equal(prev, p0), "scorers must not modify the view"
    kept = TopK().select(scores, view, torch.tensor([2, 2]))
    assert kept[0].nonzero().flatten().tolist() == EXPECTED_TOP2[metric]


def test_v2drop_default_metric_is_l2_and_stays_in_model_dtype():
    assert V2DropScorer().metric == "l2"
    view = make_view(H.to(torch.bfloat16), prev=PREV.to(torch.bfloat16))
    scores = V2DropScorer().score(view)
    assert scores.dtype == torch.bfloat16
    torch.testing.assert_close(scores.float(), torch.tensor([EXPECTED_V2DROP["l2"]]), rtol=1e-2, atol=1e-2)
    with pytest.raises(tokencomp.RecipeError):
        tokencomp.load_recipe({"scorer": {"name": "v2drop", "metric": "l3"}, "schedule": {"stages": [{"layer": 3, "keep": 0.5}]}})


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_v2drop_keeps_the_tokens_that_varied_most_across_the_previous_layer(family):
    """End to end: kept = top-k of ‖h(3) − h(2)‖ from the untouched model's hidden states."""
    model = tiny(family)
    sizes = [(112, 224), (224, 224)] if family == "qwen2_vl" else None
    inputs = make_inputs(model, batch=2, padding="left", image_sizes=sizes)
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
    with tokencomp.apply(model, {"scorer": "v2drop", "schedule": {"stages": [{"layer": 3, "keep": 0.5}]}}) as h:
        with torch.no_grad():
            model(**inputs)
        kept = kept_sets(h, 3)
    vision = torch.isin(inputs["input_ids"], vision_ids(model))
    for b in range(2):
        score = torch.linalg.vector_norm(hs[3][b] - hs[2][b], dim=-1)
        n = int(vision[b].sum())
        assert kept[b] == topk_positions(score, vision[b], n // 2)


# --------------------------------------------------------------------------------------------------
# Attention probes == rows of eager output_attentions
# --------------------------------------------------------------------------------------------------

RECORDED: list = []


@dataclass(frozen=True)
class _RecordPrevious(Scorer):
    """Test scorer: records the attention rows the engine computed for it (source "previous")."""

    name = "test_record_previous"
    attention = "previous"

    def queries(self, view):
        last = view.last_index
        first_vision = view.vision_mask.float().argmax(1)
        q = torch.stack([last, last - 2, first_vision, torch.full_like(last, -1)], dim=1)
        RECORDED.append(("queries", view.layer, q.clone()))
        return q

    def score(self, view):
        RECORDED.append(("attention", view.layer, view.attention.clone()))
        return torch.zeros(view.vision_mask.shape)


@dataclass(frozen=True)
class _RecordCurrent(_RecordPrevious):
    """Test scorer: records the attention rows the engine computed for it (source "current")."""

    name = "test_record_current"
    attention = "current"


def register_test_scorers(in_process_plugin, name: str, *classes) -> None:
    """Register scorer classes as one in-process plugin named ``name`` for this test."""
    plugin = types.SimpleNamespace()

    @tokencomp.hookimpl
    def register_scorers(register):
        for cls in classes:
            register(cls)

    plugin.register_scorers = register_scorers
    in_process_plugin(plugin, name)


@pytest.fixture
def recorders(in_process_plugin):
    register_test_scorers(in_process_plugin, "test-methods-recorders", _RecordPrevious, _RecordCurrent)
    RECORDED.clear()
    try:
        yield
    finally:
        RECORDED.clear()


def _recorded(kind):
    return [r for r in RECORDED if r[0] == kind]


def _probe_error(attention, queries, eager_layer_attn) -> float:
    """Max |probe row − head-mean eager row|; padding queries must give all-zero rows."""
    ref = eager_layer_attn.float().mean(1)  # (B, S, S)
    assert attention.shape == (ref.shape[0], queries.shape[1], ref.shape[2])
    err = 0.0
    for b in range(queries.shape[0]):
        for j, q in enumerate(queries[b].tolist()):
            if q < 0:
                assert torch.count_nonzero(attention[b, j]) == 0
            else:
                err = max(err, float((attention[b, j] - ref[b, q]).abs().max()))
    return err


PROBE_FAMILIES = ["llava", "qwen2_vl", "qwen3_vl"]


@pytest.mark.parametrize("source", ["previous", "current"])
@pytest.mark.parametrize("family", PROBE_FAMILIES)
def test_probe_rows_equal_eager_attention_on_the_full_sequence(recorders, family, source):
    """Probe at layer 3 (keep 1.0): rows equal eager ``output_attentions`` of layer 2 ("previous",
    FastV's layer K−1) or layer 3 ("current", PDrop's first layer of the new stage)."""
    sdpa, eager = tiny(family, attn="sdpa"), tiny(family, attn="eager")
    inputs = make_inputs(sdpa, batch=2, padding="left")
    assert bool((inputs["attention_mask"] == 0).any()), "the batch must be left-padded"
    recipe = {"scorer": f"test_record_{source}", "schedule": {"stages": [{"layer": 3, "keep": 1.0}]}}
    with tokencomp.apply(sdpa, recipe), torch.no_grad():
        sdpa(**inputs)
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True).attentions
    (_, qlayer, queries), = _recorded("queries")
    (_, _, attention), = _recorded("attention")
    assert qlayer == (2 if source == "previous" else 3)
    err = _probe_error(attention, queries, ref[qlayer])
    print(f"probe {family}/{source}: max abs error {err:.2e}")
    assert err <= PROBE_TOL, err


@dataclass(frozen=True)
class _RecordUnrotated(_RecordPrevious):
    """Test scorer: PruneVid's rows (un-rotated q/k, every key, max over heads)."""

    name = "test_record_unrotated"
    attention_rows = types.MappingProxyType({"rope": False, "causal": False, "heads": "max"})


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_unrotated_unmasked_max_rows_equal_a_hand_computation(recorders, in_process_plugin, family):
    """``attention_rows = {rope: False, causal: False, heads: max}`` (PruneVid's stage 2): the rows are
    softmax(q·kᵀ·scale) of layer 2's own q/k projections (q/k norm, no RoPE) over every real key,
    the maximum over heads, computed here by hand from the layer's weights; and they differ from
    the default rows (negative control)."""
    register_test_scorers(in_process_plugin, "test-methods-unrotated", _RecordUnrotated)
    model = tiny(family)
    inputs = make_inputs(model, batch=2, padding="left")
    recipe = {"scorer": "test_record_unrotated", "schedule": {"stages": [{"layer": 3, "keep": 1.0}]}}
    with tokencomp.apply(model, recipe), torch.no_grad():
        model(**inputs)
    seen = []
    # The input layer 2 really gets (Qwen3-VL adds deepstack features after the early layers).
    hook = model.get_decoder().layers[2].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    hidden = seen[0]
    (_, _, queries), = _recorded("queries")
    (_, _, attention), = _recorded("attention")
    attn = model.get_decoder().layers[2].self_attn
    x = model.get_decoder().layers[2].input_layernorm(hidden)
    B, S, _ = x.shape
    d = attn.head_dim
    q, k = attn.q_proj(x).view(B, S, -1, d), attn.k_proj(x).view(B, S, -1, d)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * attn.scaling
    logits = logits.masked_fill(inputs["attention_mask"][:, None, None, :] == 0, float("-inf"))
    ref = torch.softmax(logits, -1).amax(1)  # (B, S, S)
    err, diff = 0.0, 0.0
    for b in range(B):
        for j, row in enumerate(queries[b].tolist()):
            if row >= 0:
                err = max(err, float((attention[b, j] - ref[b, row]).abs().max()))
    assert err < 1e-5, err
    RECORDED.clear()
    with tokencomp.apply(model, {**recipe, "scorer": "test_record_previous"}), torch.no_grad():
        model(**inputs)
    (_, _, default), = _recorded("attention")
    assert float((default - attention).abs().max()) > 1e-3


@pytest.mark.parametrize("source", ["previous", "current"])
@pytest.mark.parametrize("family", PROBE_FAMILIES)
def test_probe_rows_equal_eager_attention_after_a_drop(recorders, family, source):
    """After a V²Drop stage at layer 2 (original positions kept, ragged batch for Qwen), the probe
    of the next stage equals the eager attention of the same compressed forward. For "previous" the
    probed layer is the drop layer itself (queries chosen right after its drop)."""
    sdpa, eager = tiny(family, attn="sdpa"), tiny(family, attn="eager")
    kwargs = dict(image_sizes=[(112, 224), (224, 224)], video=True) if family != "llava" else {}
    inputs = make_inputs(sdpa, batch=2, padding="left", **kwargs)
    rec_layer = 3 if source == "previous" else 4
    recipe = {
        "scorer": f"test_record_{source}",
        "schedule": {"stages": [{"layer": 2, "keep": 0.5, "scorer": "v2drop"}, {"layer": rec_layer, "keep": 1.0}]},
    }
    with tokencomp.apply(eager, recipe) as h, torch.no_grad():
        ref = eager(**inputs, output_attentions=True).attentions
        kept_eager = kept_sets(h, 2)
    RECORDED.clear()
    with tokencomp.apply(sdpa, recipe) as h, torch.no_grad():
        sdpa(**inputs)
        counts = [row[2] for row in h.stats.vision_tokens_per_layer]
        assert kept_sets(h, 2) == kept_eager
    if family != "llava":
        assert counts[0] != counts[1], "Qwen inputs should give a ragged batch (filler slots after the drop)"
    (_, qlayer, queries), = _recorded("queries")
    (_, _, attention), = _recorded("attention")
    assert qlayer == (rec_layer - 1 if source == "previous" else rec_layer)
    assert ref[qlayer].shape[-1] < inputs["input_ids"].shape[1], "the probed layer must see the compacted sequence"
    err = _probe_error(attention, queries, ref[qlayer])
    print(f"probe {family}/{source}: max abs error {err:.2e}")
    assert err <= PROBE_TOL, err


# --------------------------------------------------------------------------------------------------
# Attention scorers pick what attention ranks highest
# --------------------------------------------------------------------------------------------------


def _eager_reference(family):
    model, eager = tiny(family), tiny(family, attn="eager")
    sizes = [(112, 224), (224, 224)] if family != "llava" else None
    # A longer question than the default, so that SparseVLM has several raters.
    inputs = make_inputs(model, batch=2, padding="left", image_sizes=sizes, text_lens=[(4, 12), (6, 9)])
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, output_hidden_states=True)
    vision = torch.isin(inputs["input_ids"], vision_ids(model))
    last = torch.full((2,), inputs["input_ids"].shape[1] - 1)  # left padding: the last column is real
    return model, inputs, out, vision, last


def _run_kept(model, inputs, scorer, layer, keep=0.5):
    with tokencomp.apply(model, {"scorer": scorer, "schedule": {"stages": [{"layer": layer, "keep": keep}]}}) as h:
        with torch.no_grad():
            model(**inputs)
        return kept_sets(h, layer)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fastv_keeps_what_the_last_token_attended_to_at_the_previous_layer(family):
    model, inputs, ref, vision, last = _eager_reference(family)
    kept = _run_kept(model, inputs, "fastv", 3)
    for b in range(2):
        score = ref.attentions[2][b].mean(0)[last[b]]
        assert kept[b] == topk_positions(score, vision[b], int(vision[b].sum()) // 2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pdrop_keeps_what_the_last_token_attends_to_at_the_drop_layer(family):
    model, inputs, ref, vision, last = _eager_reference(family)
    kept = _run_kept(model, inputs, "pdrop", 3)
    for b in range(2):
        score = ref.attentions[3][b].mean(0)[last[b]]
        assert kept[b] == topk_positions(score, vision[b], int(vision[b].sum()) // 2)
    # and that is not FastV's choice (a different layer's attention)
    assert kept != _run_kept(model, inputs, "fastv", 3)


def _reference_raters(emb, vision, text):
    """SparseVLM raters, written from methods.md §4.2: text after the image whose mean (over vision
    tokens) softmax-over-text similarity is above the mean; the last token if none."""
    first = int(vision.nonzero()[0])
    txt = (text & (torch.arange(len(text)) > first)).nonzero().flatten()
    m = torch.softmax(emb[vision].double() @ emb[txt].double().T, dim=-1).mean(0)
    raters = txt[m > m.mean()]
    return raters if len(raters) else text.nonzero().flatten()[-1:]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sparsevlm_keeps_what_its_text_raters_attend_to(family):
    model, inputs, ref, vision, last = _eager_reference(family)
    kept = _run_kept(model, inputs, "sparsevlm", 3)
    valid = inputs["attention_mask"].bool()
    for b in range(2):
        raters = _reference_raters(ref.hidden_states[0][b], vision[b], valid[b] & ~vision[b])
        assert len(raters) >= 2, "the test needs several raters"
        score = ref.attentions[2][b].mean(0)[raters].mean(0)
        assert kept[b] == topk_positions(score, vision[b], int(vision[b].sum()) // 2)


def test_sparsevlm_raters_are_text_tokens_after_the_image_and_fall_back_to_the_last_token():
    # Sample 0: [sys, sys, vis, vis, vis, t5, t6, t7]: t5 and t6 align with the image, t7 does not;
    # the system tokens align best of all but precede the image. Sample 1: [pad, pad, sys, vis x 4,
    # t7]: a single text token after the image is never above the mean: no rater, fall back to it.
    D = 4
    e_vis = torch.tensor([1.0, 0, 0, 0])
    emb = torch.zeros(2, 8, D)
    vision = torch.zeros(2, 8, dtype=torch.bool)
    text = torch.zeros(2, 8, dtype=torch.bool)
    # sample 0
    emb[0, 0] = emb[0, 1] = 9 * e_vis
    emb[0, 2:5] = e_vis
    emb[0, 5] = 2.2 * e_vis  # softmax over (2.2, 2, 0): 0.52, 0.42, 0.06 > mean 1/3 for t5, t6
    emb[0, 6] = 2 * e_vis
    emb[0, 7] = torch.tensor([0, 1.0, 0, 0])
    vision[0, 2:5] = True
    text[0, [0, 1, 5, 6, 7]] = True
    # sample 1: left padding (pads look like the image but are not text), one text token after it
    emb[1, 0:2] = 9 * e_vis
    emb[1, 2] = 5 * e_vis
    emb[1, 3:7] = e_vis
    emb[1, 7] = torch.tensor([0, 0, 1.0, 0])
    vision[1, 3:7] = True
    text[1, [2, 7]] = True
    view = make_view(torch.zeros(2, 8, D), vision=vision, text=text, embeddings=emb, last=torch.tensor([7, 7]))
    q = SparseVLMScorer().queries(view)
    assert sorted(q[0].tolist()) == [5, 6]
    assert q[1].tolist() == [7, -1]
    assert SparseVLMScorer(max_raters=1).queries(view).tolist() == [[5], [7]]
    # the score averages only real rater rows (padded -1 rows are zero and ignored)
    att = torch.zeros(2, 2, 8)
    att[0, 0, 2], att[0, 1, 3] = 1.0, 0.5
    att[1, 0, 4] = 0.8
    s = SparseVLMScorer().score(make_view(torch.zeros(2, 8, D), vision=vision, attention=att))
    assert s[0, 2] == pytest.approx(0.5) and s[0, 3] == pytest.approx(0.25) and s[1, 4] == pytest.approx(0.8)


def test_sparsevlm_raters_are_chosen_against_all_the_prompts_vision_tokens():
    """At a later stage (vision tokens already dropped) the raters are those the whole prompt gives,
    as the official code picks them once from all the image embeddings: the view's prompt fields,
    mapped to the current sequence. Negative control: the same tokens judged against the surviving
    vision tokens only pick other raters."""
    import dataclasses

    g = torch.Generator().manual_seed(0)
    B, V, T, D = 1, 40, 12, 6
    S = 2 + V + T
    emb = torch.randn(B, S, D, generator=g)
    vision = torch.zeros(B, S, dtype=torch.bool)
    vision[:, 2 : 2 + V] = True
    full = make_view(emb, vision=vision, embeddings=emb, last=torch.tensor([S - 1]))
    want = set(SparseVLMScorer().queries(full)[0].tolist()) - {-1}
    # A stage dropped the 30 vision tokens most like the first text tokens: the survivors differ.
    alike = (emb[0, 2 : 2 + V] @ emb[0, 2 + V :].T)[:, :6].sum(1)
    survivors = 2 + torch.sort(torch.topk(-alike, 10).indices).values
    keep = torch.cat([torch.arange(2), survivors, torch.arange(2 + V, S)])[None]
    cur = dataclasses.replace(
        make_view(emb[:, keep[0]], vision=vision[:, keep[0]], embeddings=emb[:, keep[0]], last=torch.tensor([keep.shape[1] - 1])),
        positions=keep, prompt_embeddings=emb, prompt_vision_mask=vision)
    got = {int(keep[0, i]) for i in SparseVLMScorer().queries(cur)[0].tolist() if i >= 0}
    assert got == want
    alone = {int(keep[0, i]) for i in SparseVLMScorer().queries(dataclasses.replace(cur, prompt_embeddings=None))[0].tolist() if i >= 0}
    assert alone != want


def test_attention_scorers_never_materialise_an_attention_matrix(monkeypatch):
    """FastV / PDrop / SparseVLM on a long prompt (B = 1, S ≈ 1050): inside the decoder, no tensor of
    S²/4 elements or more is ever created (one head's S×S attention matrix would be S²), every
    attention module keeps running on SDPA and returns no attention weights, and the probe computed
    only the rows asked for. The plain forward is checked the same way first, so that a change in
    transformers (e.g. an explicit S×S mask) is not mistaken for a scorer's fault."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny("llava")
    inputs = make_inputs(model, batch=1, n_images=16)
    S = inputs["input_ids"].shape[1]
    assert S > 1000
    decoder = model.get_decoder()

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.on, self.largest = False, (0, None, None)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if self.on:
                for o in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(o, torch.Tensor) and o.numel() > self.largest[0]:
                        self.largest = (o.numel(), str(func), tuple(o.shape))
            return out

    probe_shapes, attn_outputs = [], []
    real_rows = tokencomp.prefill.attention_rows

    def rows(*args, **kwargs):
        out = real_rows(*args, **kwargs)
        probe_shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(tokencomp.prefill, "attention_rows", rows)

    def on_attn(module, args, output):
        attn_outputs.append((module.config._attn_implementation, output[1]))

    for scorer in [None, "fastv", "pdrop", "sparsevlm"]:  # None: the plain forward, for reference
        probe_shapes.clear()
        attn_outputs.clear()
        mode = Largest()
        hooks = [layer.self_attn.register_forward_hook(on_attn) for layer in decoder.layers]
        hooks.append(decoder.register_forward_pre_hook(lambda *a: setattr(mode, "on", True)))
        hooks.append(decoder.register_forward_hook(lambda *a: setattr(mode, "on", False)))
        try:
            if scorer is None:
                with torch.no_grad(), mode:
                    model(**inputs)
            else:
                with tokencomp.apply(model, {"scorer": scorer, "schedule": {"stages": [{"layer": 2, "keep": 0.5}]}}) as h:
                    with torch.no_grad(), mode:
                        model(**inputs)
                    assert h.stats.vision_tokens_per_layer[0][2] == 512  # the drop happened
        finally:
            for hook in hooks:
                hook.remove()
        numel, func, shape = mode.largest
        assert numel < S * S // 4, f"{scorer}: {func} made a {shape} tensor in a sequence of {S}"
        assert len(attn_outputs) == len(decoder.layers)
        assert all(impl == "sdpa" and weights is None for impl, weights in attn_outputs), scorer
        if scorer is None:
            continue
        assert len(probe_shapes) == 1 and probe_shapes[0][0] == 1 and probe_shapes[0][2] == S
        n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
        assert probe_shapes[0][1] <= (1 if scorer != "sparsevlm" else n_text)  # one row per rater at most


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


def test_random_is_seeded():
    model = tiny("llava")
    inputs = make_inputs(model, batch=2, padding="left")

    def kept(seed):
        return _run_kept(model, inputs, {"name": "random", "seed": seed}, 3, keep=0.25)

    assert kept(7) == kept(7)
    assert kept(7) != kept(8)
    # and the scores themselves: same seed and layer, same draw; another layer draws differently
    view = make_view(torch.zeros(1, 50, 4))
    assert torch.equal(RandomScorer(seed=3).score(view), RandomScorer(seed=3).score(view))
    assert not torch.equal(RandomScorer(seed=3).score(view), RandomScorer(seed=4).score(view))
    assert not torch.equal(RandomScorer(seed=3).score(view), RandomScorer(seed=3).score(make_view(torch.zeros(1, 50, 4), layer=4)))


@pytest.mark.parametrize("n,k", [(64, 8), (64, 16), (64, 5), (576, 288), (576, 172), (576, 28), (100, 7)])
def test_uniform_spreads_kept_tokens_over_each_image(n, k):
    # Two images of n tokens each, separated by text; keep k per image.
    S = 2 * n + 3
    vision = torch.zeros(1, S, dtype=torch.bool)
    vision[0, 1 : n + 1] = True
    vision[0, n + 2 : 2 * n + 2] = True
    groups = torch.full((1, S), -1)
    groups[0, 1 : n + 1] = 0
    groups[0, n + 2 : 2 * n + 2] = 1
    view = make_view(torch.zeros(1, S, 4), vision=vision, groups=groups)
    kept = TopK().select(UniformScorer().score(view), view, torch.tensor([2 * k]))[0]
    for start in (1, n + 2):
        pos = (kept[start : start + n].nonzero().flatten()).tolist()
        assert len(pos) == k, "each image keeps its share"
        gaps = [b - a for a, b in zip([-1] + pos, pos + [n])]
        assert max(gaps) <= 2 * math.ceil(n / k), (pos, gaps)


def test_none_keeps_the_earliest_tokens():
    model = tiny("llava")
    inputs = make_inputs(model, batch=2, padding="left")
    kept = _run_kept(model, inputs, "none", 3, keep=0.25)
    vision = torch.isin(inputs["input_ids"], vision_ids(model))
    for b in range(2):
        pos = vision[b].nonzero().flatten().tolist()
        assert kept[b] == pos[: len(pos) // 4]
    view = make_view(torch.zeros(1, 10, 4))
    assert TopK().select(NoneScorer().score(view), view, torch.tensor([3]))[0].nonzero().flatten().tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------------


def test_topk_keeps_the_highest_scores_and_min_keep():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.8]])
    vision = torch.tensor([[False, True, True, True, True, True]])
    view = make_view(torch.zeros(1, 6, 2), vision=vision)
    assert TopK().select(scores, view, torch.tensor([2]))[0].nonzero().flatten().tolist() == [1, 5]
    assert not TopK().select(scores, view, torch.tensor([0])).any()
    assert TopK(min_keep=1).select(scores, view, torch.tensor([0]))[0].nonzero().flatten().tolist() == [1]
    assert TopK(min_keep=1).select(scores, view, torch.tensor([3])).sum() == 3
    assert TopK().select(scores, view, torch.tensor([99]))[0].tolist() == vision[0].tolist()
    # ties go to the earlier token
    tied = torch.zeros(1, 6)
    assert TopK().select(tied, view, torch.tensor([2]))[0].nonzero().flatten().tolist() == [1, 2]


def test_min_keep_one_reproduces_the_official_code_end_to_end():
    model = tiny("llava", layers=32)
    inputs = make_inputs(model, batch=2, padding="left")
    with tokencomp.apply(model, "v2drop/llava-1.5-7b-official") as h, torch.no_grad():
        model(**inputs)
        counts = h.stats.vision_tokens_per_layer
    assert counts[0][21] == 16 and counts[0][22] == 1 and counts[0][31] == 1  # 64 -> 32 -> 16 -> max(1, 0)
    with tokencomp.apply(model, "v2drop/llava-1.5-7b-192") as h, torch.no_grad():
        model(**inputs)
        assert h.stats.vision_tokens_per_layer[0][22] == 0


def _two_images(n0: int, n1: int):
    S = n0 + n1 + 1
    vision = torch.ones(1, S, dtype=torch.bool)
    vision[0, n0] = False
    groups = torch.full((1, S), -1)
    groups[0, :n0], groups[0, n0 + 1 :] = 0, 1
    # image 0 is far more "important" than image 1
    scores = torch.where(groups == 0, 10.0 + torch.rand(1, S), torch.rand(1, S))
    return make_view(torch.zeros(1, S, 2), vision=vision, groups=groups), scores, groups


@pytest.mark.parametrize("n0,n1,budget,want", [(8, 8, 4, (2, 2)), (12, 4, 4, (3, 1)), (30, 2, 4, (3, 1)), (8, 8, 1, (1, 0))])
def test_quota_keeps_every_image_that_topk_would_empty(n0, n1, budget, want):
    view, scores, groups = _two_images(n0, n1)
    topk = TopK().select(scores, view, torch.tensor([budget]))
    assert not (topk & (groups == 1)).any(), "top-k empties the low-scoring image"
    kept = PerGroupQuota().select(scores, view, torch.tensor([budget]))
    assert int(kept.sum()) == budget
    assert (int((kept & (groups == 0)).sum()), int((kept & (groups == 1)).sum())) == want
    # inside each image the quota keeps that image's best tokens
    for g, k in enumerate(want):
        member = (groups == g)[0]
        assert kept[0].nonzero().flatten()[member[kept[0]]].tolist() == topk_positions(scores[0], member, k)


def test_split_budget_examples():
    counts = torch.tensor([[10, 0, 5, 1], [3, 3, 3, 3]])
    alloc = split_budget(counts, torch.tensor([6, 2]), 1)
    assert alloc.sum(1).tolist() == [6, 2]
    assert alloc[0, 1] == 0 and alloc[0, 3] == 1 and (alloc[0] >= 1).sum() == 3
    assert split_budget(torch.tensor([[4, 4]]), torch.tensor([100]), 1).tolist() == [[4, 4]]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    frac=st.floats(0, 1),
    min_per_group=st.integers(0, 3),
)
def test_split_budget_sums_to_the_budget_and_respects_counts(counts, frac, min_per_group):
    c = torch.tensor([counts])
    budget = int(frac * sum(counts))
    alloc = split_budget(c, torch.tensor([budget]), min_per_group)[0]
    assert int(alloc.sum()) == budget
    assert bool((alloc >= 0).all()) and bool((alloc <= c[0]).all())
    nonempty = [i for i, n in enumerate(counts) if n > 0]
    guaranteed = sum(min(min_per_group, counts[i]) for i in nonempty)
    if guaranteed <= budget:
        assert all(int(alloc[i]) >= min(min_per_group, counts[i]) for i in nonempty)


# --------------------------------------------------------------------------------------------------
# Budget solver and depth scaling
# --------------------------------------------------------------------------------------------------


def _stages(layers, keeps):
    return [Stage(layer, k) for layer, k in zip(layers, keeps)]


@pytest.mark.parametrize(
    "keeps,min_keep,average",
    [
        ((0.5, 0.3, 0.0), 0, 193.4375),  # paper 192
        ((0.28, 0.25, 0.0), 0, 130.6875),  # paper 128
        ((0.05, 0.05, 0.0), 0, 66.40625),  # paper 64
        ((0.5, 0.5, 0.0), 1, 202.8125),  # official code, max(1, ·)
    ],
)
def test_paper_schedules_give_the_paper_averages(keeps, min_keep, average):
    assert average_tokens(_stages([3, 17, 22], keeps), 32, 576, min_keep) == average


def test_paper_192_token_counts():
    counts = tokens_per_layer(_stages([3, 17, 22], (0.5, 0.3, 0.0)), 32, 576)
    assert counts == [576] * 3 + [288] * 14 + [86] * 5 + [0] * 10
    assert tokens_per_layer(_stages([3, 17, 22], (0.5, 0.5, 0.0)), 32, 576, 1)[-1] == 1


@pytest.mark.parametrize("tokens", [192, 128, 64])
@pytest.mark.parametrize("num_layers,layers", [(32, [3, 17, 22]), (28, [3, 15, 19]), (40, [4, 21, 28])])
def test_budget_schedule_hits_the_average_from_below(tokens, num_layers, layers):
    stages = BudgetSchedule(tokens=tokens).stages(num_layers)
    assert [s.layer for s in stages] == layers
    assert stages[0].keep == stages[1].keep and stages[2].keep == 0.0
    avg = average_tokens(stages, num_layers, 576)
    assert tokens - 1 <= avg <= tokens, avg
    # the solved ratio is the one solve_keep returns
    assert stages[0].keep == solve_keep(tokens, layers, num_layers, 576)


def test_solve_keep_edges():
    assert solve_keep(576, [3, 17, 22], 32, 576) == 1.0  # nothing to drop but the last stage
    assert solve_keep(0, [3, 17, 22], 32, 576) == 0.0  # unreachable (layers 0-2 see all): keep nothing
    r = solve_keep(250, [8, 16, 24], 32, 576, final=0.5)
    assert average_tokens(_stages([8, 16, 24], (r, r, 0.5)), 32, 576) <= 250
    with pytest.raises(ValueError):
        BudgetSchedule(tokens=-1)
    # A budget above the image's count is not an error: it is solved per input, keeping everything.
    assert [s.keep for s in BudgetSchedule(tokens=600).stages(32)] == [1.0, 1.0, 0.0]


def test_v2drop_schedule_scales_with_depth():
    assert [(s.layer, s.keep) for s in V2DropSchedule().stages(32)] == [(3, 0.5), (17, 0.3), (22, 0.0)]
    assert [s.layer for s in V2DropSchedule().stages(28)] == [3, 15, 19]
    assert [s.layer for s in V2DropSchedule().stages(80)] == [8, 43, 55]
    assert scale_layers([0.01, 0.02, 0.03], 10) == [1, 2, 3]  # at least 1, strictly increasing
    assert average_tokens(V2DropSchedule().stages(32), 32, 576) == 193.4375
    with pytest.raises(ValueError):
        V2DropSchedule(keep=(0.5, 0.3), depth=(0.1, 0.5, 0.7))


# --------------------------------------------------------------------------------------------------
# Recipes: swapping and combining methods
# --------------------------------------------------------------------------------------------------

SWAP_YAML = """\
# the same schedule, one scorer
scorer: {scorer}
selector: topk
schedule:
  stages:
    - {{layer: 3, keep: 0.5}}
    - {{layer: 5, keep: 0.25}}
"""


def test_swapping_the_scorer_is_a_one_word_change(tmp_path):
    model = tiny("llava")
    inputs = make_inputs(model, batch=2, padding="left")
    kept = {}
    for scorer in ["v2drop", "fastv", "pdrop", "sparsevlm"]:
        path = tmp_path / f"{scorer}.yaml"
        path.write_text(SWAP_YAML.format(scorer=scorer))
        recipe = tokencomp.load_recipe(str(path))
        assert [s.scorer.name for s in recipe.stages(6)] == [scorer, scorer]
        with tokencomp.apply(model, recipe) as h:
            with torch.no_grad():
                model(**inputs)
            assert [row[5] for row in h.stats.vision_tokens_per_layer] == [8, 8]
            kept[scorer] = kept_sets(h, 3)
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=suppress_ids(model))
            assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    texts = [(tmp_path / f"{s}.yaml").read_text().splitlines() for s in ("v2drop", "fastv")]
    assert [(a, b) for a, b in zip(*texts) if a != b] == [("scorer: v2drop", "scorer: fastv")]
    assert kept["v2drop"] != kept["fastv"]
    assert len({str(v) for v in kept.values()}) == 4, "each method selects its own tokens"


def test_combination_recipe_uses_fastv_first_and_v2drop_later():
    recipe = tokencomp.load_recipe("combo/fastv-then-v2drop")
    stages = recipe.stages(32)
    assert [(s.layer, s.scorer.name) for s in stages] == [(3, "fastv"), (17, "v2drop"), (22, "v2drop")]
    model = tiny("llava", layers=32)
    inputs = make_inputs(model, batch=2, padding="left")

    def run(name):
        with tokencomp.apply(model, name) as h, torch.no_grad():
            model(**inputs)
            return kept_sets(h, 3), kept_sets(h, 17) if 17 in h.stats.kept_positions else None, h.stats.vision_tokens_per_layer

    combo3, combo17, counts = run(recipe)
    fastv3, _, _ = run("fastv/llava-1.5-7b-k3-r50")
    v2drop3, v2drop17, v2_counts = run("v2drop/llava-1.5-7b-192")
    assert combo3 == fastv3, "stage 1 is FastV's choice"
    assert combo3 != v2drop3
    assert counts == v2_counts  # same schedule, same counts
    assert all(set(a) <= set(b) for a, b in zip(combo17, combo3))


def test_all_methods_are_registered_plugins():
    reg = plugins.registry()
    assert {"v2drop", "fastv", "pdrop", "sparsevlm", "random", "uniform", "none"} <= set(reg.names("scorer"))
    assert {"topk", "quota"} <= set(reg.names("selector"))
    assert {"explicit", "v2drop", "budget"} <= set(reg.names("schedule"))
    for name in ("v2drop", "fastv", "pdrop", "sparsevlm", "random", "uniform", "none"):
        assert reg.entries["scorer"][name].plugin.startswith("tokencomp.scorers.")


@pytest.mark.parametrize("form", [{"rope": "no"}, {"heads": "min"}, {"rotary": False}])
def test_bad_attention_rows_form_is_a_plugin_error_before_any_layer_runs(in_process_plugin, form):
    @dataclass(frozen=True)
    class Bad(_RecordPrevious):
        name = "test_bad_rows"
        attention_rows = types.MappingProxyType(form)

    register_test_scorers(in_process_plugin, "test-methods-bad-rows", Bad)
    with pytest.raises(tokencomp.PluginError, match="attention_rows"):
        tokencomp.apply(tiny("llava"), {"scorer": "test_bad_rows", "schedule": {"stages": [{"layer": 3, "keep": 0.5}]}})
