"""Decode stages (``phase: decode``): during generation, layers ``l`` and later attend only to the
cached vision tokens the new token attends to most at layer ``l - 1`` — hidden for the step
(``mask``, DyCoke's behaviour) or removed from those layers' cache (``evict``)."""

from __future__ import annotations

import pytest
import torch

import tokencomp
from tokencomp.decode import meta_of
from tokencomp.errors import RecipeError
from tokencomp.testing import make_inputs, vision_token_ids

from test_engine import assert_rows_match_solo, gen_kwargs, tiny

FAMILIES = ("llava", "llava_onevision", "qwen2_vl", "qwen3_vl")


def recipe(keep, mode, layer=3, extra=()):
    return {"schedule": {"stages": [*extra, {"phase": "decode", "layer": layer, "keep": keep, "mode": mode}]}}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["mask", "evict"])
def test_decode_stage_at_keep_1_is_the_identity(family, attn, mode):
    model = tiny(family, attn)
    inputs = make_inputs(model, batch=2)
    with torch.no_grad():
        ref = model.generate(**inputs, **gen_kwargs(model))
        with tokencomp.apply(model, recipe(1.0, mode)):
            got = model.generate(**inputs, **gen_kwargs(model))
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["mask", "evict"])
def test_decode_stage_batch_equals_single(family, mode):
    model = tiny(family)
    inputs = make_inputs(model, batch=3, padding="left")
    with torch.no_grad(), tokencomp.apply(model, recipe(0.25, mode)):
        batched = model.generate(**inputs, **gen_kwargs(model))
        assert_rows_match_solo(model, inputs, batched)


def test_decode_stage_changes_generation_and_evict_frees_the_cache():
    model = tiny("llava")
    inputs = make_inputs(model, batch=2)
    n_vision = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    with torch.no_grad():
        ref = model.generate(**inputs, **gen_kwargs(model))
        lengths = {}
        for mode in ("mask", "evict"):
            with tokencomp.apply(model, recipe(0.25, mode)):
                out = model(**inputs, use_cache=True)
                cache = out.past_key_values
                step = {
                    "input_ids": torch.full((2, 1), 20),
                    "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
                }
                logits = model(**step, cache=cache, use_cache=True).logits
                lengths[mode] = [layer.keys.shape[-2] for layer in cache.layers]
                assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 1  # the logical length
                if mode == "mask":
                    mask_logits = logits
                else:
                    # The first decode step selects the same tokens in both modes: same output.
                    assert torch.allclose(logits, mask_logits, atol=1e-5)
    L = inputs["input_ids"].shape[1] + 1
    assert lengths["mask"] == [L] * 6
    assert lengths["evict"][:3] == [L] * 3
    assert all(n == L - (n_vision - int(n_vision * 0.25)) for n in lengths["evict"][3:])
    with torch.no_grad(), tokencomp.apply(model, recipe(0.25, "mask")):
        got = model.generate(**inputs, **gen_kwargs(model))
    assert max((a - b)[torch.isfinite(a)].abs().max() for a, b in zip(ref.scores[1:], got.scores[1:])) > 1e-4


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_evicted_selection_is_the_top_attention_of_the_new_token(family):
    """Reference: the eager model's own attention probabilities at layer l-1 for the first decode
    step (output_attentions), head-averaged; evict keeps exactly their top-k vision tokens."""
    model = tiny(family, "eager")
    inputs = make_inputs(model, batch=1)
    L = inputs["input_ids"].shape[1]
    step = {
        "input_ids": torch.full((1, 1), 20),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1),
        "position_ids": torch.full((1, 1), L),
    }
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        att = model(**step, cache=out.past_key_values, use_cache=True, output_attentions=True).attentions[2]
    row = att[0, :, -1, :L].mean(0)  # (L,) attention of the new token at layer 2 over the prompt
    vision = torch.isin(inputs["input_ids"][0], torch.tensor(vision_token_ids(model)))
    vision[L - 1] = False
    pos = torch.nonzero(vision).flatten()
    k = int(len(pos) * 0.25)
    want = pos[torch.sort(row[pos], descending=True, stable=True).indices[:k]].sort().values
    with torch.no_grad(), tokencomp.apply(model, recipe(0.25, "evict")):
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        model(**step, cache=cache, use_cache=True)
        meta = cache._tokencomp_meta.layers[3]
    kept = meta.idx[0][meta.alive[0]]
    kept_vision = kept[vision[kept]]
    assert torch.equal(kept_vision, want)


@pytest.mark.parametrize("mode", ["mask", "evict"])
def test_decode_stage_with_beam_search_and_prefill_stages(mode):
    model = tiny("qwen2_vl")
    inputs = make_inputs(model, batch=2)
    kw = dict(gen_kwargs(model), num_beams=3)
    extra = ({"phase": "input", "keep": 0.5, "scorer": "random"}, {"layer": 2, "keep": 0.5})
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        with tokencomp.apply(model, recipe(1.0, mode)):
            assert torch.equal(model.generate(**inputs, **kw).sequences, ref.sequences)
        with tokencomp.apply(model, recipe(0.3, mode, layer=4, extra=extra)) as h:
            out = model.generate(**inputs, **kw)
            assert h.stats.vision_tokens_per_layer[0][0] < h.stats.sequence_length
    assert out.sequences.shape == ref.sequences.shape


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"phase": "decode", "layer": 3, "keep": 0.5, "scorer": "fastv"}, "takes no `scorer:`"),
        ({"phase": "decode", "layer": 3, "keep": 0.5, "mode": "drop"}, "mode must be one of mask, evict"),
        ({"layer": 3, "keep": 0.5, "mode": "mask"}, "`mode:` is for decode stages"),
        ({"phase": "decode", "keep": 0.5}, "missing 'layer'"),
    ],
)
def test_decode_stage_recipe_errors(stage, message):
    with pytest.raises(RecipeError, match=message):
        tokencomp.load_recipe({"schedule": {"stages": [stage]}})


