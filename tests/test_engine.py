"""Invariants of the engine on tiny random-weight models of all six families.

Each test compares the hooked model with something independent of the hooks: the untouched model
(keep = 1), a cache-free recomputation (cache correctness), per-sample runs (batching), or a
hand-written reference decoder loop (positions, masks).
"""

from __future__ import annotations

import threading

import pytest
import torch

import tokencomp
from tokencomp import masks as M
from tokencomp.testing import FAMILIES, build_tiny, make_inputs, suppress_ids, take_sample, vision_token_ids

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SCHEDULE = [{"layer": 1, "keep": 0.5}, {"layer": 3, "keep": 0.5}, {"layer": 5, "keep": 0.0}]


def recipe(scorer="v2drop", stages=SCHEDULE, selector="topk"):
    return {"scorer": scorer, "selector": selector, "schedule": {"stages": stages}}


_models: dict = {}


def tiny(family, attn="sdpa"):
    """Cached tiny model (building is cheap, but tests reuse the same weights on purpose)."""
    key = (family, attn)
    if key not in _models:
        _models[key] = build_tiny(family, attn=attn)
    return _models[key]


def no_stop(model):
    """Placeholder ids and EOS: random tiny models must neither emit image tokens nor stop early."""
    return suppress_ids(model) + [model.generation_config.eos_token_id]


def gen_kwargs(model, n=4):
    return dict(
        max_new_tokens=n,
        do_sample=False,
        suppress_tokens=no_stop(model),
        output_scores=True,
        return_dict_in_generate=True,
    )


def max_score_diff(a, b):
    diffs = [(x - y)[torch.isfinite(x)].abs().max().item() for x, y in zip(a.scores, b.scores)]
    return max(diffs)


def last_logits(model, inputs):
    """Logits of each sample's last real token (outputs are shorter than inputs after a drop)."""
    out = model(**inputs).logits
    mask = inputs["attention_mask"]
    return out, mask


# ------------------------------------------------------------------------------------------------
# keep = 1 is the identity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scorer", ["v2drop", "fastv"])
def test_identity_at_keep_1(family, attn, scorer):
    """keep = 1.0 at three stages is bit-identical to the untouched model: logits and tokens."""
    model = tiny(family, attn)
    stages = [{"layer": 1, "keep": 1.0}, {"layer": 3, "keep": 1.0}, {"layer": 5, "keep": 1.0}]
    for batch in (1, 2):
        inputs = make_inputs(model, batch=batch)
        with torch.no_grad():
            ref = model(**inputs).logits
            ref_gen = model.generate(**inputs, **gen_kwargs(model))
            with tokencomp.apply(model, recipe(scorer, stages)) as h:
                got = model(**inputs).logits
                got_gen = model.generate(**inputs, **gen_kwargs(model))
                assert h.stats.vision_tokens_per_layer[0][0] > 0
        assert torch.equal(ref, got)
        assert torch.equal(ref_gen.sequences, got_gen.sequences)
        for a, b in zip(ref_gen.scores, got_gen.scores):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# cached decoding equals recomputation without a cache
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scorer", ["v2drop", "fastv"])
def test_cache_equals_no_cache(family, attn, scorer):
    """Greedy generate with the compacted KV cache equals cache-free recomputation that replays the
    same selection, for batch 1 and a left-padded batch of 2."""
    model = tiny(family, attn)
    for batch in (1, 2):
        inputs = make_inputs(model, batch=batch)
        with torch.no_grad(), tokencomp.apply(model, recipe(scorer)) as h:
            cached = model.generate(**inputs, **gen_kwargs(model))
            dropped = h.stats.vision_tokens_per_layer
            with h.replay(h.stats.kept_positions):
                fresh = model.generate(**inputs, use_cache=False, **gen_kwargs(model))
        assert all(row[-1] == 0 and row[1] < row[0] for row in dropped)
        assert torch.equal(cached.sequences, fresh.sequences)
        assert max_score_diff(cached, fresh) < 1e-4


