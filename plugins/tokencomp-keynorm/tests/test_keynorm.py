"""Tests of the keynorm scorer (run after installing the plugin: pytest plugins/tokencomp-keynorm/tests)."""

import pytest
import torch

import tokencomp
import tokencomp.plugins
import tokencomp_keynorm
from tokencomp_keynorm import KeyNormScorer


def _view(hidden):
    B, S, _ = hidden.shape
    mask = torch.ones(B, S, dtype=torch.bool)
    positions = torch.arange(S).expand(B, -1)
    return tokencomp.LayerView(
        layer=1, hidden=hidden, vision_mask=mask, text_mask=~mask, last_index=torch.full((B,), S - 1),
        positions=positions, groups=torch.zeros(B, S, dtype=torch.long), token_index=positions,
    )


def test_scores_are_hidden_state_norms():
    hidden = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]]])
    assert KeyNormScorer().score(_view(hidden)).tolist() == [[5.0, 1.0, 2.0]]
    assert KeyNormScorer(ord=1.0).score(_view(hidden)).tolist() == [[7.0, 1.0, 2.0]]
    assert KeyNormScorer(prefer="low").score(_view(hidden)).tolist() == [[-5.0, -1.0, -2.0]]


@pytest.fixture
def registered():
    """The plugin registered in-process (whether or not its entry point was loaded)."""
    tokencomp.plugins.load_plugins()  # loads the entry point unless autoload is off
    if tokencomp.plugins.pm.is_registered(tokencomp_keynorm):
        yield
        return
    name = tokencomp.plugins.register(tokencomp_keynorm, name="keynorm-test")
    try:
        yield
    finally:
        tokencomp.plugins.unregister(name)


def test_recipe_parameters_are_validated(registered):
    recipe = tokencomp.load_recipe("scorer: {name: keynorm, ord: 1, prefer: low}\nschedule: {stages: [{layer: 1, keep: 0.5}]}\n")
    assert recipe.scorer == KeyNormScorer(ord=1.0, prefer="low")
    with pytest.raises(tokencomp.RecipeError, match=r"^<string>:1: .*ord must be positive"):
        tokencomp.load_recipe("scorer: {name: keynorm, ord: 0}\nschedule: {stages: [{layer: 1, keep: 0.5}]}\n")
