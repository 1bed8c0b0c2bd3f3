"""Recipes: every error class is a ``RecipeError`` at ``file:line:``; valid inputs of every form load;
fuzzed recipes never raise anything else; shipped recipes are package data of the wheel."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokencomp
from tokencomp import RecipeError
from tokencomp.recipe import Recipe, shipped_recipes

REPO = Path(__file__).resolve().parents[1]
SHIPPED = "v2drop/llava-1.5-7b-192"
S = "schedule: {stages: [{layer: 3, keep: 0.5}]}\n"
LOCATED = re.compile(r"^[^\n]+:\d+: [^\n]+$")  # one line; a path may contain ":" (C:\\...)

# (id, recipe text, line of the error, regex the reason must contain)
CASES = [
    # unknown plugin names, with a close match and the registered names
    ("unknown-scorer", "name: x\nscorer: v2dorp\n" + S, 2, r"unknown scorer 'v2dorp' \(did you mean 'v2drop'\?\); registered: .*v2drop"),
    ("unknown-selector", "selector: topkk\n" + S, 1, r"unknown selector 'topkk' \(did you mean 'topk'\?\)"),
    ("unknown-schedule", "scorer: v2drop\nschedule:\n  name: budgit\n  tokens: 64\n", 3, r"unknown schedule 'budgit' \(did you mean 'budget'\?\)"),
    ("unknown-stage-scorer", "schedule:\n  stages:\n    - {layer: 3, keep: 0.5}\n    - layer: 5\n      keep: 0.2\n      scorer: fastvv\n", 6, r"unknown scorer 'fastvv' \(did you mean 'fastv'\?\)"),
    ("unknown-stage-selector", "schedule:\n  stages:\n    - layer: 5\n      keep: 0.2\n      selector: {name: quotta}\n", 5, r"unknown selector 'quotta' \(did you mean 'quota'\?\)"),
    ("plugin-without-name", "scorer: {metric: l1}\n" + S, 1, r"scorer needs a `name` \(registered: .*v2drop"),
    ("plugin-name-not-string", "scorer: {name: 7}\n" + S, 1, r"scorer name must be a string, got 7"),
    ("plugin-spec-wrong-type", "scorer: [v2drop]\n" + S, 1, r"scorer must be a plugin name or a mapping \{name: \.\.\., <params>\}"),
    # unknown or mistyped keys
    ("unknown-top-key", "scorer: v2drop\nscheduel: {stages: [{layer: 3, keep: 0.5}]}\n", 2, r"unknown key 'scheduel'; allowed: name, description, scorer, selector, schedule"),
    ("unknown-stage-key", "schedule:\n  stages:\n    - layer: 3\n      keep: 0.5\n      kep: 0.2\n", 5, r"unknown stage key 'kep'; allowed: layer, phase, keep, scorer, selector"),
    ("unknown-param", "scorer:\n  name: v2drop\n  metrc: l1\n" + S, 3, r"unknown parameter 'metrc' for scorer 'v2drop'; allowed: metric"),
    ("unknown-schedule-param", "schedule:\n  name: budget\n  tokenz: 64\n", 3, r"unknown parameter 'tokenz' for schedule 'budget'; allowed: tokens, vision_tokens, depth, final"),
    ("no-schedule", "scorer: v2drop\nselector: topk\n", 1, r"the recipe has no `schedule`"),
    ("stage-missing-keep", "schedule:\n  stages:\n    - {layer: 3, keep: 0.5}\n    - {layer: 5}\n", 4, r"stage 1 is missing 'keep'"),
    # wrong types
    ("keep-string", "schedule:\n  stages:\n    - {layer: 3, keep: half}\n", 3, r"keep must be a number, got 'half'"),
    ("keep-bool", "schedule:\n  stages:\n    - {layer: 3, keep: true}\n", 3, r"keep must be a number, got True"),
    ("keep-nan", "schedule:\n  stages:\n    - {layer: 3, keep: .nan}\n", 3, r"keep must be a finite number, got nan"),
    ("layer-float", "schedule:\n  stages:\n    - keep: 0.5\n      layer: 2.5\n", 4, r"layer must be an integer, got 2\.5"),
    ("layer-string", "schedule:\n  stages:\n    - {layer: '3', keep: 0.5}\n", 3, r"layer must be an integer, got '3'"),
    ("metric-int", "scorer:\n  name: v2drop\n  metric: 3\n" + S, 3, r"scorer 'v2drop' parameter 'metric' must be one of 'l2', 'l1', 'cosine', got 3"),
    ("metric-unknown", "scorer: {name: v2drop, metric: l3}\n" + S, 1, r"must be one of 'l2', 'l1', 'cosine', got 'l3'"),
    ("int-param-float", "selector: topk\nscorer: {name: random, seed: 1.5}\n" + S, 2, r"scorer 'random' parameter 'seed' must be an integer, got 1\.5"),
    ("stage-scorer-param", "schedule:\n  stages:\n    - layer: 3\n      keep: 0.5\n      scorer:\n        name: random\n        seed: x\n", 7, r"parameter 'seed' must be an integer, got 'x'"),
    ("name-not-string", "name: 5\n" + S, 1, r"name must be a string"),
    ("description-not-string", S + "description: [a]\n", 2, r"description must be a string"),
    ("stages-not-list", "schedule:\n  stages: {layer: 3, keep: 0.5}\n", 2, r"schedule\.stages must be a non-empty list of \{layer, keep\} mappings"),
    ("stages-empty", "schedule:\n  stages: []\n", 2, r"schedule\.stages must be a non-empty list"),
    ("stage-not-mapping", "schedule:\n  stages:\n    - {layer: 3, keep: 0.5}\n    - [5, 0.5]\n", 4, r"stage 1 must be a mapping like \{layer: 3, keep: 0\.5\}"),
    # numbers out of range
    ("keep-above-1", "schedule:\n  stages:\n    - {layer: 3, keep: 1.5}\n", 3, r"keep must be in \[0, 1\] \(the fraction of vision tokens kept\), got 1\.5"),
    ("keep-negative", "schedule:\n  stages:\n    - layer: 3\n      keep: -0.1\n", 4, r"keep must be in \[0, 1\]"),
    ("layer-0", "schedule:\n  stages:\n    - {layer: 0, keep: 0.5}\n", 3, r"layer must be >= 1, got 0: to reduce tokens before the first decoder layer, write a stage `\{phase: input"),
    ("layer-negative", "schedule:\n  stages:\n    - {layer: -2, keep: 0.5}\n", 3, r"layer must be >= 1, got -2"),
    ("layers-equal", "schedule:\n  stages:\n    - {layer: 3, keep: 0.5}\n    - {layer: 3, keep: 0.2}\n", 4, r"stage layers must be strictly increasing: 3 follows 3"),
    ("layers-decreasing", "schedule:\n  stages:\n    - layer: 10\n      keep: 0.5\n    - keep: 0.2\n      layer: 4\n", 6, r"strictly increasing: 4 follows 10"),
    # YAML problems
    ("duplicate-top-key", "scorer: v2drop\nselector: topk\nscorer: fastv\n" + S, 3, r"duplicate key 'scorer' \(first at line 1\)"),
    ("duplicate-stage-key", "schedule:\n  stages:\n    - layer: 3\n      keep: 0.5\n      layer: 4\n", 5, r"duplicate key 'layer' \(first at line 3\)"),
    ("duplicate-param", "scorer: {name: v2drop, metric: l1, metric: l2}\n" + S, 1, r"duplicate key 'metric'"),
    ("syntax-indent", "scorer: v2drop\n  selector: topk\n" + S, 2, r"YAML syntax error: mapping values are not allowed here"),
    ("syntax-unclosed-bracket", "scorer: v2drop\nschedule:\n  stages: [\n    {layer: 3, keep: 0.5}\n", 4, r"YAML syntax error: expected ',' or '\]'.*flow sequence started at line 3"),
    ("syntax-unclosed-quote", "name: 'v2drop\nschedule: x\n", 2, r"YAML syntax error: .*end of stream.*quoted scalar started at line 1"),
    ("syntax-tab", "scorer: v2drop\nschedule:\n\tstages: []\n", 3, r"YAML syntax error: found character '\\t'"),
    ("two-documents", "scorer: v2drop\n---\nscorer: fastv\n", 2, r"expected a single document"),
    ("complex-key", "? [a, b]\n: 1\n", 1, r"mapping keys must be plain names"),
    ("undefined-alias", "name: x\nscorer: *nope\n" + S, 2, r"undefined alias"),
    ("recursive-alias", "name: x\nschedule: &s\n  stages: *s\n", 3, r"alias refers to its own anchor"),
    ("unknown-tag", "scorer: v2drop\nselector: !custom topk\n" + S, 2, r"could not determine a constructor for the tag '!custom'"),
    ("control-character", "scorer: v2drop\nselector: top\x07k\n" + S, 2, r"unacceptable character"),
    # empty files and documents that are not a mapping
    ("empty", "", 1, r"the recipe is empty"),
    ("blank", "\n   \n", 1, r"the recipe is empty"),
    ("only-comments", "# a recipe\n\n# to come\n", 1, r"the recipe is empty"),
    ("list-document", "\n- {layer: 3, keep: 0.5}\n", 2, r"a recipe must be a mapping with keys name, description, scorer, selector, schedule, newlines; got a list"),
    ("scalar-document", "just some words\n", 1, r"must be a mapping .*got str 'just some words'"),
    ("null-document", "---\n", 1, r"must be a mapping .*got null"),
    # named schedules
    ("named-schedule-bad-value", "schedule:\n  name: budget\n  tokens: -5\n", 2, r"invalid schedule 'budget': tokens must be .*got -5"),
    ("named-schedule-bad-type", "schedule:\n  name: budget\n  tokens: many\n", 3, r"schedule 'budget' parameter 'tokens' must be a number, got 'many'"),
    ("named-schedule-list-item", "schedule:\n  name: v2drop\n  keep:\n    - 0.5\n    - x\n    - 0\n", 5, r"schedule 'v2drop' parameter 'keep'\[1\] must be a number, got 'x'"),
    ("named-schedule-inconsistent", "schedule:\n  name: v2drop\n  keep: [0.5, 0.3]\n", 2, r"invalid schedule 'v2drop': keep has 2 entries but depth has 3"),
    ("stages-given-to-named-schedule", "schedule:\n  name: budget\n  stages:\n    - {layer: 3, keep: 0.5}\n", 2, r"`stages:` lists explicit stages and takes no other key \(got 'name'\); use a named schedule"),
    ("named-param-beside-stages", "schedule:\n  stages:\n    - {layer: 3, keep: 0.5}\n  tokens: 64\n", 4, r"takes no other key \(got 'tokens'\)"),
    ("stages-key-of-explicit", "schedule: {name: explicit, stagez: []}\n", 1, r"unknown parameter 'stagez' for schedule 'explicit'; allowed: none"),
]


def _raises(recipe, source: str, line: int, pattern: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        tokencomp.load_recipe(recipe)
    exc = info.value
    assert str(exc).startswith(f"{source}:{line}: "), str(exc)
    assert exc.source == source
    assert re.search(pattern, exc.reason, re.S), exc.reason
    return exc


@pytest.mark.parametrize("text, line, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_in_file_has_file_and_line(tmp_path, text, line, pattern):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    _raises(str(path), str(path), line, pattern)
    _raises(path, str(path), line, pattern)


@pytest.mark.parametrize("text, line, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_in_yaml_text_has_string_and_line(text, line, pattern):
    _raises(text, "<string>", line, pattern)


def test_too_deep_nesting_is_a_recipe_error():
    """Nesting deeper than the interpreter's recursion limit is refused, not a RecursionError."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 200)  # so that 300 levels surely overflow, and quickly
    try:
        for text in ("name: x\nschedule: " + "[" * 300 + "]" * 300 + "\n", "schedule:\n" + "".join(f"{' ' * i}a:\n" for i in range(1, 300))):
            _raises(text, "<string>", 1, r"nested too deeply")
    finally:
        sys.setrecursionlimit(limit)


