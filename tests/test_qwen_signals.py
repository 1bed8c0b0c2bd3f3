"""The Qwen vision towers' ``cls_attention`` signal (no [CLS]: the attention each patch receives at the
last vision block, averaged over heads and the queries of its segment, summed over the 2x2 patches of
each LLM token), checked against the model's own eager attention and the model's own placement of
the merged features into the prompt, and the methods built on it run end to end on Qwen."""

from __future__ import annotations

import sys

import pytest
import torch

import tokencomp
from tokencomp.models.qwen_vl import received_attention
from tokencomp.scorers.cls_attention import ClsAttentionScorer
from tokencomp.synthetic import FAMILY_SPECS, attn_map, make_inputs, tiny_config

from test_engine import assert_cache_equals_replay, assert_rows_match_solo, gen_kwargs
from test_vispruner_tome_mustdrop import RECIPES, rec

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# Qwen2.5-VL's tiny tower: block 0 windowed, block 1 (the last) full; "window_last" swaps them, so
# the signal comes from a windowed block (4x4-patch windows, several per image).
VARIANTS = [*QWEN, "qwen2_5_vl:window_last"]

_models: dict = {}


def qwen(variant: str, attn: str = "sdpa"):
    """Tiny Qwen model with a 2+ block tower (the signal's block is the last, not the only one)."""
    key = (variant, attn)
    if key not in _models:
        family, _, option = variant.partition(":")
        cfg = tiny_config(family, attn=attn)
        vc = cfg.vision_config
        vc.depth = max(vc.depth, 2)
        if option == "window_last":
            vc.fullatt_block_indexes = [0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = FAMILY_SPECS[family].model_class._from_config(cfg, attn_implementation=attn_map(attn))
        with torch.no_grad():  # random init attends almost uniformly: sharpen q and k so patches differ
            for block in model.model.visual.blocks:
                block.attn.qkv.weight[: 2 * vc.hidden_size if family != "qwen2_vl" else 2 * vc.embed_dim] *= 40.0
        gen = model.generation_config
        gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = 0, 1, 2
        _models[key] = model.eval()
    return _models[key]


CASES = {
    "ragged images": dict(batch=2, image_sizes=[(112, 224), (56, 112)]),
    "two images": dict(batch=2, n_images=2, image_sizes=[[(56, 112), (112, 112)], [(112, 56), (56, 56)]]),
    "image and video": dict(batch=2, video=True, n_images=1, image_sizes=[(112, 168), (56, 112)]),
    "video": dict(batch=2, video=True, n_images=0),
}
INPUT_STAGE = {"schedule": {"stages": [{"phase": "input", "keep": 0.25, "scorer": "cls_attention"}]}}


def seen_signal(model, inputs, recipe=INPUT_STAGE, call=None):
    """The ``cls_attention`` values the scorer sees at its first call (B, S), and the vision mask."""
    seen = []
    original = ClsAttentionScorer.score

    def spy(self, view):
        seen.append((view.signals["cls_attention"].clone(), view.vision_mask.clone()))
        return original(self, view)

    ClsAttentionScorer.score = spy
    try:
        with torch.no_grad(), tokencomp.apply(model, recipe) as handle:
            (call or (lambda h: model(**inputs)))(handle)
    finally:
        ClsAttentionScorer.score = original
    return seen[0]


class _SignalMerger(torch.nn.Module):
    """Stands in for the tower's merger: each merged token's feature is the sum, over its patches, of
    the reference signal (the head- and query-mean of the eager attention probabilities the last block
    recorded), so the model's own window un-permutation and placeholder scatter carry it to the prompt."""

    def __init__(self, width: int, recorded: list):
        super().__init__()
        self.width, self.recorded = width, recorded

    def forward(self, x):
        # Each recorded chunk is one attention segment (1, H, n, n), in the tower's row order.
        per_patch = torch.cat([w[0].float().mean(0).mean(0) for w in self.recorded])
        assert per_patch.shape[0] == x.shape[0]
        return per_patch.view(-1, 4).sum(1)[:, None].expand(-1, self.width).to(x.dtype).contiguous()


def reference_signal(variant, inputs, monkeypatch):
    """``(B, L)`` signal placed by the model itself: an eager copy of the tower records its last block's
    attention probabilities (the model's own rotary, segments and windows), and ``_SignalMerger``
    turns them into the features the model scatters into the prompt."""
    sdpa, eager = qwen(variant), qwen(variant, "eager")
    eager.load_state_dict(sdpa.state_dict())
    tower = eager.model.visual
    last = tower.blocks[-1].attn
    module = sys.modules[type(last).__module__]
    original = module.eager_attention_forward
    recorded, active = [], [False]

    def recording(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        if active[0]:
            recorded.append(weights.detach())
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    merger = tower.merger
    tower.merger = _SignalMerger(eager.config.text_config.hidden_size, recorded)
    embeds = {}
    hooks = [
        tower.register_forward_pre_hook(lambda m, a: recorded.clear()),
        last.register_forward_pre_hook(lambda m, a: active.__setitem__(0, True)),
        last.register_forward_hook(lambda m, a, o: active.__setitem__(0, False)),
        eager.model.language_model.register_forward_pre_hook(
            lambda m, a, k: embeds.__setitem__("x", k["inputs_embeds"][..., 0].clone()), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            eager(**inputs)
    finally:
        for h in hooks:
            h.remove()
        tower.merger = merger
    return embeds["x"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_signal_equals_the_models_own_eager_attention_placed_by_the_model(variant, case, monkeypatch):
    model = qwen(variant)
    inputs = make_inputs(model, **CASES[case])
    signal, vision = seen_signal(model, inputs)
    ref = reference_signal(variant, inputs, monkeypatch)
    assert vision.shape == ref.shape  # an input stage sees the full sequence
    assert (signal[~vision] == 0).all()
    assert torch.allclose(signal[vision], ref[vision], rtol=1e-4, atol=1e-6)
    assert signal[vision].std() > 0.2 * signal[vision].mean()  # the patches really differ


def test_window_order_matters_in_the_tiny_qwen2_5_tower():
    """Negative control: Qwen2.5-VL's tiny images span several windows, so a signal left in the
    tower's window order would land on the wrong tokens."""
    model = qwen("qwen2_5_vl")
    tower = model.model.visual
    grid = make_inputs(model, **CASES["ragged images"])["image_grid_thw"]
    module = sys.modules[type(tower).__module__]
    order, cu_windows = module.get_vision_window_index(grid, tower.spatial_merge_size, tower.window_size, tower.patch_size)
    assert not torch.equal(order, torch.arange(len(order)))
    assert len(cu_windows) - 1 > len(grid)


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl:window_last"])
def test_a_function_of_the_patch_lands_on_its_llm_token(variant, monkeypatch):
    """Replace the per-patch signal by each patch's (row, column) in its picture: every LLM token must
    get the sum over its own 2x2 patches, in the grid's raster order, frame after frame."""
    import tokencomp.models.qwen_vl as qv

    model = qwen(variant)
    inputs = make_inputs(model, **CASES["image and video"])
    grids = {"image": inputs["image_grid_thw"], "video": inputs["video_grid_thw"]}
    calls = []

    def coordinates(q, k, cu, scale, budget=qv.CHUNK_ELEMENTS):
        grid = grids["image" if not calls else "video"]
        calls.append(1)
        tower = model.model.visual
        rows = []
        for t, h, w in grid.tolist():
            r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            code = (1000 * r + c).float()  # raster (row, column) of each patch
            blocks = code.view(h // 2, 2, w // 2, 2).transpose(1, 2).reshape(-1)  # the tower's 2x2 block order
            rows.append(blocks.repeat(t))
        patches = torch.cat(rows)
        if getattr(tower, "window_size", None) and hasattr(tower, "fullatt_block_indexes"):
            order, _ = sys.modules[type(tower).__module__].get_vision_window_index(grid, 2, tower.window_size, tower.patch_size)
            patches = patches.view(-1, 4)[order].reshape(-1)  # what the tower's blocks see
        return patches

    monkeypatch.setattr(qv, "received_attention", coordinates)
    signal, vision = seen_signal(model, inputs)
    ids = inputs["input_ids"]
    expected = []
    for kind, tok in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
        per_item = []
        for t, h, w in grids[kind].tolist():
            r, c = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
            token = 4 * (1000 * 2 * r + 2 * c).float() + 2 * 1000 + 2  # sum of (2r+i, 2c+j), i, j in {0, 1}
            per_item.append(token.reshape(-1).repeat(t))
        expected.append((ids == tok, torch.cat(per_item)))
    full = torch.zeros(ids.shape)
    for mask, values in expected:
        full[mask] = values
    assert torch.equal(signal[vision], full[vision])


@pytest.mark.parametrize("budget", [1, 40, 300, 1 << 30])
def test_blockwise_received_attention_equals_the_full_matrix(budget, monkeypatch):
    """Segments of several lengths (equal ones are batched), chunked queries: the same values as the
    dense block-diagonal softmax, and no more scores at once than the budget allows."""
    gen = torch.Generator().manual_seed(0)
    H, d = 3, 8
    cu = torch.tensor([0, 5, 12, 17, 37, 38, 45])
    N = int(cu[-1])
    q, k = torch.randn(N, H, d, generator=gen), torch.randn(N, H, d, generator=gen)
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.3
    scores = scores.masked_fill(seg[:, None] != seg[None, :], float("-inf"))
    probs = torch.softmax(scores, -1)  # (H, N, N)
    lengths = cu.diff()[seg].float()
    dense = probs.mean(0).sum(0) / lengths  # mean over heads, then over the queries of the segment
    sizes = []
    softmax = torch.softmax

    def counting(x, dim):
        sizes.append(x.numel())
        return softmax(x, dim=dim)

    monkeypatch.setattr(torch, "softmax", counting)
    got = received_attention(q, k, cu, 0.3, budget=budget)
    monkeypatch.undo()
    assert torch.allclose(got, dense, atol=1e-6)
    assert max(sizes) <= max(budget, H * int(cu.diff().max()))  # one query row of a segment at least


def test_hooks_are_removed_and_the_tower_keeps_its_kernel():
    model = qwen("qwen2_5_vl")
    inputs = make_inputs(model)

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    with torch.no_grad():
        model(**inputs)  # transformers installs its own output-recording hooks on a first forward
    before = hooks()
    with torch.no_grad(), tokencomp.apply(model, INPUT_STAGE):
        model(**inputs)
        assert model.config.vision_config._attn_implementation == "sdpa"
    assert hooks() == before


# -------------------------------------------------------------------------------------------------
# generate: pre-encoded towers, beams
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_generate_passes_the_signal_through_pre_encoded_outputs_and_beams(family):
    """``generate`` encodes the pixels before the prefill (``mm_encoder_outputs``); with beams it
    repeats each sample's items. The prefill sees the same values as a plain forward, per beam."""
    model = qwen(family)
    inputs = make_inputs(model, **CASES["image and video"])
    plain, vision = seen_signal(model, inputs)
    greedy, _ = seen_signal(model, inputs, call=lambda h: model.generate(**inputs, **gen_kwargs(model, 2)))
    assert torch.equal(greedy, plain)
    beams, _ = seen_signal(model, inputs, call=lambda h: model.generate(**inputs, num_beams=2, **gen_kwargs(model, 2)))
    assert torch.equal(beams, plain.repeat_interleave(2, dim=0))


def test_inputs_embeds_with_pixels_places_images_and_videos_from_the_embeddings():
    model = qwen("qwen2_vl")
    inputs = make_inputs(model, **CASES["image and video"])
    plain, vision = seen_signal(model, inputs)
    embeds_inputs = dict(inputs, inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]))
    del embeds_inputs["input_ids"]

    def call(handle):
        with handle.vision_mask(vision):
            model(**embeds_inputs)

    got, _ = seen_signal(model, inputs, call=call)
    assert torch.equal(got, plain)


# -------------------------------------------------------------------------------------------------
# The methods on cls_attention, end to end (positions kept: Qwen's M-RoPE cannot be renumbered)
# -------------------------------------------------------------------------------------------------

METHODS = {
    "visionzip": [
        {"phase": "input", "keep": 0.25, "scorer": "cls_attention", "merge": {"name": "contextual", "tokens": 2}},
        {"layer": 3, "keep": 0.5},
    ],
    "fastervlm": [{"phase": "input", "keep": 0.3, "scorer": "cls_attention"}],
    "vispruner": RECIPES["vispruner"],
    "mustdrop": RECIPES["mustdrop"],  # window merge, then mustdrop stages whose key set is cls_attention
}


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("method", list(METHODS))
def test_methods_keep_1_identity_batch_equals_single_and_cache_equals_replay(method, family):
    model = qwen(family)
    stages = METHODS[method]
    inputs = make_inputs(model, batch=2, image_sizes=[(112, 224), (56, 112)])
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokencomp.apply(model, rec([dict(s, keep=1.0) for s in stages])):
            assert torch.equal(model(**inputs).logits, ref)
        with tokencomp.apply(model, rec(stages)) as h:
            cached = assert_cache_equals_replay(model, h, inputs)
            counts = h.stats.vision_tokens_per_layer
            assert counts[0][0] < (inputs["input_ids"][0] == model.config.image_token_id).sum()
            assert_rows_match_solo(model, inputs, cached, handle=h, counts=counts)


@pytest.mark.parametrize("family", QWEN)
def test_visionzip_on_video_batch_equals_single(family):
    model = qwen(family)
    inputs = make_inputs(model, **CASES["image and video"])
    with torch.no_grad(), tokencomp.apply(model, rec(METHODS["visionzip"])) as h:
        batched = model.generate(**inputs, **gen_kwargs(model))
        assert_rows_match_solo(model, inputs, batched, handle=h, counts=h.stats.vision_tokens_per_layer)


def test_cls_attention_scorer_passes_its_contract_on_qwen():
    from tokencomp import contract

    result = contract.check_scorer(ClsAttentionScorer(), families=QWEN)
    assert result.checked_families == sorted(QWEN)


def test_deepcopy_while_applied_is_the_usual_usage_error():
    import copy

    model = qwen("qwen2_vl")
    with tokencomp.apply(model, INPUT_STAGE):
        with pytest.raises(tokencomp.UsageError, match="deepcopy"):
            copy.deepcopy(model)
    copy.deepcopy(model)
