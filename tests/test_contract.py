"""The plugin contract (tokencomp.contract), the pytest kit (tokencomp.pytest_plugin), Python-first
recipes (Recipe.of) and the tokencomp.methods namespace.

Every built-in scorer, selector and merger runs through the same contract, from one list read off the
registry (a new built-in is covered by itself). The default run checks two families per plugin
(llava, qwen2_vl); ``TOKENCOMP_CONTRACT_FAMILIES=all`` (or a comma list) runs the full matrix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

import tokencomp
from tokencomp import contract
from tokencomp.interfaces import Merger, Scorer, Selector, Stage
from tokencomp.plugins import registry
from tokencomp.testing import FAMILIES

_env = os.environ.get("TOKENCOMP_CONTRACT_FAMILIES", "")
CONTRACT_FAMILIES = FAMILIES if _env == "all" else tuple(f for f in _env.split(",") if f) or ("llava", "qwen2_vl")
CHECKS = {"scorer": contract.check_scorer, "selector": contract.check_selector, "merger": contract.check_merger}
BUILTINS = [(kind, e.name) for kind in CHECKS for e in sorted(registry().entries[kind].values(), key=lambda e: e.name) if e.builtin]


@pytest.mark.parametrize("kind,name", BUILTINS, ids=[f"{k}-{n}" for k, n in BUILTINS])
def test_builtin_plugin_passes_the_contract(kind, name):
    result = CHECKS[kind](registry().get(kind, name)(), families=CONTRACT_FAMILIES)
    assert result.checked_families, f"{kind} {name!r} runs on none of {CONTRACT_FAMILIES}: {result.notes}"
    invariants = {o.invariant for o in result.outcomes if o.status == "passed"}
    assert invariants == set(contract.INVARIANTS) - ({"scores"} if kind != "scorer" else set())


def test_the_matrix_covers_every_builtin():
    kinds = {k for k, _ in BUILTINS}
    assert kinds == set(CHECKS)
    assert {"v2drop", "fastv", "cls_attention"} <= {n for k, n in BUILTINS if k == "scorer"}
    assert {"topk", "quota"} <= {n for k, n in BUILTINS if k == "selector"}
    assert {"contextual", "nearest"} <= {n for k, n in BUILTINS if k == "merger"}


# ------------------------------------------------------------------------------------------------
# the contract catches what it promises to catch (negative controls)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noisy(Scorer):
    """Fresh random scores on every call: a padded batch and a solo run keep different tokens."""

    name = "noisy_test"

    def score(self, view):
        return torch.rand(view.hidden.shape[:2])


@dataclass(frozen=True)
class Scribbler(Scorer):
    """Writes into the view."""

    name = "scribbler_test"

    def score(self, view):
        view.hidden.mul_(1.0)  # value unchanged, version counter bumped: the engine notices
        return view.hidden.norm(dim=-1)


@dataclass(frozen=True)
class Infinite(Scorer):
    """+inf on the first vision token of each sample."""

    name = "infinite_test"

    def score(self, view):
        s = view.hidden.norm(dim=-1)
        first = view.vision_mask.long().argmax(1)
        return s.scatter(1, first[:, None], float("inf"))


@dataclass(frozen=True)
class Greedy(Selector):
    """Keeps one token more than its budget."""

    name = "greedy_test"

    def select(self, scores, view, budget):
        order = torch.where(view.vision_mask, scores.float(), torch.tensor(float("-inf"))).argsort(1, descending=True)
        rank = order.argsort(1)
        return view.vision_mask & (rank < (budget + 1)[:, None])


@dataclass(frozen=True)
class Smear(Merger):
    """Changes every kept token, even when nothing is dropped."""

    name = "smear_test"

    def merge(self, view, kept, dropped, summary):
        return view.hidden * 1.5, torch.zeros_like(kept)


def _failed(result):
    return {(o.family, o.invariant) for o in result.failures}


def test_contract_catches_a_batch_dependent_scorer():
    result = contract.check_scorer(Noisy(), families=["qwen2_vl"], raise_on_failure=False)
    assert ("qwen2_vl", "batch==single") in _failed(result)
    with pytest.raises(contract.ContractError, match="batch==single"):
        result.raise_for_failures()
    with pytest.raises(AssertionError):
        contract.check_scorer(Noisy(), families=["qwen2_vl"])


def test_contract_catches_a_scorer_writing_into_the_view():
    result = contract.check_scorer(Scribbler(), families=["llava"], raise_on_failure=False)
    assert ("llava", "read-only view") in _failed(result)
    assert "in place" in str(result)


def test_contract_reports_infinite_scores_and_fails_them_when_asked():
    ok = contract.check_scorer(Infinite(), families=["llava"])
    assert any("inf" in n for n in ok.notes)
    strict = contract.check_scorer(Infinite(), families=["llava"], finite=True, raise_on_failure=False)
    assert _failed(strict) == {("llava", "scores")}


def test_contract_catches_a_selector_over_budget():
    result = contract.check_selector(Greedy(), families=["llava"], raise_on_failure=False)
    assert ("llava", "budget") in _failed(result)


def test_contract_catches_a_merger_that_is_not_the_identity_at_keep_1():
    result = contract.check_merger(Smear(), families=["llava"], raise_on_failure=False)
    assert ("llava", "identity") in _failed(result)


@dataclass(frozen=True)
class NeedsUnknownSignal(Scorer):
    """Declares a vision-tower signal that no adapter computes: every family refuses it at apply."""

    name = "needs_unknown_signal_test"
    signals = ("unknown_signal",)

    def score(self, view):
        return view.signals["unknown_signal"]


def test_families_the_adapter_refuses_are_skipped_and_said_so():
    result = contract.check_scorer(NeedsUnknownSignal(), families=["llava", "qwen2_vl"])
    assert result.checked_families == []
    assert set(result.skipped) == {"llava", "qwen2_vl"}
    assert all("unknown_signal" in why for why in result.skipped.values())
    assert any("qwen2_vl skipped" in n for n in result.notes) and any("llava skipped" in n for n in result.notes)
    assert "no family could run this plugin" in result.notes
    assert not any(o.status == "failed" for o in result.outcomes)


def test_the_callers_plugin_object_is_not_touched():
    scorer = registry().get("scorer", "v2drop")()
    contract.check_scorer(scorer, families=["llava"])
    assert "score" not in vars(scorer)


# ------------------------------------------------------------------------------------------------
# the pytest kit
# ------------------------------------------------------------------------------------------------


def test_make_view_builds_a_valid_view(make_view):
    view = make_view(torch.randn(2, 6, 4))
    assert view.vision_mask[:, 2:5].all() and not view.vision_mask[:, [0, 1, 5]].any()
    assert torch.equal(view.text_mask, ~view.vision_mask) and view.last_index.tolist() == [5, 5]
    assert view.groups[view.vision_mask].eq(0).all() and view.groups[~view.vision_mask].eq(-1).all()
    scores = registry().get("scorer", "uniform")().score(view)
    kept = registry().get("selector", "topk")().select(scores, view, torch.tensor([2, 1]))
    assert kept.sum(1).tolist() == [2, 1] and not (kept & ~view.vision_mask).any()


def test_tiny_models_fixture_is_shared_with_the_contract(tiny_models):
    assert tiny_models["llava"] is contract.tiny_model("llava")
    assert type(tiny_models["qwen2_vl"]).__name__ == "Qwen2VLForConditionalGeneration"


def test_the_kit_works_in_a_plugin_authors_own_tests(tmp_path):
    """A third party's test file enabling the plugin with ``pytest_plugins`` (no tokencomp conftest)."""
    (tmp_path / "test_mine.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            import tokencomp

            pytest_plugins = ["tokencomp.pytest_plugin"]

            @dataclass(frozen=True)
            class Mine(tokencomp.Scorer):
                name = "mine_test"
                def score(self, view):
                    return view.hidden.norm(dim=-1)

            class Plugin:
                @tokencomp.hookimpl
                def register_scorers(self, register):
                    register(Mine)

            def test_mine(in_process_plugin, contract, make_view):
                in_process_plugin(Plugin(), "mine")
                assert tokencomp.load_recipe("scorer: mine_test\\nschedule: {stages: [{layer: 1, keep: 0.5}]}").scorer == Mine()
                assert Mine().score(make_view()).shape == (2, 12)
                contract.check_scorer(Mine(), families=["llava"])
            """
        )
    )
    env = dict(os.environ, TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


# ------------------------------------------------------------------------------------------------
# Python-first recipes
# ------------------------------------------------------------------------------------------------


def test_recipe_of_equals_the_yaml_recipe():
    from tokencomp.methods import ContextualMerger, FastVScorer, RandomScorer, TopK, V2DropScorer

    py = tokencomp.Recipe.of(scorer=V2DropScorer(), stages=[(3, 0.5), (17, 0.3), (22, 0)])
    yml = tokencomp.load_recipe("scorer: v2drop\nschedule:\n  stages:\n    - {layer: 3, keep: 0.5}\n    - {layer: 17, keep: 0.3}\n    - {layer: 22, keep: 0.0}\n")
    assert py.stages(28) == yml.stages(28)
    assert (py.scorer, py.selector, py.schedule) == (yml.scorer, yml.selector, yml.schedule)

    py = tokencomp.Recipe.of(
        scorer=V2DropScorer(metric="l1"),
        selector=TopK(min_keep=1),
        stages=[Stage(0, 0.5, scorer=RandomScorer(), merger=ContextualMerger(tokens=5)), (3, 0.5), Stage(17, 0.3, scorer=FastVScorer())],
    )
    yml = tokencomp.load_recipe(
        """
        scorer: {name: v2drop, metric: l1}
        selector: {name: topk, min_keep: 1}
        schedule:
          stages:
            - {phase: input, keep: 0.5, scorer: random, merge: {name: contextual, tokens: 5}}
            - {layer: 3, keep: 0.5}
            - {layer: 17, keep: 0.3, scorer: fastv}
        """.replace("\n        ", "\n")
    )
    assert py.stages(28) == yml.stages(28)
    assert [s.phase for s in py.stages(28)] == ["input", "prefill", "prefill"]


def test_recipe_of_defaults_names_and_schedules():
    assert tokencomp.Recipe.of().stages(32) == tokencomp.default_recipe().stages(32)
    named = tokencomp.Recipe.of(scorer="fastv", selector={"name": "topk", "min_keep": 1}, schedule={"name": "budget", "tokens": 64})
    yml = tokencomp.load_recipe("scorer: fastv\nselector: {name: topk, min_keep: 1}\nschedule: {name: budget, tokens: 64}\n")
    assert named.stages(32) == yml.stages(32) and named.schedule == yml.schedule
    assert tokencomp.Recipe.of(stages=(2, 0.5)).stages(6) == [Stage(2, 0.5, tokencomp.Recipe.of().scorer, tokencomp.Recipe.of().selector)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(stages=[(3, 1.5)]), "keep must be in"),
        (dict(stages=[(3, 0.5), (3, 0.2)]), "strictly increasing"),
        (dict(stages=[(-1, 0.5)]), ">= 0"),
        (dict(stages=[(3, 0.5, 1)]), "pair"),
        (dict(stages=[]), "non-empty"),
        (dict(stages=[(3, 0.5)], schedule="v2drop"), "not both"),
        (dict(scorer=42), "Scorer instance"),
        (dict(scorer="nope"), "unknown scorer"),
    ],
)
def test_recipe_of_checks_like_a_yaml_recipe(kwargs, message):
    with pytest.raises(tokencomp.RecipeError, match=message):
        tokencomp.Recipe.of(**kwargs)


def test_recipe_of_applies(tiny_models):
    from tokencomp.methods import FastVScorer

    model = tiny_models["llava"]
    inputs = tokencomp.testing.make_inputs(model)
    with torch.no_grad(), tokencomp.apply(model, tokencomp.Recipe.of(scorer=FastVScorer(), stages=[(2, 0.5), (4, 0)])) as h:
        model(**inputs)
    assert h.stats.vision_tokens_per_layer[0] == [64, 64, 32, 32, 0, 0]


def test_methods_namespace_is_built_from_the_registry_and_import_stays_light():
    code = (
        "import sys, tokencomp\n"
        "heavy = [m for m in sys.modules if m.startswith(('transformers', 'tokencomp.scorers', 'tokencomp.methods', 'tokencomp.contract'))]\n"
        "assert not heavy, heavy\n"
        "from tokencomp.methods import V2DropScorer, FastVScorer, TopK, PerGroupQuota, ContextualMerger\n"
        "from tokencomp.plugins import registry\n"
        "assert V2DropScorer is registry().get('scorer', 'v2drop') and PerGroupQuota is registry().get('selector', 'quota')\n"
        "assert 'transformers' not in sys.modules\n"
        "ns = {}\n"
        "exec('from tokencomp.methods import *', ns)\n"
        "want = {e.cls.__name__ for k in ('scorer', 'selector', 'merger', 'schedule') for e in registry().entries[k].values() if e.builtin}\n"
        "assert want <= set(ns) and want == set(tokencomp.methods.classes()), want ^ set(ns)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="no attribute 'Nope'.*V2DropScorer"):
        tokencomp.methods.Nope