def test_v2drop_needs_no_replay():
    """V²Drop's vision scores are causal, so recomputation reselects the same tokens by itself."""
    model = tiny("qwen2_vl")
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")):
        cached = model.generate(**inputs, **gen_kwargs(model))
        fresh = model.generate(**inputs, use_cache=False, **gen_kwargs(model))
    assert torch.equal(cached.sequences, fresh.sequences)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_beam_search_cache_equals_no_cache(family):
    """Beam search reorders the cache; the per-layer selection metadata follows it."""
    model = tiny(family)
    inputs = make_inputs(model, batch=2)
    kw = dict(gen_kwargs(model), num_beams=3, do_sample=False)
    with torch.no_grad(), tokencomp.apply(model, recipe("fastv")) as h:
        cached = model.generate(**inputs, **kw)
        with h.replay(h.stats.kept_positions):
            fresh = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, fresh.sequences)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sampling_cache_equals_no_cache(family):
    """Sampling with the same seed draws the same tokens with and without the cache."""
    model = tiny(family)
    inputs = make_inputs(model, batch=2)
    kw = dict(max_new_tokens=5, do_sample=True, top_k=0, suppress_tokens=no_stop(model))
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")):
        torch.manual_seed(3)
        cached = model.generate(**inputs, **kw)
        torch.manual_seed(3)
        fresh = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, fresh)


# ------------------------------------------------------------------------------------------------
# batch equals per-sample
# ------------------------------------------------------------------------------------------------


def assert_rows_match_solo(model, inputs, batched, scores=True, handle=None, counts=None):
    """Every row of a batched ``generate`` equals its sample generated alone: the same new tokens, and
    (``scores``) the same logits within 1e-4; with ``handle`` and ``counts`` (the batch's
    vision_tokens_per_layer) also the same tokens per layer."""
    n_new = batched.sequences.shape[1] - inputs["input_ids"].shape[1]
    for b in range(inputs["input_ids"].shape[0]):
        solo = model.generate(**take_sample(inputs, b), **gen_kwargs(model))
        if counts is not None:
            assert handle.stats.vision_tokens_per_layer[0] == counts[b]
        assert torch.equal(solo.sequences[0, -n_new:], batched.sequences[b, -n_new:])
        for step, (x, y) in enumerate(zip(solo.scores, batched.scores) if scores else ()):
            finite = torch.isfinite(x[0])
            assert (x[0][finite] - y[b][finite]).abs().max() < 1e-4, f"sample {b} step {step}"


def assert_cache_equals_replay(model, handle, inputs):
    """Greedy ``generate`` with the compacted cache equals a cache-free recomputation that replays the
    same selection (kept and summary positions); returns the cached output."""
    cached = model.generate(**inputs, **gen_kwargs(model))
    stats = handle.stats
    with handle.replay(stats):
        fresh = model.generate(**inputs, use_cache=False, **gen_kwargs(model))
    assert torch.equal(cached.sequences, fresh.sequences)
    assert max_score_diff(cached, fresh) < 1e-4
    return cached


def _batch_vs_single(model, inputs, rec, padding):
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        batched = model.generate(**inputs, **gen_kwargs(model))
        assert_rows_match_solo(model, inputs, batched, handle=h, counts=h.stats.vision_tokens_per_layer)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single(family, attn):
    """Left-padded batch of 3 with different text lengths: each row equals its solo run."""
    model = tiny(family, attn)
    inputs = make_inputs(model, batch=3, padding="left")
    _batch_vs_single(model, inputs, recipe("fastv"), "left")


RAGGED = {
    "qwen2_vl": [(112, 224), (56, 112), (112, 112)],
    "qwen2_5_vl": [(112, 224), (56, 112), (112, 112)],
    "qwen3_vl": [(112, 224), (56, 112), (112, 112)],
    "llava_next": [(56, 112), (112, 112), (56, 112)],
    "llava_onevision": [(56, 112), (112, 112), (56, 112)],
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(RAGGED))
def test_ragged_batch_equals_single(family, attn):
    """Samples with different numbers of vision tokens (filler slots keep the batch rectangular)."""
    model = tiny(family, attn)
    inputs = make_inputs(model, batch=3, image_sizes=RAGGED[family])
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")) as h:
        model(**inputs)
        counts = [row[0] for row in h.stats.vision_tokens_per_layer]
    assert len(set(counts)) > 1, counts
    _batch_vs_single(model, inputs, recipe("v2drop"), "left")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision"])
