"""Grid widths of vision tokens (``ModelAdapter.vision_grid_widths`` → ``LayerView.grid_widths``):
what spatial methods (MustDrop's 3×3 windows) need where pictures are not square — every Qwen-VL
image of another aspect ratio, e.g. the tiny models' 4×8 grids."""

from __future__ import annotations

import pytest
import torch

import tokencomp
import tokencomp.mergers.mustdrop as merger_module
import tokencomp.scorers.mustdrop as scorer_module
from tokencomp.heatmap import token_layout
from tokencomp.testing import make_inputs

from test_engine import gen_kwargs, tiny

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
CASES = {
    "ragged images": dict(batch=2, image_sizes=[(112, 224), (56, 112)]),
    "two images": dict(batch=2, n_images=2, image_sizes=[[(56, 112), (112, 56)], [(112, 168), (56, 56)]]),
    "image and video": dict(batch=2, video=True, n_images=1, image_sizes=[(112, 168), (56, 112)]),
}
WINDOWS = {"schedule": {"stages": [{"phase": "input", "keep": 0.75, "scorer": "mustdrop_window", "merge": "window"}]}}


@pytest.fixture
def seen(monkeypatch):
    """Every view the MustDrop window code lays out (scorer and merger)."""
    views = []
    real = scorer_module.window_destinations

    def spy(view, window):
        views.append(view)
        return real(view, window)

    monkeypatch.setattr(scorer_module, "window_destinations", spy)
    monkeypatch.setattr(merger_module, "window_destinations", spy)
    return views


def layout_widths(model, inputs, b) -> torch.Tensor:
    """(L,) the width of each vision token's grid by the heatmap layout (independent code), 0 elsewhere."""
    out = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.long)
    for region in token_layout(model, inputs, b):
        out[region.positions.flatten()] = region.positions.shape[1]
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", QWEN)
def test_qwen_grid_widths_match_the_token_layout(family, case, seen):
    """Forward (widths from the grids) and generate (from the M-RoPE ids, pre-encoded features): every
    vision token gets its own picture's or frame's row length."""
    model = tiny(family)
    inputs = make_inputs(model, padding="left", seed=1, **CASES[case])
    want = [layout_widths(model, inputs, b) for b in range(2)]
    assert len({x for w in want for x in w[w > 0].tolist()}) > 1  # pictures of different widths
    from tokencomp.models.qwen_vl import QwenVLAdapter

    sources = []
    real = QwenVLAdapter.vision_grid_widths

    def spy(self, vision_mask, groups, call_kwargs):
        pos = call_kwargs.get("position_ids")
        sources.append("rope" if pos is not None and pos.ndim == 3 else "grid")
        return real(self, vision_mask, groups, call_kwargs)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad(), tokencomp.apply(model, WINDOWS):
        mp.setattr(QwenVLAdapter, "vision_grid_widths", spy)
        model(**inputs)
        model.generate(**inputs, **gen_kwargs(model, 2))
    assert sources == ["grid", "rope"]  # both ways of knowing the grid are exercised
    calls = {id(v): v for v in seen}.values()
    assert len(calls) == 2  # the forward's input stage and generate's prefill
    for view in calls:
        assert view.grid_widths is not None
        for b in range(2):
            vis = view.vision_mask[b]
            pos = view.positions[b][vis]
            assert view.grid_widths[b][vis].tolist() == want[b][pos].tolist()


def windows_by_loop(model, inputs, b, window=3) -> dict[int, int]:
    """Reference: original position -> its window's destination (last member in raster order), by a
    loop over each picture's cells."""
    out = {}
    for region in token_layout(model, inputs, b):
        grid = region.positions
        rows, cols = grid.shape
        for r in range(rows):
            for c in range(cols):
                dr = min((r // window) * window + window - 1, rows - 1)
                dc = min((c // window) * window + window - 1, cols - 1)
                out[int(grid[r, c])] = int(grid[dr, dc])
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_mustdrop_windows_are_square_blocks_of_non_square_qwen_grids(family, seen):
    model = tiny(family)
    inputs = make_inputs(model, padding="left", seed=2, **CASES["image and video"])
    with torch.no_grad(), tokencomp.apply(model, WINDOWS):
        model(**inputs)
    view = seen[0]
    dest = scorer_module.window_destinations(view, 3)
    for b in range(2):
        want = windows_by_loop(model, inputs, b)
        vis = view.vision_mask[b]
        got = {int(view.positions[b][s]): int(view.positions[b][d]) for s, d in zip(vis.nonzero().flatten(), dest[b][vis])}
        assert got == want
        # Negative control: without the adapter's widths the 4x8 image is taken as one row of 32.
        import dataclasses

        with pytest.warns(UserWarning, match="square grid"):
            blind = scorer_module.window_destinations(dataclasses.replace(view, grid_widths=None), 3)
        assert not torch.equal(blind[b][vis], dest[b][vis])


def test_families_without_grid_knowledge_keep_the_square_assumption(seen):
    """LLaVA-1.5's 24x24-like square grid: no widths from the adapter, and the square layout holds."""
    model = tiny("llava")
    inputs = make_inputs(model, batch=1, seed=0)
    with torch.no_grad(), tokencomp.apply(model, WINDOWS):
        model(**inputs)
    assert seen and seen[0].grid_widths is None


@pytest.mark.parametrize("method", ["vision_groups", "vision_videos", "vision_grid_widths"])
@pytest.mark.parametrize("bad", ["short", "list"])
def test_an_adapter_giving_the_wrong_shape_is_named(method, bad, monkeypatch):
    """A (third-party) adapter whose per-token answer has the wrong shape gets a one-line error naming
    it and the method, before any layer runs, not an index error deep inside a scorer."""
    from tokencomp.models.llava import LlavaAdapter

    def broken(self, vision_mask, *rest):
        return vision_mask[:, :-1].long() if bad == "short" else vision_mask.tolist()

    monkeypatch.setattr(LlavaAdapter, method, broken)
    model = tiny("llava")
    inputs = make_inputs(model, batch=1, seed=0)
    with torch.no_grad(), tokencomp.apply(model, WINDOWS):
        with pytest.raises(tokencomp.PluginError, match=rf"model adapter 'llava': {method} gave .*expected a \(1, \d+\) tensor"):
            model(**inputs)


def test_windows_without_a_known_grid_are_said(seen):
    """A non-square group and no widths from the adapter: MustDrop says how it lays the windows out."""
    import dataclasses

    model = tiny("qwen2_vl")
    inputs = make_inputs(model, batch=1, seed=0)  # a 4x8 image
    with torch.no_grad(), tokencomp.apply(model, WINDOWS):
        model(**inputs)
    view = seen[0]
    with pytest.warns(UserWarning, match="do not form a square grid"):
        scorer_module.window_destinations(dataclasses.replace(view, grid_widths=None), 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the adapter's widths: no warning
        scorer_module.window_destinations(view, 3)