def test_unreadable_files_are_recipe_errors(tmp_path):
    _raises(tmp_path / "missing.yaml", str(tmp_path / "missing.yaml"), 1, r"^file not found: ")
    _raises(tmp_path, str(tmp_path), 1, r"cannot read recipe")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    _raises(latin1, str(latin1), 1, r"not UTF-8")


def test_unknown_shipped_name_suggests_the_closest():
    _raises("v2drop/llava-1.5-7b-19", "v2drop/llava-1.5-7b-19", 1, r"^file not found: v2drop/llava-1\.5-7b-19 \(nor a shipped recipe: did you mean 'v2drop/llava-1\.5-7b-192'\?")
    _raises("v2drop-llava", "v2drop-llava", 1, r"neither a file nor a shipped recipe \(did you mean")


def test_wrong_python_type_is_a_recipe_error():
    exc = _raises(42, "<string>", 1, r"a recipe is a path, a shipped name, YAML text or a dict; got int")
    assert isinstance(exc, ValueError)  # RecipeError is also a ValueError


# --------------------------------------------------------------------------------------------------
# valid recipes in every form
# --------------------------------------------------------------------------------------------------


def _layers(recipe: Recipe, num_layers: int = 32):
    return [(s.layer, s.keep, s.scorer.name, s.selector.name) for s in recipe.stages(num_layers)]