def test_multi_image_batch_equals_single(family):
    """Several images per sample, quota selector: per-sample results match solo runs."""
    model = tiny(family)
    inputs = make_inputs(model, batch=2, n_images=2)
    _batch_vs_single(model, inputs, recipe("v2drop", selector="quota"), "left")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_right_padding_forward(family):
    """Right padding: the last real token's logits equal the solo run."""
    model = tiny(family)
    inputs = make_inputs(model, batch=2, padding="right")
    with torch.no_grad(), tokencomp.apply(model, recipe("fastv")) as h:
        out = model(**inputs).logits
        pos = h.stats.output_positions
        for b in range(2):
            last = int(inputs["attention_mask"][b].nonzero().max())
            row = int((pos[b] == last).nonzero())
            solo = model(**take_sample(inputs, b)).logits[0, -1]
            assert (out[b, row] - solo).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen3_vl"])
def test_video_batch(family):
    """Video inputs compress (per-frame groups for the quota selector) and match solo runs."""
    model = tiny(family)
    inputs = make_inputs(model, batch=2, video=True, n_images=0)
    _batch_vs_single(model, inputs, recipe("v2drop", selector="quota"), "left")


# ------------------------------------------------------------------------------------------------
# KV cache, stats, text-only, decode
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_lengths_follow_schedule(family):
    """Each layer's KV cache holds exactly the tokens that layer processed; layer 0 the full prompt."""
    model = tiny(family)
    inputs = make_inputs(model, batch=1)
    L = inputs["input_ids"].shape[1]
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")) as h:
        out = model(**inputs, use_cache=True)
        counts = h.stats.vision_tokens_per_layer[0]
    cache = out.past_key_values
    n_vis = counts[0]
    lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths == [L - n_vis + c for c in counts]
    assert cache.get_seq_length() == L
    assert counts == [n_vis, n_vis // 2, n_vis // 2, n_vis // 4, n_vis // 4, 0]


def test_stats_kept_positions_are_original_vision_positions():
    model = tiny("llava")
    inputs = make_inputs(model, batch=2)
    vision = _is_vis(model, inputs)
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")) as h:
        model(**inputs)
    stats = h.stats
    assert [set(per_stage) for per_stage in stats.kept_positions_per_stage] == [{1, 3, 5}] * 2
    for b in range(2):
        pos1 = stats.kept_positions_per_stage[b][1]
        assert bool(vision[b, pos1].all())
        assert len(pos1) == stats.vision_tokens_per_layer[b][1]
        assert set(stats.kept_positions_per_stage[b][3].tolist()) <= set(pos1.tolist())
        assert len(stats.kept_positions_per_stage[b][5]) == 0
    assert stats.as_dict()["average_vision_tokens"][0] == sum(stats.vision_tokens_per_layer[0]) / 6


def test_stats_stage_first_views_are_the_per_sample_records_read_only():
    """``kept_positions[layer][b]`` / ``summary_positions[layer][b]`` (earlier versions' orientation)
    are read-only views of the per-sample fields, and ``replay`` takes the Stats itself."""
    model = tiny("llava")
    inputs = make_inputs(model, batch=2)
    stages = [{"layer": 1, "keep": 0.5, "merge": {"name": "contextual", "tokens": 2}}, {"layer": 3, "keep": 0.5}]
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop", stages)) as h:
        model(**inputs)
        stats = h.stats
        assert list(stats.kept_positions) == [1, 3] and list(stats.summary_positions) == [1]
        for layer in (1, 3):
            for b in range(2):
                assert stats.kept_positions[layer][b] is stats.kept_positions_per_stage[b][layer]
        assert [len(stats.summary_positions[1][b]) for b in range(2)] == [2, 2]
        with pytest.raises(AttributeError):
            stats.kept_positions = {}
        with pytest.raises(AttributeError):
            stats.summary_positions = {}
        kw = gen_kwargs(model, 2)
        with h.replay(stats):
            by_stats = model.generate(**inputs, use_cache=False, **kw)
        with h.replay(stats.kept_positions, stats.summary_positions):
            by_dicts = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(by_stats.sequences, by_dicts.sequences)


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_text_only_prompt_untouched(family):
    """A prompt without vision tokens is not touched at all (bit-identical)."""
    model = tiny(family)
    inputs = make_inputs(model, batch=2, n_images=0)
    with torch.no_grad():
        ref = model.generate(**inputs, **gen_kwargs(model))
        with tokencomp.apply(model, recipe("v2drop")) as h:
            got = model.generate(**inputs, **gen_kwargs(model))
            assert h.stats.vision_tokens_per_layer == []
    assert torch.equal(ref.sequences, got.sequences)


def test_explicit_vision_mask_for_inputs_embeds():
    """inputs_embeds-only calls compress when given a vision mask, and warn without one."""
    model = tiny("llava")
    inputs = make_inputs(model, batch=1)
    vision = _is_vis(model, inputs)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")) as h:
        with h.vision_mask(vision):
            out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        assert out.shape[1] < embeds.shape[1]
        assert h.stats.vision_tokens_per_layer[0][0] == int(vision.sum())
        with pytest.warns(UserWarning, match="vision mask"):
            full = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        assert full.shape[1] == embeds.shape[1]


# ------------------------------------------------------------------------------------------------
# concurrency
# ------------------------------------------------------------------------------------------------


def test_threads_equal_sequential():
    """Two threads generating at once on one compressed model equal running one after the other."""
    model = tiny("qwen2_vl")
    a = make_inputs(model, batch=2, seed=1)
    b = make_inputs(model, batch=1, seed=2, image_sizes=[(56, 112)])
    kw = dict(max_new_tokens=6, do_sample=False, suppress_tokens=no_stop(model))
    with torch.no_grad(), tokencomp.apply(model, recipe("fastv")):
        seq_a = model.generate(**a, **kw)
        seq_b = model.generate(**b, **kw)
        results, errors = {}, []

        def run(name, inputs):
            try:
                with torch.no_grad():
                    for _ in range(3):
                        results.setdefault(name, []).append(model.generate(**inputs, **kw))
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=("a", a)), threading.Thread(target=run, args=("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert all(torch.equal(x, seq_a) for x in results["a"])
    assert all(torch.equal(x, seq_b) for x in results["b"])


# ------------------------------------------------------------------------------------------------
# apply / remove
# ------------------------------------------------------------------------------------------------


def _hook_count(model):
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(getattr(m, "_forward_hooks_always_called", {}))
        for m in model.modules()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_exactly(family):
    """remove() leaves no hook, attribute or config change, and outputs are bit-identical again."""
    model = tiny(family)
    inputs = make_inputs(model, batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits  # first: transformers installs its own output-recording hooks on a first forward
    dicts = {name: set(vars(m)) for name, m in model.named_modules()}
    hooks_before = _hook_count(model)
    text_cfg = model.config.get_text_config()
    impl = text_cfg._attn_implementation
    with torch.no_grad():
        handle = tokencomp.apply(model, recipe("sparsevlm"))
        assert _hook_count(model) > hooks_before
        changed = model(**inputs).logits
        assert changed.shape != ref.shape
        handle.remove()
        again = model(**inputs).logits
    assert torch.equal(ref, again)
    assert _hook_count(model) == hooks_before
    assert {name: set(vars(m)) for name, m in model.named_modules()} == dicts
    assert text_cfg._attn_implementation == impl


def test_engine_internals_are_private_and_old_names_still_read():
    """What used to be public engine state (``handle.num_layers``, ...) reads with a DeprecationWarning."""
    model = tiny("llava")
    with tokencomp.apply(model, recipe()) as h:
        assert {"model", "recipe", "adapter", "profile", "overhead_s"} <= set(vars(h))
        assert not {"layers", "num_layers", "stage_at", "vision_ids", "kind"} & set(vars(h))
        with pytest.warns(DeprecationWarning, match=r"Handle.num_layers is internal"):
            assert h.num_layers == h._num_layers == 6
        with pytest.warns(DeprecationWarning):
            assert h.current() is None
        with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
            h.no_such_thing


def test_context_manager_removes_on_exception():
    model = tiny("llava")
    before = _hook_count(model)
    with pytest.raises(KeyError):
        with tokencomp.apply(model, recipe()):
            raise KeyError("boom")
    assert _hook_count(model) == before
    tokencomp.apply(model, recipe()).remove()  # can be applied again


def test_second_apply_is_an_error_until_removed():
    model = tiny("llava")
    other = tiny("qwen2_vl")
    with tokencomp.apply(model, recipe()):
        with pytest.raises(RuntimeError, match="already applied"):
            tokencomp.apply(model, recipe())
        with tokencomp.apply(other, recipe()):  # same recipe on another model is fine
            pass
    tokencomp.apply(model, recipe()).remove()


def test_unsupported_model_lists_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(tokencomp.UnsupportedModelError) as err:
        tokencomp.apply(model, recipe(stages=[{"layer": 1, "keep": 0.5}]))
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and "Qwen3VLForConditionalGeneration" in msg and "register_model_adapters" in msg
    assert _hook_count(model) == 0


def test_layer_beyond_depth_rejected_before_any_forward():
    model = tiny("llava")
    before = _hook_count(model)
    with pytest.raises(tokencomp.RecipeError, match=r"has 6 layers"):
        tokencomp.apply(model, recipe(stages=[{"layer": 2, "keep": 0.5}, {"layer": 6, "keep": 0.1}]))
    assert _hook_count(model) == before


def test_static_cache_rejected():
    model = build_tiny("llava")
    model.generation_config.cache_implementation = "static"
    with pytest.raises(tokencomp.UnsupportedModelError, match="cache"):
        tokencomp.apply(model, recipe())
    model.generation_config.cache_implementation = None
    inputs = make_inputs(model)
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=128)
    with tokencomp.apply(model, recipe()), pytest.raises(tokencomp.UnsupportedModelError, match="StaticCache"):
        model(**inputs, past_key_values=cache)


# ------------------------------------------------------------------------------------------------
# hand-written reference forward
# ------------------------------------------------------------------------------------------------


def _reference_forward(model, inputs, kept, renumber=False):
    """Independent decoder loop: drop the recorded tokens, gather the original positions, recompute
    RoPE from them (no gathered tables), build a fresh padded causal mask over kept tokens."""
    decoder = model.get_decoder()
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise _Stop

    h = decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    embeds = captured["inputs_embeds"]
    B, L, _ = embeds.shape
    pos = captured.get("position_ids")
    if pos is None:
        pos = torch.arange(L).expand(B, L)
    if pos.ndim == 2:
        pos = pos[None]
    valid = inputs["attention_mask"].bool()
    idx = torch.arange(L).expand(B, L)
    hidden = embeds
    for i, layer in enumerate(decoder.layers):
        if i in kept:
            rows = []
            for b in range(B):
                keep = [j for j in idx[b].tolist() if not bool(_is_vis(model, inputs)[b, j]) or j in set(kept[i][b].tolist())]
                rows.append(keep)
            assert len({len(r) for r in rows}) == 1, "reference supports equal counts only"
            new_idx = torch.tensor(rows)
            sel = torch.stack([(idx[b][:, None] == new_idx[b][None]).float().argmax(0) for b in range(B)])
            hidden = torch.stack([hidden[b, sel[b]] for b in range(B)])
            idx = new_idx
        p = torch.stack([pos[r].gather(1, idx) for r in range(pos.shape[0])])
        if renumber:
            p = torch.arange(idx.shape[1]).expand_as(p) + pos[..., :1]
        rope_pos = p if p.shape[0] > 1 else p[0]
        if rope_pos.ndim == 3 and rope_pos.shape[0] == 4:
            rope_pos = rope_pos[1:]
        cos, sin = decoder.rotary_emb(hidden, rope_pos)
        S = idx.shape[1]
        key_ok = valid.gather(1, idx)
        mask = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None] & key_ok[:, None, None, :]
        mask = mask | torch.eye(S, dtype=torch.bool)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None)
        if hasattr(decoder, "_deepstack_process") and captured.get("deepstack_visual_embeds") is not None:
            ds = captured["deepstack_visual_embeds"]
            if i < len(ds):
                full = captured["visual_pos_masks"]
                rank = (torch.cumsum(full.flatten().long(), 0) - 1).view_as(full)
                km = full.gather(1, idx)
                hidden = hidden.clone()
                hidden[km] = hidden[km] + ds[i][rank.gather(1, idx)[km]]
    hidden = decoder.norm(hidden)
    return model.lm_head(hidden), idx


