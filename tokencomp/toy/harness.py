"""Accuracy of a (possibly compressed) VLM on toy questions.

    from tokencomp.toy import harness, scenes
    model, processor = harness.load()                    # the shipped checkpoint
    qs = scenes.make_questions("test", 200)
    acc, answers = harness.evaluate(model, processor, qs)                       # untouched
    acc, answers = harness.evaluate(model, processor, qs, recipe="v2drop/depth-scaled")

Greedy generation, batched with left padding; an answer is right when the first generated word
equals the expected one-word answer exactly.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from PIL import Image

__all__ = ["CHECKPOINT", "load", "encode", "evaluate"]

CHECKPOINT = os.path.join(os.path.dirname(__file__), "checkpoint")


def load(path: str = CHECKPOINT, dtype=torch.float32, attn_implementation: str = "sdpa"):
    """(model, processor) from `path` through the Auto classes, like any user checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    return model, processor


def encode(processor, questions):
    """Processor inputs (left padded) for `questions`, one image and one user turn each."""
    from .build import render

    texts = [render(processor, [(q.question, None)], add_generation_prompt=True) for q in questions]
    images = [Image.fromarray(q.image) for q in questions]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


@torch.no_grad()
def evaluate(model, processor, questions, recipe=None, batch_size: int = 25, max_new_tokens: int = 2):
    """Return ``(accuracy, answers)``: greedy answers of `model` to `questions`, with `recipe` applied
    through ``tokencomp.apply`` when given (a Recipe, shipped name, path, YAML text or dict)."""
    import tokencomp

    ctx = tokencomp.apply(model, recipe) if recipe is not None else nullcontext()
    answers = []
    with ctx:
        for k in range(0, len(questions), batch_size):
            chunk = questions[k : k + batch_size]
            enc = encode(processor, chunk)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, enc["input_ids"].shape[1] :]
            for row in processor.tokenizer.batch_decode(new, skip_special_tokens=True):
                words = row.split()
                answers.append(words[0] if words else "")
    right = sum(a == q.answer for a, q in zip(answers, questions))
    return right / max(1, len(questions)), answers
