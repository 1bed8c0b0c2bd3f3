"""The table of ``tokencomp eval`` (no lmms-eval needed: the records are made up here)."""

import pytest

from tokencomp.evaltable import _primary, build_table, format_csv, format_markdown, run_name


def _rec(recipe, scores, tokens, flops):
    return {
        "recipe": recipe,
        "tasks": {t: {"metric": "acc", "score": s} for t, s in scores.items()},
        "tokencomp": {"overall": {"vision_tokens_avg": tokens, "prefill_flops_ratio": flops}},
    }


def test_percent_of_vanilla_is_the_mean_of_per_task_ratios():
    records = {
        "vanilla": _rec(None, {"gqa": 60.0, "mme": 1500.0}, 576.0, 1.0),
        "r192": _rec("v2drop/llava-1.5-7b-192", {"gqa": 57.0, "mme": 1425.0}, 193.4, 0.4),
        "partial": _rec("x", {"gqa": 30.0}, 10.0, 0.1),
    }
    rows = build_table(records, ["gqa", "mme"])
    assert rows[0]["pct_of_vanilla"] == pytest.approx(100.0)
    assert rows[1]["pct_of_vanilla"] == pytest.approx(95.0)
    assert rows[2]["pct_of_vanilla"] is None and rows[2]["mme"] is None  # a missing task: no average
    md = format_markdown(rows, ["gqa", "mme"], {"gqa": "acc", "mme": "acc"})
    assert md.splitlines()[0] == "| run | gqa (acc) | mme (acc) | avg vision tokens | prefill FLOPs | % of vanilla |"
    assert "| r192 | 57.0 | 1425.0 | 193.4 | 0.4 | 95.0 |" in md
    assert format_csv(rows, ["gqa", "mme"]).splitlines()[0] == "run,recipe,gqa,mme,vision_tokens,prefill_flops,pct_of_vanilla"


def test_primary_metric_and_run_names():
    res = {"alias": "pope", "pope_accuracy,none": 0.8, "pope_accuracy_stderr,none": 0.01, "pope_f1_score,none": 0.7}
    assert _primary(res) == ("pope_accuracy", 0.8)
    assert _primary(res, "pope_f1_score") == ("pope_f1_score", 0.7)
    assert run_name(None) == "vanilla"
    assert run_name("v2drop/llava-1.5-7b-192") == "v2drop_llava-1.5-7b-192"
    assert run_name("/tmp/my recipe.yaml") == "my_recipe"


def test_recipe_hash_is_content_not_path_or_comments(tmp_path):
    import tokencomp
    from tokencomp.evaltable import recipe_hash
    from tokencomp.recipe import shipped_recipes

    text = shipped_recipes()["v2drop/llava-1.5-7b-192"].read_text()
    copy = tmp_path / "elsewhere.yaml"
    copy.write_text("# my copy\n" + text.replace("description:", "description: mine, was", 1) + "\n\n")
    assert recipe_hash(tokencomp.load_recipe(str(copy))) == recipe_hash(tokencomp.load_recipe("v2drop/llava-1.5-7b-192"))
    assert recipe_hash(tokencomp.load_recipe("v2drop/llava-1.5-7b-128")) != recipe_hash(tokencomp.load_recipe("v2drop/llava-1.5-7b-192"))