class _Stop(Exception):
    pass


def _is_vis(model, inputs):
    return torch.isin(inputs["input_ids"], torch.tensor(vision_token_ids(model)))


@pytest.mark.parametrize("family", FAMILIES)
def test_against_hand_written_reference(family):
    """The hooked model equals a decoder loop written from scratch (≤ 1e-5); renumbering the
    positions instead of keeping the original ones is detected (> 1e-3): a negative control."""
    model = tiny(family, "sdpa")
    inputs = make_inputs(model, batch=2, text_lens=[(3, 4), (3, 4)])
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")) as h:
        got = model(**inputs).logits
        kept = h.stats.kept_positions
        out_pos = h.stats.output_positions
    with torch.no_grad():
        ref, idx = _reference_forward(model, inputs, kept)
        renum, _ = _reference_forward(model, inputs, kept, renumber=True)
        untouched = model(**inputs).logits
    assert torch.equal(idx, out_pos)
    valid = inputs["attention_mask"].bool().gather(1, idx)
    assert (got - ref)[valid].abs().max() < 1e-5
    assert (got - renum)[valid].abs().max() > 1e-3
    assert (got[:, -1] - untouched[:, -1]).abs().max() > 1e-3  # pruning did change something


# ------------------------------------------------------------------------------------------------
# negative controls: the invariants catch broken positions and a broken decode mask
# ------------------------------------------------------------------------------------------------


