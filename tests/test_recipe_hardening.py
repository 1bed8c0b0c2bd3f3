"""Regression tests from an adversarial review of the recipe loader: paths vs YAML text, merge keys,
YAML 1.1 scalar surprises, empty plugin names, parameter bounds, shipped `.yml` names, tabs, tags."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

import tokencomp
from tokencomp import RecipeError, Scorer
from tokencomp.recipe import load_recipe, parse_yaml, shipped_recipes

SHIPPED = "v2drop/llava-1.5-7b-192"
S = "schedule: {stages: [{layer: 3, keep: 0.5}]}\n"


def _raises(recipe, line: int, pattern: str, source: str = "<string>") -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    exc = info.value
    assert str(exc).startswith(f"{source}:{line}: "), str(exc)
    assert "\n" not in str(exc), str(exc)
    assert re.search(pattern, exc.reason), exc.reason
    return exc


def _stages(recipe, depth: int = 32):
    return [(s.layer, s.keep, s.scorer.name, s.selector.name) for s in recipe.stages(depth)]


# --------------------------------------------------------------------------------------------------
# 1. a string is a path, a shipped name or YAML text, by an explicit rule
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/data/exp:1/r.yaml", r"C:\exp\r.yaml", "C:/exp/r.yml", "D:\\runs\\v2\\recipe", "/data/exp:1/recipe", "~/r.yaml", "exp: 1/r.YML"],
)
def test_missing_path_is_file_not_found_not_yaml(path):
    """Paths with ':' (POSIX folders, Windows drives) are never parsed as YAML text."""
    exc = _raises(path, 1, r"^file not found: ", source=path)
    assert exc.reason.startswith(f"file not found: {path}")


def test_missing_relative_path_suggests_shipped_name():
    _raises("v2drop/llava-1.5-7b-19.yml", 1, r"^file not found: .*did you mean 'v2drop/llava-1\.5-7b-192'", source="v2drop/llava-1.5-7b-19.yml")


def test_missing_pathlike_is_file_not_found(tmp_path):
    _raises(tmp_path / "exp:1" / "r.yaml", 1, r"^file not found: ", source=str(tmp_path / "exp:1" / "r.yaml"))


def test_existing_file_with_colon_in_its_path_loads(tmp_path):
    folder = tmp_path / "exp:1"
    folder.mkdir()
    (folder / "r.yaml").write_text(S)
    assert load_recipe(str(folder / "r.yaml")).source == str(folder / "r.yaml")


@pytest.mark.parametrize(
    "text",
    [S.strip(), "{schedule: {name: budget, tokens: 64}}", "schedule:\t{stages: [{layer: 3, keep: 0.5}]}"],
)
def test_one_line_yaml_is_still_yaml(text):
    assert load_recipe(text).source == "<string>"


def test_load_recipe_documents_the_rule():
    doc = load_recipe.__doc__
    assert "file not found" in doc and "line break" in doc and ".yml" in doc


# --------------------------------------------------------------------------------------------------
# 2. YAML merge keys
# --------------------------------------------------------------------------------------------------

MERGE = """\
schedule:
  stages:
    - &first {layer: 3, keep: 0.5, scorer: {name: random, seed: 7}}
    - <<: *first
      layer: 8
    - <<: [*first, {selector: quota}]
      layer: 12
      keep: 0.0
