"""Vision-tower signals: scorers declare them, adapters compute them from the encoder's own q/k
(never eager attention, never ``output_attentions``), the engine aligns them with the tokens."""

from __future__ import annotations

import pytest
import torch

import tokencomp
from tokencomp.errors import UnsupportedModelError
from tokencomp.synthetic import FAMILY_SPECS, attn_map, make_inputs, tiny_config

from test_engine import assert_cache_equals_replay, assert_rows_match_solo, gen_kwargs, tiny


def deep_llava(attn="sdpa", vision_layers=3):
    """Tiny LLaVA whose CLIP tower has several layers, so layer -2 is a real middle layer."""
    cfg = tiny_config("llava", attn=attn)
    cfg.vision_config.num_hidden_layers = vision_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FAMILY_SPECS["llava"].model_class._from_config(cfg, attn_implementation=attn_map(attn))
    return model.eval()


VISIONZIP = {"schedule": {"stages": [{"phase": "input", "keep": 0.25, "scorer": "cls_attention", "merge": {"name": "contextual", "tokens": 4}}, {"layer": 3, "keep": 0.5}]}}


def reference_cls_attention(model, inputs):
    """The [CLS] row of the eager attention of the layer the projector reads, head-averaged."""
    eager = deep_llava("eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    layer = len(out.attentions) + model.config.vision_feature_layer  # attentions[-2]
    return out.attentions[layer][:, :, 0, 1:].mean(1)  # (N, 576-like)


def test_cls_attention_equals_the_eager_reference_and_drives_the_selection():
    model = deep_llava()
    inputs = make_inputs(model, batch=2)
    ref = reference_cls_attention(model, inputs)
    rec = {"schedule": {"stages": [{"phase": "input", "keep": 0.25, "scorer": "cls_attention"}]}}
    seen = {}

    from tokencomp.scorers.cls_attention import ClsAttentionScorer

    original = ClsAttentionScorer.score

    def spy(self, view):
        seen["signal"] = view.signals["cls_attention"].clone()
        seen["vision"] = view.vision_mask.clone()
        return original(self, view)

    ClsAttentionScorer.score = spy
    try:
        with torch.no_grad(), tokencomp.apply(model, rec) as h:
            model(**inputs)
            kept = h.stats.kept_positions[0]
    finally:
        ClsAttentionScorer.score = original
    vision = inputs["input_ids"] == model.config.image_token_id
    for b in range(2):
        got = seen["signal"][b][vision[b]]
        assert torch.allclose(got, ref[b], atol=1e-6)
        assert (seen["signal"][b][~vision[b]] == 0).all()
        positions = torch.nonzero(vision[b]).flatten()
        k = int(len(positions) * 0.25)
        top = positions[torch.sort(ref[b], descending=True, stable=True).indices[:k]].sort().values
        assert torch.equal(kept[b], top)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_visionzip_recipe_cache_equals_no_cache_and_batch_equals_single(attn):
    model = deep_llava(attn)
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), tokencomp.apply(model, VISIONZIP) as h:
        cached = assert_cache_equals_replay(model, h, inputs)
        assert [row[0] for row in h.stats.vision_tokens_per_layer] == [16, 16]
        assert_rows_match_solo(model, inputs, cached, scores=False)


def test_signals_keep_the_vision_tower_on_its_kernel():
    """No output_attentions, no eager switch: the tower's attention implementation is untouched and
    the hooks are gone after remove()."""
    model = deep_llava("sdpa")
    tower_impl = model.config.vision_config._attn_implementation
    inputs = make_inputs(model)

    def tower_hooks():
        return sum(len(m._forward_hooks) for m in model.model.vision_tower.modules())

    with torch.no_grad():
        model(**inputs)  # transformers installs its own output-recording hooks on a first forward
    before = tower_hooks()
    with torch.no_grad(), tokencomp.apply(model, VISIONZIP):
        assert tower_hooks() == before + 3  # q, k of one layer and the tower's output
        model(**inputs)
        assert model.config.vision_config._attn_implementation == tower_impl == "sdpa"
    assert tower_hooks() == before


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_families_compute_the_no_cls_variant(family):
    """Qwen towers have no [CLS]: their adapter computes the attention each patch receives instead
    (checked against the model's own eager attention in test_qwen_signals.py), so apply accepts it."""
    model = tiny(family)
    rec = {"schedule": {"stages": [{"phase": "input", "keep": 0.25, "scorer": "cls_attention", "merge": {"name": "contextual", "tokens": 2}}]}}
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        assert h.adapter.signal_names(model) == ("cls_attention",)
        model(**make_inputs(model, batch=2))
        assert [row[0] for row in h.stats.vision_tokens_per_layer] == [8, 8]  # int(32 * 0.25)


def test_a_family_without_the_signal_is_refused_at_apply():
    class Unknown(tokencomp.Scorer):
        name = "needs_unknown_signal"
        signals = ("unknown_signal",)

        def score(self, view):
            return view.hidden[..., 0]

    recipe = tokencomp.Recipe.of(scorer=Unknown(), stages=[tokencomp.Stage(layer=0, keep=0.5)])
    with pytest.raises(UnsupportedModelError, match=r"'needs_unknown_signal' needs the vision-tower signal unknown_signal"):
        tokencomp.apply(tiny("qwen2_vl"), recipe)


