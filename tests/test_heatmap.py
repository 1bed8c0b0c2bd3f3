"""Kept-token pictures: every vision token maps to exactly one cell of its image or frame."""

from __future__ import annotations

import zlib

import pytest
import torch

import tokencomp
from tokencomp.heatmap import Region, demo_picture, render_regions, token_layout, write_png
from tokencomp.testing import build_tiny, make_inputs, vision_token_ids

CASES = [
    ("llava", {}),
    ("llava_next", {"image_sizes": [(56, 112), (112, 112)]}),
    ("llava_onevision", {"image_sizes": [(112, 56), (112, 112)]}),
    ("qwen2_vl", {"video": True}),
    ("qwen2_5_vl", {"n_images": 2, "image_sizes": [(112, 224), (56, 112)]}),
    ("qwen3_vl", {"video": True}),
]


@pytest.mark.parametrize("family, kwargs", CASES)
def test_layout_covers_every_vision_token_once(family, kwargs):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, **kwargs)
    vision_ids = torch.tensor(vision_token_ids(model))
    for sample in range(2):
        regions = token_layout(model, inputs, sample)
        cells = torch.cat([r.positions.flatten() for r in regions])
        assert len(set(cells.tolist())) == len(cells)  # no token drawn twice
        vis = torch.isin(inputs["input_ids"][sample], vision_ids).nonzero().flatten()
        assert torch.isin(cells, vis).all()
        missing = set(vis.tolist()) - set(cells.tolist())
        if family in ("llava_next", "llava_onevision"):
            # Only the row-end newline tokens of the high-resolution view cover no cell.
            hires = [r for r in regions if r.view == "anyres"][0]
            assert len(missing) == hires.positions.shape[0]
            assert all(int(r[-1]) + 1 in missing for r in hires.positions)
        else:
            assert not missing
        if kwargs.get("video"):
            frames = [r for r in regions if r.view == "video"]
            assert [r.frame for r in frames] == list(range(len(frames))) and len(frames) > 1


def test_qwen_grid_rows_follow_image_shape():
    model = build_tiny("qwen2_vl")
    inputs = make_inputs(model, batch=1, image_sizes=[(56, 112)])
    (region,) = token_layout(model, inputs)
    assert tuple(region.positions.shape) == (2, 4)  # 56x112 px / 14 px patches / merge 2
    assert torch.equal(region.positions.flatten(), region.positions.flatten().sort().values)


def test_render_and_png_roundtrip(tmp_path):
    model = build_tiny("llava")
    inputs = make_inputs(model, batch=1)
    with torch.no_grad(), tokencomp.apply(model, {"schedule": {"stages": [{"layer": 2, "keep": 0.25}, {"layer": 4, "keep": 0.5}]}}) as h:
        model(**inputs)
    regions = token_layout(model, inputs)
    image = demo_picture(56)
    panels = render_regions(image, regions, h.stats.kept_positions)
    assert panels.shape == (3, 56, 56 * 3 + 8)
    assert torch.equal(panels[:, :, :56], image)
    # A kept cell keeps its pixels; a dropped one is dimmed.
    grid = regions[0].positions
    kept = set(h.stats.kept_positions[2][0].tolist())
    cell = 56 // grid.shape[0]
    for (r, c), pos in zip(torch.cartesian_prod(torch.arange(grid.shape[0]), torch.arange(grid.shape[1])).tolist(), grid.flatten().tolist()):
        patch = panels[:, r * cell, 60 + c * cell]
        same = torch.allclose(patch, image[:, r * cell, c * cell])
        assert same == (pos in kept)
    path = tmp_path / "h.png"
    write_png(path, panels)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    raw = zlib.decompress(data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8])
    width = panels.shape[2]
    expect = (panels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)[0].flatten().tolist()
    assert list(raw[1 : 1 + 3 * width]) == expect


def test_render_picks_picture_per_region():
    regions = [Region(0, 0, "image", torch.tensor([[5, 6]])), Region(0, 1, "video", torch.tensor([[9, 10]]))]
    pics = {("image", 0, 0): torch.zeros(3, 8, 8), ("video", 0, 1): torch.ones(3, 8, 8)}
    out = render_regions(pics, regions, {1: [torch.tensor([5, 10])]})
    assert out.shape == (3, 8 * 2 + 4, 8 * 2 + 4)
    assert out[:, :8, :8].sum() == 0 and out[:, 12:, :8].min() == 1