def _cache_vs_recompute_diff(model, inputs):
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")) as h:
        cached = model.generate(**inputs, **gen_kwargs(model, 3))
        with h.replay(h.stats.kept_positions):
            fresh = model.generate(**inputs, use_cache=False, **gen_kwargs(model, 3))
    return max_score_diff(cached, fresh)


def test_negative_control_decode_mask_not_remapped(monkeypatch):
    """Sabotage: hand the full-length decode mask to every layer. Padded decoding must fail."""
    model = tiny("llava", "eager")
    inputs = make_inputs(model, batch=2)
    assert _cache_vs_recompute_diff(model, inputs) < 1e-4
    monkeypatch.setattr(M, "remap_decode_mask", lambda mask, *a, **k: mask)
    with pytest.raises(RuntimeError):
        _cache_vs_recompute_diff(model, inputs)


def test_negative_control_decode_mask_sees_filler_slots(monkeypatch):
    """Sabotage: remap decode columns but forget to hide filler slots. The ragged batch-vs-single
    invariant must catch it."""
    model = tiny("qwen2_vl")
    inputs = make_inputs(model, batch=3, image_sizes=RAGGED["qwen2_vl"])
    real = M.remap_decode_mask

    def leaky(mask, idx, alive, *args, **kwargs):
        return real(mask, idx, torch.ones_like(alive), *args, has_dead=False)

    monkeypatch.setattr(M, "remap_decode_mask", leaky)
    with pytest.raises(AssertionError):
        _batch_vs_single(model, inputs, recipe("v2drop"), "left")


