"""The shipped toy VLM (tokencomp/toy): it loads like any checkpoint, it sees, and compression shows.

Thresholds are on 50 held-out questions (test split, seed 0). The shipped checkpoint answers 94% of
them (issue 13's bar: 90%; provenance in tokencomp/toy/__init__.py). A keep = 1 recipe answers
identically; a deliberately broken engine (a wrong kept-index map) visibly loses accuracy against
the same recipe run by the real engine (measured 0.76 -> 0.16). Renumbering the kept tokens' positions is *not* a usable control on this
model: its vision features carry their own grid position, and accuracy did not move (0.52 -> 0.52 on
the previous checkpoint).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokencomp
from tokencomp import prefill
from tokencomp.toy import build, harness, scenes

UNTOUCHED_MIN = 0.90  #: issue 13's bar; measured 0.94 on the 50 held-out questions
#: the GENTLE recipe run by a broken engine must lose at least this much accuracy against the real engine
BROKEN_LOSS = 0.15
#: one V²Drop stage dropping 10% of the vision tokens at layer 1 (measured 0.76 with the real engine)
GENTLE = {"schedule": {"stages": [{"layer": 1, "keep": 0.9}]}}


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return harness.load()


@pytest.fixture(scope="module")
def questions():
    return scenes.make_questions("test", 50)


@pytest.fixture(scope="module")
def untouched(loaded, questions):
    model, processor = loaded
    return harness.evaluate(model, processor, questions)


def test_generator_is_deterministic():
    a = scenes.make_questions("test", 20, seed=3)
    b = scenes.make_questions("test", 20, seed=3)
    assert [(q.question, q.answer, q.seed) for q in a] == [(q.question, q.answer, q.seed) for q in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    c = scenes.make_questions("test", 20, seed=4)
    assert [q.seed for q in a] != [q.seed for q in c]
    train = scenes.make_questions("train", 20)
    assert not {q.seed for q in train} & {q.seed for q in a}


def test_questions_are_well_formed():
    qs = scenes.make_questions("test", 100)
    assert {q.kind for q in qs} == set(scenes.KINDS)
    vocab = set(scenes.vocabulary())
    for q in qs:
        assert q.image.shape == (scenes.SIZE, scenes.SIZE, 3) and q.image.dtype == np.uint8
        assert q.mask.shape == (scenes.SIZE, scenes.SIZE) and q.mask.dtype == bool
        assert q.answer in vocab and set(q.question.split()) <= vocab
        if q.answer != "no":  # the asked-about object is there, and its mask covers it
            assert q.mask.sum() > 20


def test_shipped_model_loads_through_auto_classes(loaded):
    model, processor = loaded
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.config.text_config.num_hidden_layers == 12
    q = scenes.make_questions("test", 1)[0]
    enc = harness.encode(processor, [q])
    n_vision = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_vision == (scenes.SIZE // build.PATCH) ** 2 == 256
    # the training fast path feeds exactly what the processor produces
    assert torch.allclose(enc["pixel_values"], build.pixel_values([q.image]), atol=1e-5)
    # the chat template is the one prompt format
    assert build.render(processor, [(q.question, None)], add_generation_prompt=True) == (
        f"USER: <image> {q.question} ASSISTANT:"
    )


def test_untouched_model_sees(untouched):
    acc, answers = untouched
    assert acc >= UNTOUCHED_MIN, (acc, answers)


def test_keep_everything_recipe_changes_nothing(loaded, questions, untouched):
    model, processor = loaded
    recipe = tokencomp.load_recipe({"schedule": {"stages": [{"layer": 3, "keep": 1.0}, {"layer": 8, "keep": 1.0}]}})
    acc, answers = harness.evaluate(model, processor, questions, recipe=recipe)
    assert answers == untouched[1]


def test_dropping_all_vision_tokens_early_loses_accuracy(loaded, questions, untouched):
    model, processor = loaded
    recipe = tokencomp.load_recipe({"schedule": {"stages": [{"layer": 1, "keep": 0.0}]}})
    blind, _ = harness.evaluate(model, processor, questions, recipe=recipe)
    assert blind <= untouched[0] - 0.3, (untouched[0], blind)
    # and the model is restored afterwards
    again, answers = harness.evaluate(model, processor, questions[:10])
    assert answers == untouched[1][:10]


def _wrong_map(self, dtype):
    """Sabotage: the kept-index map is reversed (every kept slot gets the positions and the attention
    mask row of another token; the hidden states stay where they are)."""
    right = self.idx
    self.idx = right.flip(1)
    try:
        real(self, dtype)
    finally:
        self.idx = right


real = prefill.Prefill._regather


def test_a_broken_engine_visibly_loses_accuracy(loaded, questions, monkeypatch):
    model, processor = loaded
    recipe = tokencomp.load_recipe(GENTLE)
    good, _ = harness.evaluate(model, processor, questions, recipe=recipe)
    monkeypatch.setattr(prefill.Prefill, "_regather", _wrong_map)
    broken, _ = harness.evaluate(model, processor, questions, recipe=recipe)
    assert broken <= good - BROKEN_LOSS, (good, broken)


def test_default_demo_runs_on_the_toy_model(tmp_path, capsys):
    from tokencomp.cli import main

    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "the shipped toy LLaVA" in text and "answer untouched:" in text and "answer compressed:" in text
    counts = eval(text.split("vision tokens entering each layer: ")[1].splitlines()[0])
    assert len(counts) == 12 and counts[0] == 256 and counts[-1] == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_synthetic_demo_still_available(tmp_path, capsys):
    from tokencomp.cli import main

    assert main(["demo", "--synthetic", "--out", str(tmp_path / "d.png"), "--quiet"]) == 0
    assert "random-weight LLaVA-1.5 shape" in capsys.readouterr().out