def test_shipped_name_path_text_and_dict_give_the_same_recipe():
    file = REPO / "schedules" / f"{SHIPPED}.yaml"
    text = file.read_text(encoding="utf-8")
    by_name = tokencomp.load_recipe(SHIPPED)
    assert by_name.name == SHIPPED and by_name.source == f"{SHIPPED}.yaml"
    assert _layers(by_name) == [(3, 0.5, "v2drop", "topk"), (17, 0.3, "v2drop", "topk"), (22, 0.0, "v2drop", "topk")]
    for other in (f"{SHIPPED}.yaml", str(file), file, text, yaml.safe_load(text)):
        assert _layers(tokencomp.load_recipe(other)) == _layers(by_name)
    assert tokencomp.load_recipe(file).source == str(file)
    assert tokencomp.load_recipe(by_name) is by_name
    assert shipped_recipes()[SHIPPED].read_text(encoding="utf-8") == text


def test_every_shipped_recipe_loads():
    names = list(shipped_recipes())
    assert SHIPPED in names
    for name in names:
        tokencomp.load_recipe(name)


def test_defaults_overrides_and_params():
    recipe = tokencomp.load_recipe(
        "schedule:\n  stages:\n    - {layer: 2, keep: 1}\n    - {layer: 4, keep: 0, scorer: {name: random, seed: 3}, selector: quota}\n"
    )
    assert [type(s.keep) for s in recipe.stages(8)] == [float, float]
    assert _layers(recipe, 8) == [(2, 1.0, "v2drop", "topk"), (4, 0.0, "random", "quota")]
    assert recipe.stages(8)[1].scorer.seed == 3
    named = tokencomp.load_recipe({"scorer": {"name": "v2drop", "metric": "cosine"}, "schedule": {"name": "budget", "tokens": 64}})
    assert named.scorer.metric == "cosine" and named.schedule.tokens == 64.0