def test_negative_control_renumbered_positions(monkeypatch):
    """Sabotage: slice the rotary tables (renumbered positions) instead of gathering them. The
    cache-vs-recompute invariant stays (both paths renumber) but the reference test's control shows
    the difference; here we check the logits move measurably."""
    model = tiny("qwen2_vl")
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")):
        good = model(**inputs).logits
    real = M.gather_seq

    def sliced(x, idx, dim):
        if x.ndim == 3 and dim == 1 and x.dtype.is_floating_point and x.shape[-1] != good.shape[-1]:
            return x.narrow(1, 0, idx.shape[1]).expand(idx.shape[0], -1, -1)
        return real(x, idx, dim)

    monkeypatch.setattr(M, "gather_seq", sliced)
    with torch.no_grad(), tokencomp.apply(model, recipe("v2drop")):
        bad = model(**inputs).logits
    assert (good[:, -1] - bad[:, -1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# mask gather units
# ------------------------------------------------------------------------------------------------


def test_gather_prefill_mask_unit():
    """Rows and columns are gathered by original index, for an interior (non-causal) pattern too."""
    torch.manual_seed(0)
    B, L = 2, 7
    full = torch.rand(B, 1, L, L) > 0.4
    idx = torch.tensor([[0, 2, 3, 6], [1, 2, 4, 5]])
    alive = torch.ones(2, 4, dtype=torch.bool)
    got = M.gather_prefill_mask(full, idx, alive, M.SDPA, torch.float32)
    for b in range(B):
        assert torch.equal(got[b, 0], full[b, 0][idx[b]][:, idx[b]])
    flash = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    assert torch.equal(M.gather_prefill_mask(flash, idx, alive, M.FLASH, torch.float32), torch.stack([flash[b][idx[b]] for b in range(B)]))
    assert M.gather_prefill_mask(None, idx, alive, M.SDPA, torch.float32) is None


def test_gather_prefill_mask_dead_slots():
    """Filler slots are hidden as keys from every other row but still see themselves (no NaN rows)."""
    idx = torch.tensor([[0, 1, 2, 3]])
    alive = torch.tensor([[True, False, True, True]])
    for kind, dtype in ((M.SDPA, torch.float32), (M.EAGER, torch.float32)):
        m = M.gather_prefill_mask(None, idx, alive, kind, dtype)
        allowed = m[0, 0] if m.dtype == torch.bool else m[0, 0] == 0
        assert not bool(allowed[2, 1]) and not bool(allowed[3, 1])
        assert bool(allowed[1, 1]) and bool(allowed[3, 2]) and not bool(allowed[0, 2])
    flash = M.gather_prefill_mask(None, idx, alive, M.FLASH, torch.float32)
    assert flash.tolist() == [[True, False, True, True]]


def test_remap_decode_mask_unit():
    """Decode columns: the layer's kept prefix columns, then every token added since."""
    P, t = 6, 2
    full = torch.arange(P + t, dtype=torch.float32).expand(2, 1, 1, P + t).clone()
    idx = torch.tensor([[0, 3, 5], [1, 2, 5]])
    alive = torch.tensor([[True, True, True], [True, False, True]])
    got = M.remap_decode_mask(full, idx, alive, P, P + t, 1, M.EAGER, torch.float32)
    assert got[0, 0, 0].tolist() == [0, 3, 5, 6, 7]
    row = got[1, 0, 0]
    assert row[[0, 2, 3, 4]].tolist() == [1, 5, 6, 7] and row[1] == torch.finfo(torch.float32).min
    assert M.remap_decode_mask(None, idx[:1], alive[:1], P, P + t, 1, M.SDPA, torch.float32) is None
    synth = M.remap_decode_mask(None, idx, alive, P, P + t, 1, M.SDPA, torch.float32)
    assert synth[1, 0, 0].tolist() == [True, False, True, True, True]


def test_unsupported_kernels_and_layers_rejected_at_apply():
    """flex attention and sliding-window layers are rejected before any forward, with the reason."""
    model = build_tiny("qwen2_vl")
    text = model.config.get_text_config()
    text._attn_implementation_internal = "flex_attention"
    with pytest.raises(tokencomp.UnsupportedModelError, match="flex_attention"):
        tokencomp.apply(model, recipe())
    text._attn_implementation_internal = "sdpa"
    text.layer_types = ["sliding_attention"] * text.num_hidden_layers
    with pytest.raises(tokencomp.UnsupportedModelError, match="sliding-window"):
        tokencomp.apply(model, recipe())
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    tokencomp.apply(model, recipe()).remove()


def test_labels_rejected():
    model = tiny("llava")
    inputs = make_inputs(model)
    with tokencomp.apply(model, recipe()), pytest.raises(tokencomp.UnsupportedModelError, match="labels"):
        model(**inputs, labels=inputs["input_ids"])


@pytest.mark.parametrize("scorer", ["random", "none", "uniform", "sparsevlm", "pdrop"])
def test_every_scorer_batch_equals_single(scorer):
    """Batch invariance holds for every built-in scorer (the random draw is per token index)."""
    model = tiny("qwen2_vl")
    inputs = make_inputs(model, batch=3, image_sizes=RAGGED["qwen2_vl"])
    _batch_vs_single(model, inputs, recipe(scorer), "left")


def _full_positions(model, full):
    """Position ids the model itself uses for ``full`` (M-RoPE for Qwen), read off its decoder."""
    got = {}

    def grab(module, args, kwargs):
        got["pos"] = kwargs.get("position_ids")
        raise _Stop

    handle = model.get_decoder().register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**full)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["pos"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_vl", "qwen3_vl"])
def test_follow_up_chunk_on_compressed_cache(family, attn):
    """A multi-token follow-up (next turn) on a compressed cache: every layer sees the right mask
    columns, so its logits equal recomputing the whole conversation with the same selection."""
    model = tiny(family, attn)
    inputs = make_inputs(model, batch=2)
    B, L = inputs["input_ids"].shape
    chunk = torch.randint(20, 200, (B, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(chunk)], dim=1)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], chunk], 1), attention_mask=mask)
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(chunk)], 1)
    with torch.no_grad():
        pos = _full_positions(model, full)
        pos = None if pos is None else pos[..., L:]  # None: Llama/Qwen2 count on from the cache length
        with tokencomp.apply(model, recipe("v2drop")) as h:
            cache = model(**inputs, use_cache=True).past_key_values
            kept = h.stats.kept_positions
            follow = model(input_ids=chunk, attention_mask=mask, cache=cache, use_cache=True, position_ids=pos).logits
            assert cache.layers[-1].get_seq_length() < L  # the cache stayed compressed
            with h.replay(kept):
                again = model(**full).logits
    assert (follow - again[:, -5:]).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_quota_keeps_every_video_frame(family):
    """With the quota selector every video frame keeps a token even at a tiny budget, and forward
    and generate (which hands the model pre-encoded media) form the same frame groups."""
    model = tiny(family)
    inputs = make_inputs(model, batch=2, video=True, n_images=1)
    rec = recipe("v2drop", stages=[{"layer": 2, "keep": 0.2}], selector="quota")
    with torch.no_grad(), tokencomp.apply(model, rec) as h:
        model(**inputs)
        forward = [t.clone() for t in h.stats.kept_positions[2]]
        model.generate(**inputs, max_new_tokens=1, do_sample=False, suppress_tokens=no_stop(model))
        generated = h.stats.kept_positions[2]
        groups = h.adapter.vision_groups(_is_vis(model, inputs), inputs)
    for b in range(2):
        assert torch.equal(forward[b], generated[b])
        frames = set(groups[b][groups[b] >= 0].tolist())
        assert len(frames) > 2
        assert set(groups[b][forward[b]].tolist()) == frames


