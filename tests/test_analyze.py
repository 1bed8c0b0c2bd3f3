"""`tokencomp analyze` (the V²Drop paper's two findings) and the toy accuracy table (ACCURACY.md)."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tokencomp
from tokencomp import analyze
from tokencomp.cli import main
from tokencomp.interfaces import Scorer
from tokencomp.testing import build_tiny, make_inputs

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class _LateScorer(Scorer):
    """Test scorer: prefers later tokens (the opposite of the `none` baseline)."""

    name = "test_prefers_late"

    def score(self, view):
        return view.token_index.float()


@pytest.fixture
def late_scorer(in_process_plugin):
    plugin = types.SimpleNamespace()

    @tokencomp.hookimpl
    def register_scorers(register):
        register(_LateScorer)

    plugin.register_scorers = register_scorers
    in_process_plugin(plugin, "test-analyze-late")  # this test's own registry, nothing process-wide


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model = build_tiny("llava", layers=4)
    return model, [make_inputs(model, batch=2, seed=s) for s in range(2)]


@pytest.fixture(scope="module")
def toy():
    from tokencomp.toy import harness, scenes

    torch.set_num_threads(1)
    model, processor = harness.load()
    questions = scenes.make_questions("test", 6)
    return model, processor, questions


def test_parse_scorer():
    assert analyze.parse_scorer("fastv") == ("fastv", "fastv")
    assert analyze.parse_scorer("v2drop:l1") == ("v2drop:l1", {"name": "v2drop", "metric": "l1"})
    assert analyze.parse_scorer("random:seed=3") == ("random:seed=3", {"name": "random", "seed": 3})
    with pytest.raises(tokencomp.UsageError):
        analyze.parse_scorer("fastv:oops")


def _check_sums(res, counts, keep):
    for row in res["scorers"].values():
        assert len(row["retention"]) == 10
        assert sum(row["total"]) == sum(counts)
        assert sum(row["kept"]) == sum(int(n * keep) for n in counts)
        assert all(0 <= k <= t for k, t in zip(row["kept"], row["total"]))


def test_retention_controls_on_tiny_model(tiny, late_scorer):
    model, batches = tiny
    res = analyze.position_retention(model, batches, {"front": "none", "late": "test_prefers_late", "random": "random"},
                                     layer=2, keep=0.3)
    counts = res["vision_tokens"]
    assert res["inputs"] == 4 and len(counts) == 4
    _check_sums(res, counts, 0.3)
    front, late, rnd = (res["scorers"][k]["retention"] for k in ("front", "late", "random"))
    # positive control: a scorer preferring late tokens keeps the end, drops the front; `none` the opposite
    assert late[-1] == 1.0 and late[0] == 0.0 and late == sorted(late)
    assert front[0] == 1.0 and front[-1] == 0.0 and front == sorted(front, reverse=True)
    # negative control: random is neither
    assert 0.0 < rnd[0] < 1.0 and 0.0 < rnd[-1] < 1.0
    assert "late" in analyze.format_retention(res)


def test_retention_on_toy_model(toy):
    model, processor, questions = toy
    from tokencomp.toy import harness

    batches = [harness.encode(processor, questions)]
    res = analyze.position_retention(model, batches, {"v2drop": "v2drop", "all": "fastv"}, layer=3, keep=0.333)
    _check_sums({"scorers": {"v2drop": res["scorers"]["v2drop"]}}, res["vision_tokens"], 0.333)
    assert res["vision_tokens"] == [256] * len(questions)
    full = analyze.position_retention(model, batches, {"v2drop": "v2drop"}, layer=3, keep=1.0)
    assert full["scorers"]["v2drop"]["retention"] == [1.0] * 10


def test_variation_matches_hidden_states_and_grid(toy):
    model, processor, questions = toy
    from tokencomp.toy import harness

    enc = harness.encode(processor, questions[:2])
    var = analyze.layer_variations(model, enc, [2, 6], ("l2", "l1", "cosine"))
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    for layer in (2, 6):
        ref = torch.linalg.vector_norm(hs[layer] - hs[layer - 1], dim=-1)
        assert torch.allclose(var["l2"][layer], ref, rtol=1e-4, atol=1e-4)
        assert var["cosine"][layer].shape == ref.shape
    regions, grids = analyze.variation_grids(model, enc, var, sample=1)
    assert len(regions) == 1 and all(g[0].shape == (16, 16) for g in grids.values())
    pic = analyze.render_variation([questions[1].image], regions, grids, masks=[analyze.object_tokens(questions[1].mask, 6)])
    assert pic.height > 100 and pic.width > 7 * 100


def test_variation_grid_on_tiny_model(tiny):
    model, batches = tiny
    var = analyze.layer_variations(model, batches[0], [1, 3], ("l2",))
    regions, grids = analyze.variation_grids(model, batches[0], var)
    rows, cols = regions[0].positions.shape
    assert grids[("l2", 3)][0].shape == (rows, cols)
    with pytest.raises(tokencomp.UsageError):
        analyze.layer_variations(model, batches[0], [9], ("l2",))


def test_relevance_on_toy(toy):
    model, processor, questions = toy
    rel = analyze.relevance(model, processor, questions, [2], ("l2", "cosine"))
    assert 0 < rel["questions"] <= len(questions)
    assert 0 < rel["chance_asked"] < rel["chance_any"] < 1
    for v in rel["share"].values():
        assert 0 <= v["asked"] <= v["any"] <= 1
    assert "l2@2" in analyze.format_relevance(rel)


def test_object_tokens():
    m = torch.zeros(12, 12, dtype=torch.bool)
    m[0:6, 0:3] = True  # half of patch (0, 0)
    m[6:12, 6:7] = True  # 1/6 of patch (1, 1)
    assert analyze.object_tokens(m, 6).tolist() == [[True, False], [False, False]]


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import tokencomp.heatmap as hm

    def missing():
        raise tokencomp.UsageError("matplotlib is not installed")

    monkeypatch.setattr(hm, "require_matplotlib", missing)
    res = {"layer": 3, "keep": 0.3, "bins": 10, "inputs": 2,
           "scorers": {"a": {"retention": [0.1 * i for i in range(10)]}, "b": {"retention": [None] + [0.3] * 9}}}
    assert analyze.plot_retention(res, tmp_path / "p.png") == "pillow"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_analyze_toy(tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", "--n", "4", "--maps", "1", "--scorers", "v2drop", "none", "--variation-layers", "2",
                 "--metrics", "l2", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Finding 1" in text and "Finding 2" in text
    report = json.loads((out / "analyze.json").read_text())
    assert set(report["position"]["scorers"]) == {"v2drop", "none"}
    assert (out / "position.png").exists() and (out / "variation-0.png").exists()


def test_cli_analyze_synthetic(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["analyze", "--synthetic", "llava", "--scorers", "v2drop:cosine", "random", "--layer", "2",
                 "--variation-layers", "1", "--metrics", "l1", "--out-dir", str(out)]) == 0
    assert (out / "variation-0.png").exists()


@pytest.mark.parametrize("argv, start", [
    (["--keep", "2"], "error: --keep 2.0: must be in [0, 1]"),
    (["--scorers", "nosuch"], "error: --scorers nosuch:"),
    (["--layer", "99"], "error: --layer 99: must be in 1..11"),
    (["--model", "/no/such/folder"], "error: --model /no/such/folder: no such directory"),
])
def test_cli_analyze_errors(argv, start, tmp_path, capsys):
    assert main(["analyze", "--out-dir", str(tmp_path / "x"), "--n", "2", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start), err


# ------------------------------------------------------------------------------------------------
# the accuracy table
# ------------------------------------------------------------------------------------------------


def test_wilson_and_budgets():
    from tokencomp.toy import accuracy

    lo, hi = accuracy.wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert accuracy.wilson(0, 10)[0] == 0.0
    assert accuracy.budget_tokens(192, 576) == 192 and abs(accuracy.budget_tokens(64, 256) - 28.44) < 0.01
    keep = accuracy.one_shot_keep(85.33, 1, 12, 256)
    assert abs((1 * 256 + 11 * keep * 256) / 12 - 85.33) < 1e-6


def test_accuracy_md_is_generated_from_json():
    from tokencomp.toy import accuracy

    res = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    assert (ROOT / "ACCURACY.md").read_text() == accuracy.markdown(res)
    assert res["questions"]["n"] == res["rows"][0]["n"] > 0


def test_accuracy_quick_run(tmp_path):
    from tokencomp.toy import accuracy

    js, md = tmp_path / "a.json", tmp_path / "a.md"
    assert accuracy.main(["--quick", "--json", str(js), "--markdown", str(md)]) == 0
    res = json.loads(js.read_text())
    assert md.read_text() == accuracy.markdown(res)
    assert {r["schedule"] for r in res["rows"]} == {"-", "progressive", "one-shot", "before the LLM"}
    assert not res["failures"], res["failures"]  # every method, before and inside the LLM, ran
    before = [r for r in res["rows"] if r["schedule"] == "before the LLM"]
    assert {r["method"] for r in before} == {label for label, _ in accuracy.BEFORE_LLM}
    for r in before:  # an input stage keeps its count in every layer: the average is the budget (rounded keep)
        assert abs(r["measured_tokens"] - r["tokens"]) <= 1.0, r


def test_svg_on_request(tmp_path, monkeypatch):
    """--svg writes the same figure as SVG beside the PNG (matplotlib), and without matplotlib it is
    a one-line error before any model work."""
    import tokencomp.heatmap as heatmap
    from tokencomp.analyze import plot_retention

    res = {"scorers": {"a": {"retention": [0.5] * 10}, "b": {"retention": [None] + [0.2] * 9}}, "bins": 10, "layer": 3, "keep": 0.3, "inputs": 4}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib (tokencomp[viz]) is not installed")
    assert plot_retention(res, tmp_path / "position.png", svg=True) == "matplotlib"
    assert (tmp_path / "position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "position.svg").read_bytes()[:400]

    def missing():
        raise tokencomp.UsageError("matplotlib is not installed: pip install 'tokencomp[viz]'")

    monkeypatch.setattr(heatmap, "require_matplotlib", missing)
    assert main(["analyze", "--svg", "--out-dir", str(tmp_path / "x")]) == 2