def test_dict_errors_are_located_at_dict():
    _raises({"schedule": {"stages": [{"layer": 3, "keep": 2}]}}, "<dict>", 1, r"keep must be in \[0, 1\]")
    _raises({"scorer": "v2dorp", "schedule": {"stages": [{"layer": 3, "keep": 0.5}]}}, "<dict>", 1, r"did you mean 'v2drop'")
    looped: dict = {}
    looped["schedule"] = looped
    _raises(looped, "<dict>", 1, r"nested too deeply")


def test_stages_reject_layers_beyond_the_model_depth(tmp_path):
    """Layers are checked against the depth when the recipe is applied; the error names the depth."""
    path = tmp_path / "deep.yaml"
    path.write_text("# deep\nschedule:\n  stages:\n    - {layer: 3, keep: 0.5}\n    - {layer: 17, keep: 0.3}\n    - {layer: 22, keep: 0}\n")
    recipe = tokencomp.load_recipe(path)
    assert [s.layer for s in recipe.stages(23)] == [3, 17, 22]
    for depth in (22, 18):
        with pytest.raises(RecipeError) as info:
            recipe.stages(depth)
        assert str(info.value) == (
            f"{path}:6: stage layer 22 does not exist: the model's decoder has {depth} layers (0..{depth - 1})"
        )
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}:5: stage layer 17 does not exist: the model's decoder has 10 layers"):
        recipe.stages(10)


