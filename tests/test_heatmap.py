"""Kept-token pictures: every vision token maps to exactly one cell of its image or frame."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokencomp
from tokencomp.errors import UsageError
from tokencomp.heatmap import (
    LABEL_HEIGHT, Region, demo_picture, render_inputs, render_regions, require_matplotlib, save_png, token_layout,
    video_frame_indices,
)
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


def _stage_run():
    model = build_tiny("llava")
    inputs = make_inputs(model, batch=1)
    with torch.no_grad(), tokencomp.apply(model, {"schedule": {"stages": [{"layer": 2, "keep": 0.25}, {"layer": 4, "keep": 0.5}]}}) as h:
        model(**inputs)
    return model, inputs, h.stats.kept_positions


def test_render_panels_labels_and_kept_cells(tmp_path):
    model, inputs, kept_positions = _stage_run()
    regions = token_layout(model, inputs)
    image = demo_picture(56)
    out = render_regions(image, regions, kept_positions, height=56)
    assert len(out.panels) == len(kept_positions) + 1  # the picture, then one per stage
    grid = regions[0].positions
    n = grid.numel()
    labels = [p.label for p in out.panels]
    assert labels[0] == "image 0"
    assert labels[1:] == [f"layer {layer}: {len(kept_positions[layer][0])} / {n} kept" for layer in (2, 4)]
    canvas = np.asarray(out.image).astype(int)
    for p in out.panels:
        # The label strip has text on it: dark pixels whose bounding box is non-empty.
        l, t, r, b = p.label_box
        dark = (canvas[t:b, l:r] < 128).all(-1)
        assert dark.any() and dark.sum(0).nonzero()[0].size > 10, p.label
    base = canvas[out.panels[0].box[1] : out.panels[0].box[3], out.panels[0].box[0] : out.panels[0].box[2]]
    assert np.abs(base - np.asarray(save_png.__globals__["to_pil"](image))).max() <= 1
    cell = 56 // grid.shape[0]
    for p, layer in zip(out.panels[1:], (2, 4)):
        kept = set(kept_positions[layer][0].tolist())
        x0, y0 = p.box[:2]
        for (r, c), pos in zip(np.ndindex(*grid.shape), grid.flatten().tolist()):
            y, x = r * cell + cell // 2, c * cell + cell // 2
            same = np.abs(canvas[y0 + y, x0 + x] - base[y, x]).max() <= 1
            assert same == (pos in kept)
    path = tmp_path / "h.png"
    save_png(path, out)
    with Image.open(path) as back:
        assert back.format == "PNG" and back.size == out.image.size
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(out.image))


def test_render_picks_picture_per_region():
    regions = [Region(0, 0, "image", torch.tensor([[5, 6]])), Region(0, 1, "video", torch.tensor([[9, 10]]))]
    pics = {("image", 0, 0): torch.zeros(3, 8, 8), ("video", 0, 1): torch.ones(3, 8, 8)}
    out = render_regions(pics, regions, {1: [torch.tensor([5, 10])]}, height=8)
    assert len(out.panels) == 4 and [p.region for p in out.panels] == [0, 0, 1, 1]
    canvas = np.asarray(out.image)
    first, video = out.panels[0].box, out.panels[2].box
    assert canvas[first[1] : first[3], first[0] : first[2]].max() == 0
    assert canvas[video[1] : video[3], video[0] : video[2]].min() == 255
    assert out.panels[1].label == "layer 1: 1 / 2 kept" and out.panels[2].label == "video 0 frame 1"
    assert out.legend() == ["row 1: image 0 | layer 1: 1 / 2 kept", "row 2: video 0 frame 1 | layer 1: 1 / 2 kept"]


def test_render_without_vision_tokens_is_a_usage_error():
    with pytest.raises(UsageError, match="no vision tokens"):
        render_regions(torch.zeros(3, 8, 8), [], {})


@pytest.mark.parametrize("n, temporal, expected", [(5, 2, [0, 2, 4]), (4, 2, [0, 2]), (6, 3, [0, 3]), (3, 1, [0, 1, 2])])
def test_video_frames_step_by_temporal_patch(n, temporal, expected):
    steps = -(-n // temporal)  # the processor repeats the last frame to fill the last step
    assert video_frame_indices(n, steps, temporal) == expected


def test_render_inputs_stamps_qwen_frames_by_temporal_patch():
    # A Qwen video of 5 frames: 3 temporal steps (the 5th frame repeated), shown as frames 0, 2, 4.
    model = build_tiny("qwen2_vl")
    assert model.config.vision_config.temporal_patch_size == 2
    merge = model.config.vision_config.spatial_merge_size
    n_tok = 3 * 2 * 2
    ids = torch.cat([torch.tensor([1, 2]), torch.full((n_tok,), model.config.video_token_id), torch.tensor([3])])[None]
    inputs = {"input_ids": ids, "video_grid_thw": torch.tensor([[3, 2 * merge, 2 * merge]])}
    frames = [Image.new("RGB", (28, 28), (40 * i, 0, 0)) for i in range(5)]
    out = render_inputs(model, None, inputs, [], frames, {})
    firsts = [p for p in out.panels if p.stage is None]
    assert [p.label for p in firsts] == [f"video 0 frame {t} (input frame {f})" for t, f in enumerate([0, 2, 4])]
    canvas = np.asarray(out.image)
    assert [int(canvas[p.box[1] + 2, p.box[0] + 2, 0]) for p in firsts] == [0, 80, 160]


def test_matplotlib_is_optional_and_lazy(monkeypatch):
    code = "import sys, tokencomp, tokencomp.heatmap; print(sorted(m for m in ('matplotlib', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(UsageError) as info:
        require_matplotlib()
    assert str(info.value) == "matplotlib is not installed: pip install 'tokencomp[viz]'"


# ------------------------------------------------------------------------------------------------
# Real processors: every drawn cell lies over the pixels its patch came from
# ------------------------------------------------------------------------------------------------

DATA = Path(__file__).parent / "data"
COLOURS = np.array([(220, 30, 30), (30, 200, 30), (30, 30, 220), (0, 0, 0)], dtype=float)  # the stripes, padding


def _colour(rgb) -> int:
    return int(np.argmin(((COLOURS - np.asarray(rgb, dtype=float)) ** 2).sum(1)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tokencomp.synthetic import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("ck")
    return {f: save_tiny_checkpoint(f, root / f) for f in ("llava", "llava_next")}


def _patch_centres(model, inputs, region):
    """For each cell of ``region``: the (y, x) of its patch centre in the de-normalised pixels the
    vision tower got, read from pixel_values (and, for anyres, the model's own unpad_image)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vis = model.config.vision_config
    P, side = vis.patch_size, vis.image_size // vis.patch_size
    rows, cols = region.positions.shape
    if region.view != "anyres":
        return [[(r * P + P // 2, c * P + P // 2) for c in range(cols)] for r in range(rows)]
    size = inputs["image_sizes"][0]
    nph, npw = get_anyres_image_grid_shape(size.tolist(), model.config.image_grid_pinpoints, vis.image_size)
    rr = torch.arange(nph * side).float()[:, None].expand(nph * side, npw * side)
    cc = torch.arange(npw * side).float()[None, :].expand(nph * side, npw * side)
    u = unpad_image(torch.stack([rr, cc]), size)
    assert tuple(u.shape[1:]) == (rows, cols)
    return [[(int(u[0, r, c]) * P + P // 2, int(u[1, r, c]) * P + P // 2) for c in range(cols)] for r in range(rows)]


def _seen_pixels(model, processor, inputs, region):
    """(3, H, W) 0..255 pixels the vision tower saw for ``region`` (anyres: tiles re-assembled)."""
    ip = processor.image_processor
    mean = np.array(ip.image_mean)[:, None, None]
    std = np.array(ip.image_std)[:, None, None]
    pv = inputs["pixel_values"][0].numpy()
    if pv.ndim == 3:
        return (pv * std + mean) * 255
    pv = (pv * std[None] + mean[None]) * 255
    if region.view == "base":
        return pv[0]
    vis = model.config.vision_config
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    nph, npw = get_anyres_image_grid_shape(inputs["image_sizes"][0].tolist(), model.config.image_grid_pinpoints, vis.image_size)
    t = vis.image_size
    return pv[1 : 1 + nph * npw].reshape(nph, npw, 3, t, t).transpose(2, 0, 3, 1, 4).reshape(3, nph * t, npw * t)


def misplaced_cells(model, processor, image, boxes=True):
    """Cells whose drawn colour differs from the colour of the patch the model saw; and the count."""
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    regions = token_layout(model, dict(inputs), processor=processor, image_sizes=[(image.height, image.width)])
    if not boxes:
        for r in regions:
            r.box = None  # the old drawing: the grid over the whole photo
    out = render_regions({("image", 0, 0): image}, regions, {})
    canvas = np.asarray(out.image)
    bad = total = 0
    for region, panel in zip(regions, out.panels):
        seen = _seen_pixels(model, processor, inputs, region)
        x0, y0, x1, y1 = panel.box
        rows, cols = region.positions.shape
        for r, row in enumerate(_patch_centres(model, inputs, region)):
            for c, (py, px) in enumerate(row):
                cy, cx = int(y0 + (r + 0.5) * (y1 - y0) / rows), int(x0 + (c + 0.5) * (x1 - x0) / cols)
                bad += _colour(seen[:, py, px]) != _colour(canvas[cy, cx])
                total += 1
    return bad, total


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("picture", ["stripes_600x300", "stripes_600x200", "stripes_200x500"])
def test_cells_drawn_over_the_pixels_their_patch_saw(checkpoints, family, picture):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoints[family])
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    with Image.open(DATA / f"{picture}.png") as im:
        image = im.convert("RGB")
    bad, total = misplaced_cells(model, processor, image)
    assert total >= 32 and bad == 0
    if family == "llava":  # the check would catch the old drawing (the whole photo squashed to a square)
        assert misplaced_cells(model, processor, image, boxes=False)[0] > 0