def test_decode_and_prefill_stages_may_share_a_layer_and_describe_themselves():
    rec = tokencomp.load_recipe(recipe(0.3, "evict", extra=({"layer": 3, "keep": 0.5},)))
    text = rec.describe(6)
    assert "layer   3: keep 0.5" in text and "decode, layer   3+: attend to 0.3 of the cached vision tokens (evict)" in text


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
@pytest.mark.parametrize("mode", ["mask", "evict"])
def test_decode_stage_on_video_batch_equals_single_and_keep_1_is_identity(family, mode):
    model = tiny(family)
    inputs = make_inputs(model, batch=2, video=True, n_images=0)
    with torch.no_grad():
        ref = model.generate(**inputs, **gen_kwargs(model))
        with tokencomp.apply(model, recipe(1.0, mode)):
            assert torch.equal(model.generate(**inputs, **gen_kwargs(model)).sequences, ref.sequences)
        with tokencomp.apply(model, recipe(0.2, mode)):
            batched = model.generate(**inputs, **gen_kwargs(model))
            assert_rows_match_solo(model, inputs, batched)


# ------------------------------------------------------------------ evict_earlier (PruneVid's cache)


def _hide_in_earlier_layers(model, layer, hidden, columns):
    """Pre-hooks on the layers before ``layer`` that hide the (B, P) prompt columns ``hidden`` from
    every query of a decode step: the reference for ``evict_earlier`` (masking, not cache surgery).
    ``columns[j]``: the original position of each prompt column of layer ``j``'s cache, where an
    earlier stage compacted it (None: all of them)."""
    handles = []

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] != 1:
            return None  # the prefill: unchanged
        mask = kwargs.get("attention_mask")
        j = module.self_attn.layer_idx
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        kv = mask.shape[-1] if mask is not None else cache.layers[j].keys.shape[-2] + 1
        mine = hidden if columns.get(j) is None else hidden.gather(1, columns[j])
        hide = torch.nn.functional.pad(mine, (0, kv - mine.shape[1]))[:, None, None, :]
        if mask is None:
            mask = ~hide
        elif mask.dtype == torch.bool:
            mask = mask & ~hide
        else:
            mask = mask.masked_fill(hide, torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    for j in range(layer):
        handles.append(model.get_decoder().layers[j].register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@pytest.mark.parametrize("family,attn", [("llava", "sdpa"), ("llava", "eager"), ("llava_onevision", "sdpa")])
@pytest.mark.parametrize("extra", [[], [{"layer": 1, "keep": 0.75}]])
def test_evict_earlier_equals_hiding_the_dropped_tokens_in_the_earlier_layers(family, attn, extra):
    """A prefill stage with ``evict_earlier`` removes the tokens it drops from the caches of the layers
    before it: the generation equals the same recipe without it whose earlier layers are told, by
    their attention mask, not to look at those tokens while decoding (batch of 2, left padding; with
    an earlier stage, its layers' cache is compacted twice). Negative control: without either, the
    generation differs."""
    model = tiny(family, attn)
    inputs = make_inputs(model, batch=2, padding="left")
    stage = {"layer": 3, "keep": 0.4, "scorer": "fastv"}
    with torch.no_grad():
        with tokencomp.apply(model, {"schedule": {"stages": [*extra, {**stage, "evict_earlier": True}]}}) as h:
            got = model.generate(**inputs, **gen_kwargs(model))
            cache = model(**inputs, use_cache=True).past_key_values
            lengths = {layer.keys.shape[-2] for layer in cache.layers}
        with tokencomp.apply(model, {"schedule": {"stages": [*extra, stage]}}) as h:
            meta = meta_of(model(**inputs, use_cache=True).past_key_values)
            columns = {j: meta.layers[j].idx if j in meta.layers else None for j in range(3)}
            kept = h.stats.kept_positions[3]
            vision = torch.isin(inputs["input_ids"], torch.tensor(vision_token_ids(model)))
            hidden = vision.clone()
            for b, k in enumerate(kept):
                hidden[b, k] = False
            handles = _hide_in_earlier_layers(model, 3, hidden, columns)
            try:
                ref = model.generate(**inputs, **gen_kwargs(model))
            finally:
                for x in handles:
                    x.remove()
            plain = model.generate(**inputs, **gen_kwargs(model))
    assert torch.equal(got.sequences, ref.sequences)
    assert max((a - b)[torch.isfinite(a)].abs().max() for a, b in zip(got.scores, ref.scores)) < 1e-4
    assert max((a - b)[torch.isfinite(a)].abs().max() for a, b in zip(got.scores[1:], plain.scores[1:])) > 1e-4
    assert len(lengths) == 1  # every layer's cache holds the kept tokens only


def test_evict_earlier_is_for_prefill_stages():
    for stage in ({"phase": "input", "keep": 0.5, "scorer": "random", "evict_earlier": True},
                  {"phase": "decode", "layer": 3, "keep": 0.5, "evict_earlier": True}):
        with pytest.raises(RecipeError, match="evict_earlier"):
            tokencomp.load_recipe({"schedule": {"stages": [stage]}})
    with pytest.raises(RecipeError, match="evict_earlier must be true or false"):
        tokencomp.load_recipe({"schedule": {"stages": [{"layer": 3, "keep": 0.5, "evict_earlier": "yes"}]}})
