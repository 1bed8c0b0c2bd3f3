"""LLaVA-NeXT / OneVision ``image_newline`` tokens (the ends of anyres grid rows): found on the
input embeddings, and treated by the recipe's ``newlines:`` policy."""

from __future__ import annotations

import pytest
import torch

import tokencomp
from tokencomp.errors import RecipeError
from tokencomp.testing import make_inputs

from test_engine import assert_rows_match_solo, gen_kwargs, tiny

STAGES = [{"phase": "input", "keep": 0.3, "scorer": "random"}, {"layer": 2, "keep": 0.25, "scorer": "random"}, {"layer": 4, "keep": 0.0}]


def recipe(policy):
    return {"newlines": policy, "schedule": {"stages": STAGES}}


def markers_of(model, inputs):
    seen = {}
    hook = model.get_decoder().layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("h", a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    vision = inputs["input_ids"] == model.config.image_token_id
    adapter = tokencomp.plugins.registry().adapter_for(model)
    return adapter.row_markers(model, seen["h"], vision)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_row_ends_are_found_at_every_grid_row(family):
    model = tiny(family)
    inputs = make_inputs(model, image_sizes=[(336, 336)])
    pos = torch.nonzero(markers_of(model, inputs)[0]).flatten()
    assert len(pos) == 8  # 8 rows of the unpadded anyres grid
    assert set(torch.diff(pos).tolist()) == {9}  # each row: 8 patches, then its newline
    assert markers_of(tiny("llava"), make_inputs(tiny("llava"))) is None  # LLaVA-1.5 has none


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_keep_policy_never_drops_a_row_end_and_rows_policy_keeps_those_of_kept_rows(family):
    model = tiny(family)
    inputs = make_inputs(model, batch=2, image_sizes=[(336, 336), (336, 336)])
    markers = markers_of(model, inputs)
    rows = torch.cumsum(markers.long(), 1) - markers.long()
    for policy in ("keep", "rows", "candidate"):
        with torch.no_grad(), tokencomp.apply(model, recipe(policy)) as h:
            model(**inputs)
            stats = h.stats
        for b in range(2):
            row_ends = set(torch.nonzero(markers[b]).flatten().tolist())
            for layer in (0, 2):
                kept = set(stats.kept_positions[layer][b].tolist())
                if policy == "keep":
                    assert row_ends <= kept
                elif policy == "rows":
                    live_rows = {int(rows[b, p]) for p in kept - row_ends}
                    assert kept & row_ends == {p for p in row_ends if int(rows[b, p]) in live_rows}
            if policy != "candidate":
                # keep 0 at layer 4: only row ends (and the prompt's last token) may remain
                left = set(stats.kept_positions[4][b].tolist())
                assert left <= row_ends | {inputs["input_ids"].shape[1] - 1}
    with torch.no_grad(), tokencomp.apply(model, recipe("candidate")) as h:
        model(**inputs)
        assert h.stats.vision_tokens_per_layer[0][-1] == 0  # ranked like any token: all dropped at keep 0


def test_rows_policy_batch_equals_single():
    model = tiny("llava_next")
    inputs = make_inputs(model, batch=3, image_sizes=[(56, 112), (112, 112), (112, 336)])
    with torch.no_grad(), tokencomp.apply(model, recipe("rows")) as h:
        batched = model.generate(**inputs, **gen_kwargs(model))
        assert_rows_match_solo(model, inputs, batched, scores=False)


def test_newline_policy_recipe_error():
    with pytest.raises(RecipeError, match="newlines must be one of candidate, keep, rows"):
        tokencomp.load_recipe({"newlines": "always", "schedule": {"stages": STAGES}})
