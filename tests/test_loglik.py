"""tokencomp.loglik: the causal-LM loss from a compressed forward's (shorter) logits, without lmms-eval."""

import pytest
import torch

import tokencomp
from tokencomp import testing as T
from tokencomp.loglik import causal_lm_loss, restore_logits

KEEP_ALL = "scorer: v2drop\nschedule: {stages: [{layer: 2, keep: 1.0}]}\n"
DROP = "scorer: v2drop\nschedule: {stages: [{layer: 1, keep: 0.25}]}\n"


def test_loss_from_surviving_logits_matches_full_logits():
    torch.manual_seed(0)
    B, L, V = 2, 10, 7
    full = torch.randn(B, L, V)
    labels = torch.full((B, L), -100)
    labels[:, 7:] = torch.randint(0, V, (B, 3))
    # positions 2..4 were vision tokens; row 0 kept position 2, row 1 position 3
    pos = torch.stack([torch.tensor([0, 1, 2, 5, 6, 7, 8, 9]), torch.tensor([0, 1, 3, 5, 6, 7, 8, 9])])
    short = torch.stack([full[b, pos[b]] for b in range(B)])
    loss, logits = causal_lm_loss(short, labels, pos)
    ref = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.equal(logits[:, 5:], full[:, 5:])
    restored, present = restore_logits(short, pos, L)
    assert torch.equal(restored, logits)
    assert present.sum(1).tolist() == [8, 8] and not present[0, 3] and present[1, 3]
    assert torch.equal(restored[0, 3], torch.zeros(V))  # a dropped position has no logits


def test_no_prediction_from_a_dropped_position():
    """The label after a dropped position is not scored (it would be predicted from zeros)."""
    V = 5
    logits = torch.randn(1, 3, V)
    labels = torch.tensor([[-100, -100, 1, 2]])
    pos = torch.tensor([[0, 2, 3]])  # position 1 dropped: the label at 2 is not scored
    loss, _ = causal_lm_loss(logits, labels, pos)
    ref = torch.nn.functional.cross_entropy(logits[0, 1:2], labels[0, 3:])  # position 2 predicts 3
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_full_length_logits_pass_through():
    logits = torch.randn(2, 6, 4)
    labels = torch.randint(0, 4, (2, 6))
    loss, out = causal_lm_loss(logits, labels, torch.arange(6).expand(2, 6))
    assert out is logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 4), labels[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def _labels(inputs, tail=3):
    """Score the last ``tail`` text tokens of every row (a continuation after the prompt)."""
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -tail:] = inputs["input_ids"][:, -tail:]
    return labels


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_loss_of_a_compressed_forward(family):
    """Keep-all: equal to the model's own loss; dropping: the continuation is still fully scored."""
    model = T.build_tiny(family, layers=4)
    inputs = T.make_inputs(model, batch=2)
    labels = _labels(inputs)
    with torch.no_grad():
        ref = model(**inputs, labels=labels).loss
        for recipe, same in ((KEEP_ALL, True), (DROP, False)):
            seen = []
            with tokencomp.apply(model, recipe) as handle:
                handle.on_prefill(seen.append)
                out = model(**inputs)
            (stats,) = seen
            loss, logits = causal_lm_loss(out.logits, labels, stats.output_positions)
            assert logits.shape[:2] == labels.shape and torch.isfinite(loss)
            if same:
                assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
            else:
                assert out.logits.shape[1] < labels.shape[1]  # really compacted
