"""Tests of the keynorm scorer, with tokencomp's test kit (run: pytest plugins/tokencomp-keynorm/tests)."""

import pytest
import torch

import tokencomp
import tokencomp_keynorm
from tokencomp_keynorm import KeyNormScorer

pytest_plugins = ["tokencomp.pytest_plugin"]  # make_view, in_process_plugin, tiny_models, contract


def test_scores_are_hidden_state_norms(make_view):
    view = make_view(torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]]]))
    assert KeyNormScorer().score(view).tolist() == [[5.0, 1.0, 2.0]]
    assert KeyNormScorer(ord=1.0).score(view).tolist() == [[7.0, 1.0, 2.0]]
    assert KeyNormScorer(prefer="low").score(view).tolist() == [[-5.0, -1.0, -2.0]]


@pytest.mark.parametrize("scorer", [KeyNormScorer(), KeyNormScorer(ord=1.0, prefer="low")])
def test_contract(contract, scorer):
    # identity at keep 1, batch == single, cache == no-cache, read-only view, scores, budgets
    contract.check_scorer(scorer, families=["llava", "qwen2_vl"])


def test_recipe_parameters_are_validated(in_process_plugin):
    in_process_plugin(tokencomp_keynorm, "keynorm-test")  # no-op when the entry point loaded it
    recipe = tokencomp.load_recipe("scorer: {name: keynorm, ord: 1, prefer: low}\nschedule: {stages: [{layer: 1, keep: 0.5}]}\n")
    assert recipe.scorer == KeyNormScorer(ord=1.0, prefer="low")
    with pytest.raises(tokencomp.RecipeError, match=r"^<string>:1: .*ord must be positive"):
        tokencomp.load_recipe("scorer: {name: keynorm, ord: 0}\nschedule: {stages: [{layer: 1, keep: 0.5}]}\n")
