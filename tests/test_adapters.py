"""Model adapters: built from the model's config, immutable, the one place that reads the vision
placeholder ids, and what their patches may read of the engine (``Handle.selection``)."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import tokencomp
from tokencomp.errors import UnsupportedModelError
from tokencomp.interfaces import ModelAdapter, Selection
from tokencomp.plugins import registry
from tokencomp.testing import FAMILIES, IMAGE_ID, VIDEO_ID, build_tiny, make_inputs

VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_is_built_from_the_config_and_immutable(family):
    model = build_tiny(family, layers=2)
    adapter = registry().adapter_for(model)
    assert adapter.image_token_id == IMAGE_ID
    assert adapter.video_token_id == (VIDEO_ID if family in VIDEO_FAMILIES else None)
    assert adapter.vision_token_ids() == [IMAGE_ID] + ([VIDEO_ID] if family in VIDEO_FAMILIES else [])
    assert adapter.vision_token_ids(model) == adapter.vision_token_ids()  # callers that still pass the model
    with pytest.raises(dataclasses.FrozenInstanceError):
        adapter.image_token_id = 7
    # apply() installs patches and hooks but leaves the adapter as it was built
    before = dataclasses.asdict(adapter)
    with torch.no_grad(), tokencomp.apply(model, {"schedule": {"stages": [{"layer": 1, "keep": 0.5}]}}) as handle:
        model(**make_inputs(model))
    assert dataclasses.asdict(handle.adapter) == before == dataclasses.asdict(registry().adapter_for(model))


def test_family_fields_come_from_the_config():
    onevision = registry().adapter_for(build_tiny("llava_onevision", layers=1))
    assert onevision.frame_tokens == 4  # 56 px tile / 14 px patches = 4x4, pooled to 2x2
    qwen = registry().adapter_for(build_tiny("qwen2_vl", layers=1))
    assert (qwen.merge, qwen.temporal_patch) == (2, 2)


@pytest.mark.parametrize("attrs, ids", [
    ({"image_token_index": 5}, [5]),  # the older spelling
    ({"image_token_id": 5, "video_token_index": 9}, [5, 9]),
    ({"image_token_id": 5, "video_token_id": 5}, [5]),  # one id for both: listed once
    ({}, []),
])
def test_placeholder_ids_are_read_in_either_spelling(attrs, ids):
    assert ModelAdapter.from_config(types.SimpleNamespace(**attrs)).vision_token_ids() == ids


def test_adapter_class_is_found_for_subclasses_and_none_otherwise():
    model = build_tiny("qwen3_vl", layers=1)
    sub = type("MyQwen", (type(model),), {})
    assert registry().adapter_class(sub) is registry().adapter_class(type(model))
    assert registry().adapter_class(torch.nn.Linear) is None
    with pytest.raises(UnsupportedModelError, match="no tokencomp model adapter for Linear"):
        registry().adapter_for(torch.nn.Linear(1, 1))


def test_an_adapter_without_a_layout_says_so():
    model = build_tiny("llava", layers=1)
    with pytest.raises(UnsupportedModelError, match="draws no token layout"):
        ModelAdapter().token_layout(model, make_inputs(model))


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_selection_is_what_the_current_prefill_carries(family):
    """``handle.selection()``: None outside a prefill and before its first drop; after a drop the
    original positions and live slots of the tokens each layer gets (the kept positions recorded in
    the stats are exactly its live vision tokens)."""
    model = build_tiny(family, layers=4)
    inputs = make_inputs(model, batch=2, image_sizes=[(112, 224), (56, 112)] if family == "qwen3_vl" else None)
    seen = {}
    stages = [{"layer": 2, "keep": 0.5}]
    with tokencomp.apply(model, {"schedule": {"stages": stages}}) as handle:
        def look(i):
            return lambda module, args: seen.__setitem__(i, handle.selection())

        hooks = [layer.register_forward_pre_hook(look(i)) for i, layer in enumerate(model.get_decoder().layers)]
        try:
            assert handle.selection() is None
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        kept = handle.stats.kept_positions[2]
    # the engine's hook of a layer runs before ours: layer 2 already gets the compacted sequence
    assert seen[0] is None and seen[1] is None
    for i in (2, 3):
        sel = seen[i]
        assert isinstance(sel, Selection) and sel.positions.shape == sel.alive.shape
        vision = torch.isin(inputs["input_ids"], torch.tensor(handle.adapter.vision_token_ids()))
        for b in range(2):
            live = sel.positions[b][sel.alive[b]]
            assert live.tolist() == sorted(live.tolist())
            assert live[vision[b][live]].tolist() == kept[b].tolist()
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[2].positions = None


def test_takes_video_asks_the_adapter():
    from tokencomp.runner import takes_video
    from tokencomp.testing import tiny_config

    assert [takes_video(tiny_config(f, layers=1)) for f in FAMILIES] == [f in VIDEO_FAMILIES for f in FAMILIES]


def test_token_runs_end_where_the_id_changes():
    """The adapters' run splitter (an image placeholder run may touch a video run)."""
    from tokencomp import interfaces
    from tokencomp.masks import token_runs

    mask = torch.tensor([0, 1, 1, 1, 0, 1], dtype=torch.bool)
    ids = torch.tensor([9, 3, 3, 4, 9, 3])
    assert token_runs(mask) == [(1, 4, None), (5, 6, None)]
    assert token_runs(mask, ids) == [(1, 3, 3), (3, 4, 4), (5, 6, 3)]
    assert interfaces.token_runs is token_runs  # still importable where adapters used to find it


def test_every_adapted_class_has_a_tiny_family_and_back():
    """The synthetic family table and the adapters name the same model classes: a new adapter
    comes with a tiny model to test it on (and every tiny model is adapted)."""
    from tokencomp.synthetic import FAMILY_SPECS

    assert {spec.model_class.__name__ for spec in FAMILY_SPECS.values()} == set(registry().supported_classes())
