"""Input stages (``phase: input``): vision tokens reduced on the decoder's input embeddings, before
layer 0, so every layer and the KV cache see the shorter sequence. The same invariants as the
in-LLM stages, on all six families, eager and SDPA."""

from __future__ import annotations

import pytest
import torch

import tokencomp
from tokencomp.errors import RecipeError
from tokencomp.testing import FAMILIES, make_inputs, take_sample

from test_engine import gen_kwargs, max_score_diff, tiny

INPUT_THEN_PREFILL = [{"phase": "input", "keep": 0.5, "scorer": "random"}, {"layer": 2, "keep": 0.5}, {"layer": 4, "keep": 0.0}]


def recipe(stages=INPUT_THEN_PREFILL, scorer="v2drop"):
    return {"scorer": scorer, "schedule": {"stages": stages}}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_input_stage_at_keep_1_is_the_identity(family, attn):
    model = tiny(family, attn)
    stages = [{"phase": "input", "keep": 1.0, "scorer": "random"}, {"layer": 3, "keep": 1.0}]
    inputs = make_inputs(model, batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, **gen_kwargs(model))
        with tokencomp.apply(model, recipe(stages)):
            got = model(**inputs).logits
            got_gen = model.generate(**inputs, **gen_kwargs(model))
    assert torch.equal(ref, got)
    assert torch.equal(ref_gen.sequences, got_gen.sequences)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_input_stage_cache_equals_no_cache_and_counts_layer_0(family, attn):
    model = tiny(family, attn)
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), tokencomp.apply(model, recipe()) as h:
        cached = model.generate(**inputs, **gen_kwargs(model))
        counts = h.stats.vision_tokens_per_layer
        kept = h.stats.kept_positions
        with h.replay(kept):
            fresh = model.generate(**inputs, use_cache=False, **gen_kwargs(model))
        n = (torch.isin(inputs["input_ids"], torch.tensor(tokencomp.testing.vision_token_ids(model)))).sum(1).tolist()
    for row, n_b in zip(counts, n):
        assert row[0] == n_b // 2  # layer 0 already sees the kept half
        assert row[-1] == 0
    assert 0 in kept
    assert torch.equal(cached.sequences, fresh.sequences)
    assert max_score_diff(cached, fresh) < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_input_stage_batch_equals_single(family, attn):
    model = tiny(family, attn)
    inputs = make_inputs(model, batch=3, padding="left")
    rec = recipe([{"phase": "input", "keep": 0.5, "scorer": "uniform"}, {"layer": 3, "keep": 0.5}])
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        batched = model.generate(**inputs, **gen_kwargs(model))
        batched_counts = h.stats.vision_tokens_per_layer
        n_new = batched.sequences.shape[1] - inputs["input_ids"].shape[1]
        for b in range(3):
            solo = model.generate(**take_sample(inputs, b), **gen_kwargs(model))
            assert h.stats.vision_tokens_per_layer[0] == batched_counts[b]
            assert torch.equal(solo.sequences[0, -n_new:], batched.sequences[b, -n_new:])
            for x, y in zip(solo.scores, batched.scores):
                finite = torch.isfinite(x[0])
                assert (x[0][finite] - y[b][finite]).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_input_stage_cache_holds_the_compacted_prefix_in_every_layer(family):
    model = tiny(family)
    inputs = make_inputs(model)
    L = inputs["input_ids"].shape[1]
    with torch.no_grad(), tokencomp.apply(model, recipe([{"phase": "input", "keep": 0.25, "scorer": "random"}])) as h:
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        kept_len = h.stats.output_positions.shape[1]
        assert kept_len < L
        assert all(layer.keys.shape[-2] == kept_len for layer in cache.layers)
        # The model reads the *logical* length (original prompt) from the cache.
        assert cache.get_seq_length() == L


def test_remove_after_input_stage_restores_exactly():
    model = tiny("llava")
    inputs = make_inputs(model, batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokencomp.apply(model, recipe()):
            model.generate(**inputs, **gen_kwargs(model))
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"phase": "input", "keep": 0.5}, "looks at the previous decoder layer"),  # default scorer v2drop
        ({"phase": "input", "keep": 0.5, "scorer": "fastv"}, "looks at the previous decoder layer"),
        ({"phase": "input", "layer": 0, "keep": 0.5, "scorer": "random"}, "takes no `layer:`"),
        ({"layer": 0, "keep": 0.5, "scorer": "random"}, "phase: input"),
        ({"phase": "output", "layer": 3, "keep": 0.5}, "phase must be one of input, prefill, decode"),
    ],
)
def test_input_stage_recipe_errors(stage, message):
    with pytest.raises(RecipeError, match=message):
        tokencomp.load_recipe(recipe([stage])).stages(6)