"""


def test_merge_keys_merge_and_explicit_keys_win():
    recipe = load_recipe(MERGE)
    assert _stages(recipe) == [(3, 0.5, "random", "topk"), (8, 0.5, "random", "topk"), (12, 0.0, "random", "quota")]
    assert recipe.stages(32)[1].scorer.seed == 7
    assert parse_yaml(MERGE) == yaml.safe_load(MERGE)  # same meaning as PyYAML's own merge


def test_merge_earlier_source_wins_and_override_after_merge():
    text = "a: &a {x: 1, y: 1}\nb: &b {x: 2, z: 2}\nc:\n  y: 3\n  <<: [*a, *b]\n"
    assert parse_yaml(text)["c"] == {"x": 1, "y": 3, "z": 2} == yaml.safe_load(text)["c"]


def test_merged_keys_keep_the_line_where_they_are_written():
    """An error in a merged value points at the anchor line that holds it."""
    text = "scorer: &p\n  name: random\n  seed: 1\nselector:\n  <<: *p\n" + S
    _raises(text, 2, r"unknown selector 'random'")
    tree = parse_yaml("base: &b\n  layer: 3\n  keep: 0.5\nstage:\n  <<: *b\n  keep: 0.2\n")
    assert tree["stage"].lines == {"keep": 6, "layer": 2}


@pytest.mark.parametrize(
    "text, line, pattern",
    [
        ("a: &a {x: 1}\nb:\n  <<: 5\n", 3, r"`<<` \(YAML merge key\) takes a mapping"),
        ("a: &a {x: 1}\nb:\n  <<: [*a, 3]\n", 3, r"takes a mapping or a list of mappings"),
        ("a: &a {x: 1}\nb:\n  <<: *a\n  <<: *a\n", 4, r"duplicate key '<<' \(first at line 3\)"),
        ("a: &a\n  <<: *a\n", 2, r"alias refers to its own anchor"),
        ("a: &a {x: 1}\nb:\n  <<: *a\n  y: 1\n  y: 2\n", 5, r"duplicate key 'y' \(first at line 4\)"),
    ],
)
def test_merge_key_errors(text, line, pattern):
    _raises(text, line, pattern)


# --------------------------------------------------------------------------------------------------
# 3 and 7. scalars: YAML 1.2 numbers and booleans, no YAML 1.1 surprises
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("written, value", [("5e-1", 0.5), ("5E-1", 0.5), ("1e0", 1.0), (".5", 0.5), ("+.5", 0.5), ("0.5e0", 0.5), ("50e-2", 0.5), ("1.", 1.0), ("0", 0.0), ("-0.0", 0.0)])
def test_keep_accepts_numbers_people_write(written, value):
    (stage,) = load_recipe(f"schedule: {{stages: [{{layer: 3, keep: {written}}}]}}").stages(8)
    assert stage.keep == value and type(stage.keep) is float


def test_named_schedule_number_in_exponent_form():
    assert load_recipe("schedule: {name: budget, tokens: 1.92e2}").schedule.tokens == 192.0


@pytest.mark.parametrize("written", ["true", "True", "FALSE", "yes", "no", "on", "off", "y"])
def test_booleans_and_yaml11_words_are_not_numbers(written):
    _raises(f"schedule:\n  stages:\n    - {{layer: 3, keep: {written}}}\n", 3, r"^keep must be a number, got ")


@pytest.mark.parametrize("written", ["0x10", "0o10", "010", "0b11", "1_0", "3:0", "1_000"])
def test_layer_numbers_only_in_plain_decimal(written):
    """YAML 1.1 reads these as 16, 8, 8, 3, 10, 180, 1000: here they are refused, with a hint."""
    _raises(f"schedule:\n  stages:\n    - {{layer: {written}, keep: 0.5}}\n", 3, r"^layer must be an integer, got '.*' \(numbers are read in plain decimal only")


def test_quoted_number_hint():
    _raises("schedule: {stages: [{layer: 3, keep: '0.5'}]}\n", 1, r"got '0\.5' \(a quoted string: write numbers without quotes\)")


@pytest.mark.parametrize("written", [".nan", ".NaN", ".inf", "-.inf", "1e400"])
def test_keep_must_be_finite(written):
    _raises(f"schedule:\n  stages:\n    - {{layer: 3, keep: {written}}}\n", 3, r"^keep must be a finite number, got ")


@pytest.mark.parametrize("written, value", [("on", "on"), ("no", "no"), ("2024-01-01", "2024-01-01"), ("1:30", "1:30"), ("=", "=")])
def test_yaml11_scalars_are_plain_strings(written, value):
    assert load_recipe(f"name: {written}\n" + S).name == value


def test_shipped_recipes_read_the_same_as_with_pyyaml():
    """The stricter scalar rules change nothing in the shipped recipes."""
    for name, res in shipped_recipes().items():
        text = res.read_text(encoding="utf-8")
        assert parse_yaml(text, name) == yaml.safe_load(text), name


# --------------------------------------------------------------------------------------------------
# 4. empty plugin names, parameter bounds, plugin __post_init__ errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, pattern",
    [
        ("scorer: ''\n" + S, 1, r"^scorer name is empty \(registered: .*\)"),
        ("name: x\nselector: {}\n" + S, 2, r"^selector needs a `name` \(registered: .*quota"),
        ("scorer: {name: ' '}\n" + S, 1, r"^scorer name is empty"),
        ("schedule:\n  stages:\n    - layer: 3\n      keep: 0.5\n      selector: ''\n", 5, r"^selector name is empty"),
        ("schedule:\n  stages:\n    - layer: 3\n      keep: 0.5\n      scorer: {}\n", 5, r"^scorer needs a `name`"),
        ("schedule: ''\n", 1, r"^schedule name is empty"),
    ],
)
def test_empty_plugin_names_are_errors(text, line, pattern):
    _raises(text, line, pattern)


def test_null_plugin_means_the_default():
    """Only a missing key or null means "the default" (documented in the module docstring)."""
    for text in ("scorer:\n" + S, "scorer: null\nselector: ~\n" + S):
        recipe = load_recipe(text)
        assert (recipe.scorer.name, recipe.selector.name) == (load_recipe(S).scorer.name, load_recipe(S).selector.name)


@dataclasses.dataclass(frozen=True)
class BoundedScorer(Scorer):
    """Test scorer with bounded parameters."""

    name = "bounded-test"

    count: int = dataclasses.field(default=1, metadata={"min": 0})
    ratio: float = dataclasses.field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    weights: tuple[float, ...] = dataclasses.field(default=(), metadata={"min": 0})
    low: int = 0
    high: int = 1

    def __post_init__(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high});\n  swap them")

    def score(self, view):
        return torch.zeros(view.vision_mask.shape)


class BoundedPlugin:
    @tokencomp.hookimpl
    def register_scorers(self, register):
        register(BoundedScorer)


@pytest.fixture
def bounded(in_process_plugin):
    in_process_plugin(BoundedPlugin(), "test-bounded")


def test_field_bounds_are_checked(bounded):
    ok = load_recipe("scorer: {name: bounded-test, count: 0, ratio: 1, weights: [0, 2.5]}\n" + S)
    assert ok.scorer == BoundedScorer(count=0, ratio=1.0, weights=(0.0, 2.5))
    stage = "schedule:\n  stages:\n    - layer: 3\n      keep: 0.5\n      scorer:\n        name: bounded-test\n"
    _raises(stage + "        count: -5\n", 7, r"^scorer 'bounded-test' parameter 'count' must be >= 0, got -5$")
    _raises(stage + "        ratio: 1.5\n", 7, r"^scorer 'bounded-test' parameter 'ratio' must be <= 1\.0, got 1\.5$")
    _raises(stage + "        weights: [1, -1]\n", 7, r"parameter 'weights'\[1\] must be >= 0, got -1\.0$")


def test_post_init_value_error_is_a_located_one_line_recipe_error(bounded):
    text = "schedule:\n  stages:\n    - layer: 3\n      keep: 0.5\n      scorer:\n        name: bounded-test\n        low: 3\n        high: 1\n"
    _raises(text, 6, r"^invalid scorer 'bounded-test': low \(3\) must not exceed high \(1\); swap them$")


@pytest.mark.parametrize(
    "selector, param",
    [("topk", "min_keep"), ("quota", "min_per_group")],
)
def test_builtin_selector_counts_reject_negatives(selector, param):
    """`min_keep: -5` / `min_per_group: -3` make no sense; the fields declare metadata={"min": 0}."""
    cls = tokencomp.plugins.registry().get("selector", selector)
    assert cls.params()[param].metadata["min"] == 0
    _raises(f"name: x\nselector: {{name: {selector}, {param}: -3}}\n" + S, 2, rf"^selector '{selector}' parameter '{param}' must be >= 0, got -3$")
    load_recipe(f"selector: {{name: {selector}, {param}: 0}}\n" + S)


# --------------------------------------------------------------------------------------------------
# 5. shipped names with .yaml, .yml or no suffix
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".yaml", ".yml"])
def test_shipped_name_with_any_yaml_suffix(suffix):
    recipe = load_recipe(SHIPPED + suffix)
    assert recipe.source == f"{SHIPPED}.yaml"  # the shipped file's name, whatever was asked
    assert _stages(recipe) == _stages(load_recipe(SHIPPED))


# --------------------------------------------------------------------------------------------------
# 7. tabs, tags, one-line messages
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "schedule:\n  stages:\n    - layer:\t3\n      keep: 0.5\n",
        "schedule:\n  stages:\n    - layer: 3\t\n      keep: 0.5\t# half\n",
        "schedule: {stages: [{layer:\t3,\tkeep: 0.5}]}\n",
        "schedule:\n  stages:\n    -\t{layer: 3, keep: 0.5}\n",
    ],
)
def test_tabs_separating_values_are_white_space(text):
    """YAML allows tabs as separators within a line; PyYAML alone rejects them."""
    assert _stages(load_recipe(text), 8) == [(3, 0.5, "v2drop", "topk")]


def test_tab_in_quotes_is_kept_and_tab_indentation_is_an_error():
    assert load_recipe('description: "a\tb"\n' + S).description == "a\tb"
    _raises("scorer: v2drop\nschedule:\n\tstages: []\n", 3, r"found character '\\t'.*indent with spaces")


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("name: !!int abc\n" + S, r"^YAML error: cannot read 'abc' as tag:yaml\.org,2002:int$"),
        ("name: !!timestamp x\n" + S, r"^YAML error: cannot read 'x' as tag:yaml\.org,2002:timestamp$"),
        ("name: !!bool maybe\n" + S, r"^YAML error: cannot read 'maybe'"),
        ("name: !!set {a, b}\n" + S, r"^YAML tag 'tag:yaml\.org,2002:set' is not supported"),
        ("selector: !custom {name: topk}\n" + S, r"^YAML tag '!custom' is not supported"),
        ("name: x\nselector: !!python/name:os.system topk\n" + S, r"^YAML error: could not determine a constructor .*python/name:os\.system'$"),
    ],
)
def test_explicit_tags_are_one_line_recipe_errors(text, pattern):
    _raises(text, text.count("\n", 0, text.index("!")) + 1, pattern)


def test_unacceptable_character_is_one_line():
    _raises("name: x\nselector: top\x07k\n" + S, 2, r"^YAML error: unacceptable character #x0007")


def test_tab_reparsing_is_bounded():
    """Each rejected tab costs a re-parse; past a bound the text is refused, still as a RecipeError."""
    load_recipe("name:" + "\t" * 50 + "x\n" + S)
    _raises("name:" + "\t" * 1200 + "x\n" + S, 1, r"^YAML syntax error: found character '\\t'")
