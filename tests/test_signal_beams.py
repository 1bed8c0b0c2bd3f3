"""The vision-tower signal under ``generate`` paths that repeat the prompt: beams, several returned
sequences (beams or sampling). ``generate`` encodes the images before the prefill and repeats the
encoded items per sample; every family must give each copy its own sample's values, so the output
equals the same ``generate`` driven by the signal of the un-repeated batch."""

from __future__ import annotations

import pytest
import torch

import tokencomp
from tokencomp.synthetic import FAMILIES, make_inputs

from test_engine import no_stop
from test_qwen_signals import qwen
from test_signals import deep_anyres, deep_llava, signal_seen

# Two samples whose vision tokens differ in number where the family allows it; OneVision and the
# Qwen families also put an image and a video in one prompt (two encoders, interleaved placement).
INPUTS = {
    "llava": dict(batch=2),
    "llava_next": dict(batch=2, image_sizes=[(336, 336), (112, 336)]),
    "llava_onevision": dict(batch=2, video=True, n_images=1, image_sizes=[(336, 336), (112, 336)]),
    "qwen2_vl": dict(batch=2, video=True, n_images=1, image_sizes=[(112, 168), (56, 112)]),
    "qwen2_5_vl": dict(batch=2, video=True, n_images=1, image_sizes=[(112, 168), (56, 112)]),
    "qwen3_vl": dict(batch=2, video=True, n_images=1, image_sizes=[(112, 168), (56, 112)]),
}
assert set(INPUTS) == set(FAMILIES)

MODES = {  # generate options and how many copies of each sample the prefill holds
    "greedy": (dict(do_sample=False), 1),
    "beams": (dict(do_sample=False, num_beams=2), 2),
    "beams, 2 returned": (dict(do_sample=False, num_beams=2, num_return_sequences=2), 2),
    "sampling, 2 returned": (dict(do_sample=True, num_return_sequences=2), 2),
    "beam sampling, 2 returned": (dict(do_sample=True, num_beams=2, num_return_sequences=2), 2),
}
"""``generate`` repeats its inputs in one place (``_expand_inputs_for_generation``), by
``max(num_beams, num_return_sequences)``, in every mode; these cover greedy, sampling and beams."""

_models: dict = {}


def model_of(family):
    """A tiny model of ``family`` whose tower has several layers (the signal's layer is a real one)."""
    if family not in _models:
        if family == "llava":
            model = deep_llava()
        elif family.startswith("llava"):
            model = deep_anyres(family)
        else:
            model = qwen(family)
        gen = model.generation_config
        gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = 0, 1, 2
        _models[family] = model
    return _models[family]


class PlainSignal(tokencomp.Scorer):
    """Scores by a fixed ``(B, L)`` signal, repeated per copy when the prefill repeats each sample."""

    name = "plain_signal"

    def __init__(self, table):
        self.table = table

    def score(self, view):
        copies = view.positions.shape[0] // self.table.shape[0]
        table = self.table.repeat_interleave(copies, dim=0).to(view.positions.device)
        return table.gather(1, view.positions)


def run_generate(model, inputs, options, scorer=None):
    torch.manual_seed(0)  # sampling draws the same numbers in both runs
    kwargs = dict(max_new_tokens=3, suppress_tokens=no_stop(model), output_scores=True, return_dict_in_generate=True)
    return model.generate(**inputs, **options, **kwargs)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_repeats_each_samples_signal_and_equals_the_plain_signal_run(family, mode):
    model = model_of(family)
    inputs = make_inputs(model, **INPUTS[family])
    options, copies = MODES[mode]
    plain = signal_seen(model, inputs)
    vision = plain != 0
    assert plain[0][vision[0]].std() > 0 and not torch.equal(plain[0], plain[1])  # samples really differ

    outputs = []
    seen = signal_seen(model, inputs, lambda h: outputs.append(run_generate(model, inputs, options)))
    assert torch.equal(seen, plain.repeat_interleave(copies, dim=0))  # copy c of sample b: sample b's values

    with torch.no_grad(), tokencomp.apply(model, tokencomp.Recipe.of(scorer=PlainSignal(plain), stages=[(0, 0.25)])):
        ref = run_generate(model, inputs, options)
    assert torch.equal(outputs[0].sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(outputs[0].scores, ref.scores))


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_items_encoded_outside_the_forward_keep_their_values_when_repeated(family):
    """The pre-encoding that ``generate`` does, by hand: encode, repeat the items the way beams do
    (a sample's items as a group), pass them as ``mm_encoder_outputs``; the prefill sees the plain
    values in the repeated order, also with the samples' order swapped."""
    model = model_of(family)
    inputs = make_inputs(model, **{k: v for k, v in INPUTS[family].items() if k not in ("video", "n_images")})
    order = [1, 0, 1]  # sample 1, sample 0, sample 1 again

    def call(handle):
        pixels = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
        encoded = model.model.get_image_features(**pixels, return_dict=True)
        items = list(encoded.pooler_output)
        encoded.pooler_output = [items[b] for b in order]
        model(input_ids=inputs["input_ids"][order], attention_mask=inputs["attention_mask"][order], mm_encoder_outputs={"image": encoded})

    assert torch.equal(signal_seen(model, inputs, call), signal_seen(model, inputs)[order])