def test_named_schedule_beyond_depth_points_at_schedule_line():
    recipe = tokencomp.load_recipe("name: x\nschedule:\n  name: v2drop\n  depth: [0.5, 0.9, 0.99]\n")
    with pytest.raises(RecipeError, match=r"^<string>:2: stage layer 10 does not exist: the model's decoder has 10 layers"):
        recipe.stages(10)


# --------------------------------------------------------------------------------------------------
# property-based: whatever the input, load_recipe succeeds or raises a located RecipeError
# --------------------------------------------------------------------------------------------------

VALID = {
    "name": "fuzz",
    "description": "base recipe the fuzzer mutates",
    "scorer": {"name": "v2drop", "metric": "l2"},
    "selector": "topk",
    "schedule": {
        "stages": [
            {"layer": 3, "keep": 0.5},
            {"layer": 8, "keep": 0.25, "scorer": {"name": "random", "seed": 1}, "selector": "quota"},
            {"layer": 12, "keep": 0.0},
        ]
    },
}
NAMED = {"scorer": "fastv", "schedule": {"name": "budget", "tokens": 96, "vision_tokens": 576, "depth": [0.1, 0.5, 0.7], "final": 0.0}}
WORDS = ["name", "scorer", "selector", "schedule", "stages", "layer", "keep", "metric", "seed", "tokens", "depth",
         "final", "keep", "v2drop", "fastv", "topk", "quota", "budget", "explicit", "random", "l1", "cosine"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(WORDS)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def _check(recipe_input) -> None:
    """load_recipe (and resolving its stages) either works or raises a located RecipeError."""
    try:
        recipe = tokencomp.load_recipe(recipe_input)
        recipe.stages(16)
    except RecipeError as exc:
        assert LOCATED.match(str(exc)), str(exc)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _paths(value, prefix + (i,))


def _mutate(data, base):
    """Replace, delete or add a value at a few random places of ``base``."""
    tree = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(list(_paths(tree))), label="path")
        op = data.draw(st.sampled_from(["replace", "delete", "add"]), label="op")
        if not path:
            if op == "replace":
                tree = data.draw(values, label="root")
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if op == "replace":
            parent[key] = data.draw(values, label="value")
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(WORDS) | st.text(max_size=6), label="new key")] = data.draw(values, label="value")
        else:
            parent.insert(key, data.draw(values, label="value"))
    return tree