def test_inputs_embeds_without_the_tower_is_a_clear_error():
    model = deep_llava()
    inputs = make_inputs(model)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    vision = inputs["input_ids"] == model.config.image_token_id
    with torch.no_grad(), tokencomp.apply(model, VISIONZIP) as h, h.vision_mask(vision):
        with pytest.raises(UnsupportedModelError, match="vision tower did not run"):
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def signal_seen(model, inputs, call=None):
    """The ``(B, L)`` ``cls_attention`` values an input-stage scorer sees in ``model(**inputs)`` (or in
    ``call(handle)``)."""
    from tokencomp.scorers.cls_attention import ClsAttentionScorer

    seen = []
    original = ClsAttentionScorer.score

    def spy(self, view):
        seen.append(view.signals["cls_attention"].clone())
        return original(self, view)

    ClsAttentionScorer.score = spy
    try:
        with torch.no_grad(), tokencomp.apply(model, {"schedule": {"stages": [{"phase": "input", "keep": 0.25, "scorer": "cls_attention"}]}}) as h:
            (call or (lambda h: model(**inputs)))(h)
    finally:
        ClsAttentionScorer.score = original
    return seen[0]


def deep_anyres(family, attn="sdpa"):
    cfg = tiny_config(family, attn=attn)
    cfg.vision_config.num_hidden_layers = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FAMILY_SPECS[family].model_class._from_config(cfg, attn_implementation=attn_map(attn)).eval()


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_signal_goes_through_the_models_own_packing(family):
    """NeXT / OneVision: the per-tile [CLS] rows are packed like the features (base tile first, then
    the anyres grid with a newline row end = 0); on a square image nothing is unpadded, so the grid
    part holds exactly the other tiles' rows."""
    model = deep_anyres(family)
    inputs = make_inputs(model, image_sizes=[(336, 336)])
    eager = deep_anyres(family, "eager")
    eager.load_state_dict(model.state_dict())
    pixels = inputs["pixel_values"][0]  # (tiles, 3, h, w)
    with torch.no_grad():
        out = eager.model.vision_tower(pixels, output_attentions=True)
    first = 1 if model.config.vision_feature_select_strategy == "default" else 0  # "full" keeps token 0 as a patch
    rows = out.attentions[len(out.attentions) + model.config.vision_feature_layer][:, :, 0, first:].mean(1)  # (tiles, P)
    vision = inputs["input_ids"][0] == model.config.image_token_id
    signal = signal_seen(model, inputs)[0][vision]
    P = rows.shape[1]
    assert torch.allclose(signal[:P], rows[0], atol=1e-6)  # the base view, in order
    grid = signal[P:]
    newlines = grid == 0
    assert int(newlines.sum()) == 8  # one per grid row
    assert torch.allclose(grid[~newlines].sort().values, rows[1:].flatten().sort().values, atol=1e-6)


def test_visionzip_on_next_batch_equals_single():
    model = deep_anyres("llava_next")
    inputs = make_inputs(model, batch=2, image_sizes=[(336, 336), (112, 336)])
    with torch.no_grad(), tokencomp.apply(model, VISIONZIP):
        batched = model.generate(**inputs, **gen_kwargs(model))
        assert_rows_match_solo(model, inputs, batched, scores=False)


def test_onevision_video_signal_is_each_frames_row_pooled_like_its_features():
    """OneVision video: each frame's first-token row (SigLIP: no [CLS]) at the projector's layer,
    2x2-averaged like the model pools the frame features, the closing newline 0; placed after the
    image in the same prompt, on the video's own placeholders."""
    model = deep_anyres("llava_onevision")
    inputs = make_inputs(model, batch=2, video=True, n_images=1)
    eager = deep_anyres("llava_onevision", "eager")
    eager.load_state_dict(model.state_dict())
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert side % 2 == 0  # bilinear halving is then exactly the 2x2 mean
    signal = signal_seen(model, inputs)
    video = inputs["input_ids"] == model.config.video_token_id
    image = inputs["input_ids"] == model.config.image_token_id
    assert image.any(1).all() and (signal[image] > 0).any()  # the image part is there too
    for b in range(2):
        with torch.no_grad():
            out = eager.model.vision_tower(inputs["pixel_values_videos"][b], output_attentions=True)
        layer = len(out.attentions) + model.config.vision_feature_layer
        rows = out.attentions[layer][:, :, 0, :].mean(1)  # (frames, side * side): "full" keeps token 0
        pooled = torch.nn.functional.avg_pool2d(rows.view(-1, 1, side, side), 2).flatten()
        expected = torch.cat([pooled, torch.zeros(1)])
        assert torch.allclose(signal[b][video[b]], expected, atol=1e-6)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_token_layout_while_the_signal_wraps_the_packing(family):
    """The layout replays the model's packing, reading its parameters from its signature: the same
    regions while the signal's wrapper sits on ``pack_image_features``."""
    model = deep_anyres(family)
    inputs = make_inputs(model, image_sizes=[(112, 336)])
    with tokencomp.apply(model, VISIONZIP) as h:
        applied = h.adapter.token_layout(model, inputs)
    plain = h.adapter.token_layout(model, inputs)
    assert len(plain) == 2
    assert [(r.view, r.positions.tolist()) for r in applied] == [(r.view, r.positions.tolist()) for r in plain]


def test_onevision_inputs_embeds_with_pixels_places_image_and_video_from_the_embeddings():
    model = deep_anyres("llava_onevision")
    inputs = make_inputs(model, batch=2, video=True, n_images=1)
    ids = inputs.pop("input_ids")
    vision = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    embedded = dict(inputs, inputs_embeds=model.get_input_embeddings()(ids))

    def call(handle):
        with handle.vision_mask(vision):
            model(**embedded)

    assert torch.equal(signal_seen(model, embedded, call), signal_seen(model, dict(inputs, input_ids=ids)))
