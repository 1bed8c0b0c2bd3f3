"""The Qwen2-VL video recipes of the video methods (DyCoke, FastVID, HoliTom, PruneVid) on tiny Qwen2-VL,
Qwen2.5-VL and Qwen3-VL models with a longer video than the shared fixtures' (8 temporal frames of 36
tokens; Qwen3-VL writes a timestamp between frames): each sample keeps exactly the stated counts, every
frame is seen as a frame (the methods keep tokens in every one of them, where a plain top-k over
undetected frames empties the late ones), and a padded batch keeps the same tokens as each sample
alone. Loading, averages and the short end-to-end run on the shared inputs: tests/test_shipped_recipes.py."""

from __future__ import annotations

import pytest
import torch

import tokencomp
import tokencomp.synthetic.qwen_vl as qwen_vl
from tokencomp.accounting import tokens_per_layer
from tokencomp.testing import build_tiny, make_inputs, suppress_ids, take_sample

RECIPES = [
    name
    for name in tokencomp.shipped_recipes()
    if name.split("/")[0] in ("dycoke", "fastvid", "holitom", "prunevid") and "/qwen2-vl-7b-video" in name
]
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FRAMES, SIZE = 16, (168, 168)  # grid (8, 12, 12): 8 temporal frames of 6 x 6 merged tokens
_models: dict = {}


def test_every_method_has_its_qwen_recipes():
    assert sorted(RECIPES) == sorted(
        [
            "dycoke/qwen2-vl-7b-video",
            "dycoke/qwen2-vl-7b-video-evict",
            "fastvid/qwen2-vl-7b-video",
            "fastvid/qwen2-vl-7b-video-20",
            "holitom/qwen2-vl-7b-video-10",
            "holitom/qwen2-vl-7b-video-15",
            "holitom/qwen2-vl-7b-video-20",
            "prunevid/qwen2-vl-7b-video",
        ]
    )


def test_fastvid_qwen_recipe_has_the_authors_qwen_setting():
    (stage,) = tokencomp.load_recipe("fastvid/qwen2-vl-7b-video").stages(28)
    assert stage.phase == "input" and stage.keep == 0.27
    assert (stage.scorer.c, stage.scorer.tau, stage.scorer.d, stage.scorer.p) == (8, 0.84, 0.4, 4)
    assert (stage.merger.tau, stage.merger.beta) == (0.84, 0.6)


def model_and_inputs(family, monkeypatch):
    if family not in _models:
        _models[family] = build_tiny(family, layers=28)
    model = _models[family]
    monkeypatch.setattr(qwen_vl, "VIDEO_FRAMES", FRAMES)
    monkeypatch.setattr(qwen_vl, "VIDEO_SIZE", SIZE)
    # Video only: tokens outside a video (an image) always rank first in these scorers, and would
    # take most of a small budget.
    inputs = make_inputs(model, batch=2, padding="left", seed=5, video=True, n_images=0)
    assert inputs["video_grid_thw"].tolist() == [[8, 12, 12]] * 2
    return model, inputs


def frames_of(inputs, b, model):
    """Positions of each temporal frame of sample ``b``'s video."""
    video = (inputs["input_ids"][b] == model.config.video_token_id).nonzero().flatten()
    return video.view(8, 36)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", RECIPES)
def test_qwen_video_recipe(name, family, monkeypatch):
    model, inputs = model_and_inputs(family, monkeypatch)
    recipe = tokencomp.load_recipe(name)
    stages = recipe.stages(28)
    ids = torch.tensor([model.config.image_token_id, model.config.video_token_id])
    n = torch.isin(inputs["input_ids"], ids).sum(1).tolist()
    with torch.no_grad(), tokencomp.apply(model, recipe) as handle:
        model(**inputs)
        assert handle.stats.vision_tokens_per_layer == [tokens_per_layer(stages, 28, k) for k in n]
        kept = {layer: [t.clone() for t in rows] for layer, rows in handle.stats.kept_positions.items()}
        for b in range(2):
            # The input stage keeps tokens in every temporal frame: the method saw the frames.
            first = set(kept[0][b].tolist())
            for frame in frames_of(inputs, b, model):
                assert first & set(frame.tolist()), f"{name}: a frame of sample {b} was emptied"
            # Batch == alone (left padding shifts positions).
            model(**take_sample(inputs, b))
            pad = int((inputs["attention_mask"][b] == 0).sum())
            for layer, rows in kept.items():
                assert (rows[b] - pad).tolist() == handle.stats.kept_positions[layer][0].tolist()
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=suppress_ids(model))
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