def test_negative_control_physical_cache_length(monkeypatch):
    """Without the logical length, decoding after an input stage reads wrong mask columns/positions."""
    from tokencomp import decode

    monkeypatch.setattr(decode.CompactedCache, "_logical", lambda self, layer_idx, physical: physical)
    model = tiny("llava")
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), tokencomp.apply(model, recipe()) as h:
        try:
            cached = model.generate(**inputs, **gen_kwargs(model))
        except Exception:
            return  # broken loudly: also a detection
        with h.replay(h.stats.kept_positions):
            fresh = model.generate(**inputs, use_cache=False, **gen_kwargs(model))
    assert max_score_diff(cached, fresh) > 1e-3


# ------------------------------------------------------------------ renumbered positions


def decoder_input(model, inputs) -> torch.Tensor:
    """The embeddings the untouched model's first decoder layer receives for ``inputs``."""
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("embeds", args[0] if args else kwargs["hidden_states"])

    hook = model.get_decoder().layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return captured["embeds"]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_renumbered_input_stage_equals_feeding_the_shorter_sequence(family, attn):
    """What VisionZip/DivPrune's own code does: the model simply receives fewer tokens, numbered
    contiguously. Reference: the untouched model on the kept tokens' embeddings alone."""
    model = tiny(family, attn)
    inputs = make_inputs(model, batch=1)
    rec = recipe([{"phase": "input", "keep": 0.25, "scorer": "random", "renumber": True}])
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        got = model.generate(**inputs, **gen_kwargs(model))
        kept_idx = h.stats.output_positions[0]
    short = decoder_input(model, inputs)[:, kept_idx]
    with torch.no_grad():
        ref = model.generate(inputs_embeds=short, attention_mask=torch.ones(1, short.shape[1], dtype=torch.long), **gen_kwargs(model))
    n_new = len(got.scores)
    assert torch.equal(got.sequences[0, -n_new:], ref.sequences[0, -n_new:])
    assert max_score_diff(got, ref) < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_visionzip_layout_equals_feeding_dominant_then_contextual_tokens(attn):
    """VisionZip's own code splices ``cat([dominant, contextual])`` into the prompt, numbered
    contiguously. Reference: the untouched model fed the text, the kept tokens' states, then the
    contextual tokens' states (taken from the same recipe with ``place: in_place``, where each sits
    in its target's slot), in that order."""
    model = tiny("llava", attn)
    inputs = make_inputs(model, batch=1)

    def visionzip(place):
        merge = {"name": "contextual", "tokens": 3, "place": place}
        return recipe([{"phase": "input", "keep": 0.25, "scorer": "random", "renumber": True, "merge": merge}])

    with torch.no_grad(), tokencomp.apply(model, visionzip("in_place")) as h:
        compact_in_place = decoder_input(model, inputs)  # the hook runs after the engine's: compacted
        kept_idx, slots = h.stats.output_positions[0], h.stats.summary_positions[0][0]
    with torch.no_grad(), tokencomp.apply(model, visionzip("after")) as h:
        got = model.generate(**inputs, **gen_kwargs(model))
        assert torch.equal(h.stats.output_positions[0], kept_idx)
    vision = inputs["input_ids"][0, kept_idx] == model.config.image_token_id
    is_slot = torch.isin(kept_idx, slots)
    assert int(is_slot.sum()) == 3 and not bool(is_slot[~vision].any())
    first = int(vision.nonzero()[0])
    order = list(range(first)) + [int(i) for i in (vision & ~is_slot).nonzero().flatten()] + [
        int(i) for i in is_slot.nonzero().flatten()] + list(range(int(vision.nonzero()[-1]) + 1, len(kept_idx)))
    assert order != sorted(order)  # the contextual tokens do move
    short = compact_in_place[:, order]
    with torch.no_grad():
        ref = model.generate(inputs_embeds=short, attention_mask=torch.ones(1, short.shape[1], dtype=torch.long), **gen_kwargs(model))
    n_new = len(got.scores)
    assert torch.equal(got.sequences[0, -n_new:], ref.sequences[0, -n_new:])
    assert max_score_diff(got, ref) < 1e-4
    # Negative control: the in-place layout is another input.
    with torch.no_grad():
        other = model.generate(inputs_embeds=compact_in_place, attention_mask=torch.ones(1, short.shape[1], dtype=torch.long), **gen_kwargs(model))
    assert max_score_diff(other, ref) > 1e-4