def test_stats_are_per_thread():
    """Each thread reads the stats of its own last forward."""
    model = tiny("qwen2_vl")
    small = make_inputs(model, batch=1, image_sizes=[(56, 112)])
    large = make_inputs(model, batch=1, image_sizes=[(112, 224)])
    seen = {}
    with torch.no_grad(), tokencomp.apply(model, recipe()) as h:
        barrier = threading.Barrier(2)

        def run(name, inputs):
            with torch.no_grad():
                model(**inputs)
            barrier.wait()  # both forwards done before either reads
            seen[name] = h.stats.vision_tokens_per_layer[0][0]

        threads = [threading.Thread(target=run, args=a) for a in (("small", small), ("large", large))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert "Handle applied" in repr(h)
    assert seen == {"small": 8, "large": 32}


def test_misbehaving_scorer_plugin_gets_a_clear_error(in_process_plugin):
    """A third-party scorer returning the wrong shape is named in the error."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Flat(tokencomp.Scorer):
        """Returns one score per sample instead of per token."""

        name = "flat_test"

        def score(self, view):
            return view.hidden.sum((1, 2))

    class Plugin:
        @tokencomp.hookimpl
        def register_scorers(self, register):
            register(Flat)

    in_process_plugin(Plugin(), "flat-test")
    model = tiny("llava")
    with tokencomp.apply(model, recipe("flat_test")), pytest.raises(tokencomp.TokencompError, match="flat_test.*expected a \\(B, S\\)"):
        model(**make_inputs(model))