@FUZZ
@given(st.data(), st.sampled_from([VALID, NAMED]))
def test_fuzz_mutated_recipes_as_yaml(data, base):
    tree = _mutate(data, base)
    _check(yaml.safe_dump(tree, sort_keys=False))


@FUZZ
@given(st.data(), st.sampled_from([VALID, NAMED]))
def test_fuzz_mutated_recipes_as_dicts(data, base):
    tree = _mutate(data, base)
    if isinstance(tree, dict):
        _check(tree)


@settings(FUZZ, max_examples=100)
@given(st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), values, max_size=5))
def test_fuzz_random_structures(tree):
    _check(tree)
    _check(yaml.safe_dump(tree))


YAMLISH = st.text(alphabet=st.sampled_from(list("abkl0123.-_ \n\t:[]{},'\"&*!|>#%@?`~\\") + ["\x07", "é", "\ufeff"]), max_size=80)


@FUZZ
@given(st.one_of(st.text(max_size=120), YAMLISH, st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_fuzz_garbage_text(text):
    _check(text)


@FUZZ
@given(st.data())
def test_fuzz_edited_yaml_text(data):
    """Character-level edits (deletions, insertions) of a valid recipe's YAML text."""
    text = list(yaml.safe_dump(data.draw(st.sampled_from([VALID, NAMED])), sort_keys=False, default_flow_style=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()) and pos < len(text):
            del text[pos]
        else:
            text.insert(pos, data.draw(st.sampled_from(list(":-[]{}, \n\t'\"&*!#0.9") + ["\n  ", "\n- "])))
    _check("".join(text))


# --------------------------------------------------------------------------------------------------
# packaging: the shipped recipes are package data of a normal (non-editable) install
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_contains_shipped_recipes(tmp_path):
    """Build a wheel of a copy of the repository, check every schedules/**/*.yaml is inside, then
    install it into a separate folder and load a shipped recipe by name from there."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO, src,
        ignore=shutil.ignore_patterns(".git", ".venv", ".venv-*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "out"),
    )
    pip = [sys.executable, "-m", "pip"]
    flags = ["--no-deps", "--no-build-isolation", "--no-index", "-q"]
    proc = subprocess.run(pip + ["wheel", *flags, "-w", str(tmp_path / "wheels"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "wheels").glob("tokencomp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert f"tokencomp/recipes/{SHIPPED}.yaml" in names
    shipped = {f"tokencomp/recipes/{p.relative_to(REPO / 'schedules').as_posix()}" for p in (REPO / "schedules").rglob("*.y*ml")}
    assert shipped <= names, sorted(shipped - names)
    # every module of the package (a subpackage missing from pyproject's explicit list would be absent)
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "tokencomp").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)

    target = tmp_path / "target"
    proc = subprocess.run(pip + ["install", *flags, "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (
        "import tokencomp, tokencomp.recipe as r; print(tokencomp.__file__); "
        f"print(r.load_recipe({SHIPPED!r}).name); print(len(r.shipped_recipes()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    file, name, count = proc.stdout.split()
    assert Path(file).is_relative_to(target)
    assert name == SHIPPED and int(count) == len(shipped)


@pytest.mark.parametrize(
    "schedule, message",
    [
        ("{name: v2drop, keep: [1.5, 0.3, 0.0]}", r"keep ratios must be in \[0, 1\], got 1.5"),
        ("{name: v2drop, keep: [], depth: []}", r"at least one stage"),
        ("{name: budget, depth: []}", r"at least one drop layer"),
        ("{name: budget, depth: [0.5, 0.2]}", r"strictly increasing"),
        ("explicit", r"at least one stage"),
    ],
)
def test_named_schedules_checked_at_load(schedule, message):
    """Named schedules reject out-of-range or empty parameters when the recipe loads, at their line."""
    with pytest.raises(RecipeError, match=r"^<string>:2: .*" + message):
        tokencomp.load_recipe(f"scorer: v2drop\nschedule: {schedule}\n")