@pytest.mark.parametrize("mode", ["mask", "evict"])
def test_decode_stage_after_a_renumbered_input_stage_equals_the_shorter_sequence(mode):
    """DyCoke's layout on LLaVA-OneVision (TTM before the LLM, renumbered as the official code, then
    decode-time KV pruning): the same as the untouched model fed the kept tokens alone with the decode
    stage only, whose vision tokens are the kept ones. Positions of the new tokens, the decode rows
    and the pruned columns all continue the renumbered sequence."""
    model = tiny("llava")
    inputs = make_inputs(model, batch=1)
    decode = {"phase": "decode", "layer": 3, "keep": 0.5, "mode": mode}
    rec = recipe([{"phase": "input", "keep": 0.5, "scorer": "random", "renumber": True}, decode])
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        got = model.generate(**inputs, **gen_kwargs(model))
        kept_idx = h.stats.output_positions[0]
    short = decoder_input(model, inputs)[:, kept_idx]
    vision = (inputs["input_ids"] == model.config.image_token_id)[:, kept_idx]
    assert 0 < int(vision.sum()) < int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad(), tokencomp.apply(model, recipe([decode])) as h2, h2.vision_mask(vision):
        ref = model.generate(inputs_embeds=short, attention_mask=torch.ones(1, short.shape[1], dtype=torch.long), **gen_kwargs(model))
    n_new = len(got.scores)
    assert torch.equal(got.sequences[0, -n_new:], ref.sequences[0, -n_new:])
    assert max_score_diff(got, ref) < 1e-4


def test_renumbering_differs_from_original_positions_and_batch_equals_single():
    model = tiny("llava")
    inputs = make_inputs(model, batch=3)
    stages = [{"phase": "input", "keep": 0.25, "scorer": "uniform", "renumber": True}, {"layer": 3, "keep": 0.5}]
    with torch.no_grad():
        with tokencomp.apply(model, recipe(stages)) as h:
            renum = model.generate(**inputs, **gen_kwargs(model))
            n_new = len(renum.scores)
            for b in range(3):
                solo = model.generate(**take_sample(inputs, b), **gen_kwargs(model))
                assert torch.equal(solo.sequences[0, -n_new:], renum.sequences[b, -n_new:])
                for x, y in zip(solo.scores, renum.scores):
                    finite = torch.isfinite(x[0])
                    assert (x[0][finite] - y[b][finite]).abs().max() < 1e-4
        stages[0] = dict(stages[0], renumber=False)
        with tokencomp.apply(model, recipe(stages)):
            original = model.generate(**inputs, **gen_kwargs(model))
    assert max_score_diff(renum, original) > 1e-4


def test_renumber_is_refused_for_m_rope_and_outside_input_stages():
    with pytest.raises(tokencomp.UnsupportedModelError, match="renumber"):
        tokencomp.apply(tiny("qwen2_vl"), recipe([{"phase": "input", "keep": 0.5, "scorer": "random", "renumber": True}]))
    with pytest.raises(RecipeError, match="`renumber:` is for input stages"):
        tokencomp.load_recipe(recipe([{"layer": 2, "keep": 0.5, "renumber": True}]))


def test_stats_carry_what_the_flop_count_needs_for_input_stages():
    """An input stage reduces layer 0 itself: FLOPs must come from the prompt's own vision count."""
    from tokencomp.flops import DecoderShape, prefill_flops, prefill_flops_compared

    model = tiny("llava")
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), tokencomp.apply(model, recipe([{"phase": "input", "keep": 0.25, "scorer": "random"}])) as h:
        model(**inputs)
        stats = h.stats
    n_vision = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert stats.input_vision_tokens == n_vision and stats.real_tokens == inputs["attention_mask"].sum(1).tolist()
    shape = DecoderShape.from_config(model.config)
    for b in range(2):
        row = stats.vision_tokens_per_layer[b]
        assert row[0] == n_vision[b] // 4
        untouched, compressed = prefill_flops_compared(shape, stats.real_tokens[b], n_vision[b], row)
        text = stats.real_tokens[b] - n_vision[b]
        assert untouched == prefill_flops(shape, [stats.real_tokens[b]] * len(row))
        assert compressed == prefill_flops(shape, [text + n_vision[b] // 4] * len(row)) < untouched
