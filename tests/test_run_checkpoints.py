"""`tokencomp run / demo / bench --model` end to end on tiny checkpoint folders (real processors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tokencomp.heatmap
import tokencomp.runner
from tokencomp.cli import main

DATA = Path(__file__).parent / "data"
STRIPES = str(DATA / "stripes_600x300.png")  # red | green | blue, 200 px each
RECIPE = "schedule:\n  stages:\n    - {layer: 2, keep: 0.5}\n    - {layer: 4, keep: 0.5}\n"
COLOURS = np.array([(220, 30, 30), (30, 200, 30), (30, 30, 220), (0, 0, 0)], dtype=float)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tokencomp.synthetic import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("ck")
    return {f: save_tiny_checkpoint(f, root / f) for f in ("llava", "llava_next")}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return str(path)


@pytest.fixture
def renderings(monkeypatch):
    """Every Rendering the command saves (the PNG on disk is checked to be its picture)."""
    seen = []
    real = tokencomp.heatmap.save_png

    def spy(path, picture):
        real(path, picture)
        seen.append((path, picture))

    monkeypatch.setattr(tokencomp.heatmap, "save_png", spy)
    return seen


def _one_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _check_rendering(path, rendering, n_stages):
    with Image.open(path) as back:
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(rendering.image))
    canvas = np.asarray(rendering.image).astype(int)
    rows = {}
    for p in rendering.panels:
        rows.setdefault(p.region, []).append(p)
        l, t, r, b = p.label_box
        dark = (canvas[t:b, l:r] < 128).all(-1)
        assert dark.sum(0).nonzero()[0].size > 10, f"label {p.label!r} not drawn"
    for panels in rows.values():
        assert len(panels) == n_stages + 1
        base = panels[0]
        bx0, by0, bx1, by1 = base.box
        for p in panels[1:]:
            # Undimmed cells == the kept count of the label; the rest dimmed.
            assert p.label.endswith(f": {p.kept} / {p.cells} kept")
            x0, y0, x1, y1 = p.box
            assert (x1 - x0, y1 - y0) == (bx1 - bx0, by1 - by0)
            diff = np.abs(canvas[y0:y1, x0:x1] - canvas[by0:by1, bx0:bx1]).max(-1)
            undimmed = diff <= 1
            assert undimmed.mean() == pytest.approx(p.kept / p.cells, abs=0.02)
    return rows


def _stripe_cells(canvas, panel, rows, cols):
    x0, y0, x1, y1 = panel.box
    out = np.zeros((rows, cols), dtype=int)
    for r in range(rows):
        for c in range(cols):
            rgb = canvas[int(y0 + (r + 0.5) * (y1 - y0) / rows), int(x0 + (c + 0.5) * (x1 - x0) / cols)]
            out[r, c] = int(np.argmin(((COLOURS - rgb) ** 2).sum(1)))
    return out


def test_run_llava_one_image_heatmap_cells_over_pixels(checkpoints, recipe, tmp_path, capsys, renderings):
    out = tmp_path / "h.png"
    code = main(["run", recipe, "--model", checkpoints["llava"], "--image", STRIPES, "--prompt", "What is it?",
                 "--max-new-tokens", "2", "--heatmap", str(out), "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert "row 1: image 0 | layer 2: 32 / 64 kept | layer 4: 16 / 64 kept" in err
    ((path, rendering),) = renderings
    rows = _check_rendering(path, rendering, 2)
    # LLaVA-1.5 sees the centre crop x in [150, 450): its 8 columns of cells, centres at
    # 150 + (c + 0.5) * 37.5, lie over red (< 200), green, blue (>= 400).
    expect = [int((150 + (c + 0.5) * 37.5) // 200) for c in range(8)]
    cells = _stripe_cells(np.asarray(rendering.image).astype(int), rows[0][0], 8, 8)
    assert (cells == np.array(expect)[None]).all(), cells


def test_run_llava_two_images(checkpoints, recipe, tmp_path, capsys, renderings):
    out = tmp_path / "h.png"
    tall = str(DATA / "stripes_200x500.png")
    assert main(["run", recipe, "--model", checkpoints["llava"], "--image", STRIPES, "--image", tall,
                 "--prompt", "Compare", "--max-new-tokens", "2", "--heatmap", str(out)]) == 0
    err = capsys.readouterr().err
    assert "row 2: image 1 | layer 2:" in err
    stats = [line for line in err.splitlines() if line.startswith("vision tokens per layer:")]
    assert stats and "128" in stats[0]  # 2 x 64 tokens enter layer 0
    ((path, rendering),) = renderings
    rows = _check_rendering(path, rendering, 2)
    assert len(rows) == 2
    # The tall picture (horizontal stripes, 200 x 500): the crop keeps y in [150, 350).
    expect = [int((150 + (r + 0.5) * 25) // (500 // 3)) for r in range(8)]
    cells = _stripe_cells(np.asarray(rendering.image).astype(int), rows[1][0], 8, 8)
    assert (cells == np.array(expect)[:, None]).all(), cells


def test_run_llava_next_heatmap_and_two_images(checkpoints, recipe, tmp_path, capsys, renderings):
    out = tmp_path / "h.png"
    assert main(["run", recipe, "--model", checkpoints["llava_next"], "--image", STRIPES, "--prompt", "What?",
                 "--max-new-tokens", "2", "--heatmap", str(out)]) == 0
    err = capsys.readouterr().err
    assert "row 1: image 0 base view | layer 2:" in err and "row 2: image 0 anyres view | layer 2:" in err
    ((path, rendering),) = renderings
    rows = _check_rendering(path, rendering, 2)
    canvas = np.asarray(rendering.image).astype(int)
    # Both views cover the whole 2:1 photo here (best resolution 56 x 112, no padding).
    base = _stripe_cells(canvas, rows[0][0], 4, 4)
    hires = _stripe_cells(canvas, rows[1][0], 4, 8)
    assert (base == np.array([0, 0, 1, 2])[None]).all() or (base == np.array([0, 1, 1, 2])[None]).all(), base
    assert (hires == np.array([0, 0, 0, 1, 1, 2, 2, 2])[None]).all(), hires
    assert main(["run", recipe, "--model", checkpoints["llava_next"], "--image", STRIPES, "--image", STRIPES,
                 "--prompt", "Compare", "--max-new-tokens", "2"]) == 0


def test_demo_model_writes_the_heatmap(checkpoints, tmp_path, capsys, renderings):
    out = tmp_path / "d.png"
    assert main(["demo", "--model", checkpoints["llava"], "--image", STRIPES, "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr()
    assert "baseline:" in text.out and "compressed:" in text.out
    assert out.is_file()
    ((path, rendering),) = renderings
    n_stages = len([p for p in rendering.panels if p.region == 0]) - 1
    assert n_stages >= 1
    _check_rendering(path, rendering, n_stages)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_bench_model(checkpoints, recipe, tmp_path, capsys, family):
    js = tmp_path / "b.json"
    assert main(["bench", recipe, "--model", checkpoints[family], "--vision-tokens", "16", "32", "--text-tokens", "4",
                 "--new-tokens", "1", "--repeat", "1", "--json", str(js), "--quiet"]) == 0
    results = json.loads(js.read_text())
    assert [r["vision_tokens"] for r in results] == [16, 32]  # --vision-tokens is used with --model too
    assert results[0]["vision_tokens_per_layer"][0] == 16 and results[0]["vision_tokens_per_layer"][-1] == 4


@pytest.fixture
def no_generation(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("generated before the arguments were checked")

    for name in ("_load_real", "_generate_real"):
        monkeypatch.setattr(tokencomp.runner, name, forbidden)


def test_video_on_llava_is_refused_before_generating(checkpoints, recipe, tmp_path, capsys, no_generation):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(frames / f"{i}.png")
    line = _one_error(["run", recipe, "--model", checkpoints["llava"], "--video", str(frames), "--prompt", "p"], capsys)
    assert line.startswith(f"error: --video {frames}: llava models take no video input")
    line = _one_error(["run", recipe, "--model", checkpoints["llava"], "--video", str(frames), "--prompt", "p",
                       "--heatmap", str(tmp_path / "h.png")], capsys)
    assert "take no video input" in line


def test_heatmap_of_a_text_only_prompt_is_refused(checkpoints, recipe, tmp_path, capsys, no_generation):
    out = tmp_path / "h.png"
    line = _one_error(["run", recipe, "--model", checkpoints["llava"], "--prompt", "p", "--heatmap", str(out)], capsys)
    assert line == f"error: --heatmap {out}: the prompt has no image or video to draw (add --image or --video)"
    assert not out.exists()


def test_qwen_without_torchvision_is_one_line(recipe, tmp_path, capsys, monkeypatch, no_generation):
    from tokencomp.testing import tiny_config

    folder = tmp_path / "qwen"
    tiny_config("qwen2_vl").save_pretrained(folder)  # check_model reads only the config
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    for argv in (["run", recipe, "--model", str(folder), "--image", STRIPES, "--prompt", "p"],
                 ["demo", "--model", str(folder), "--out", str(tmp_path / "d.png")]):
        line = _one_error(argv, capsys)
        assert line.startswith(f"error: --model {folder}: the qwen2_vl processor needs torchvision")
        assert "pip install torchvision" in line
