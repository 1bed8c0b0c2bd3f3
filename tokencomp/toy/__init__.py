"""A small LLaVA-architecture VLM that really sees, trained on CPU on procedural shape scenes.

* :mod:`tokencomp.toy.scenes` — the deterministic visual-QA generator (images, questions,
  one-word answers, ground-truth masks), train and held-out test splits.
* :mod:`tokencomp.toy.build` — tokenizer, ``LlavaProcessor`` (with the chat template: the one
  definition of the prompt format) and ``LlavaForConditionalGeneration`` construction.
* :mod:`tokencomp.toy.train` — ``python -m tokencomp.toy.train``: training from scratch.
* :mod:`tokencomp.toy.harness` — ``load()`` the shipped checkpoint and ``evaluate()`` accuracy,
  optionally under a tokencomp recipe.

The shipped checkpoint (``tokencomp/toy/checkpoint/``) loads through
``AutoProcessor.from_pretrained`` / ``AutoModelForImageTextToText.from_pretrained``.
"""

# Provenance of the shipped checkpoint (fp16, 5.0 MB, 2.49M parameters): the final save of
# ``python -m tokencomp.toy.train --keep-best --out DIR`` (the defaults: seed 0, 400 vision steps, 1600
# language steps, batch 12, attention guidance 0.5 at layers 2,3; ~53 min on the shared 2-core CPU,
# ~1.1 s per language step when the machine is quiet). Validation (200 held-out questions, test split
# seed 1, first-token argmax): 0.37 / 0.52 / 0.64 / 0.69 / 0.72 at steps 200 / 600 / 800 / 1400 / 1600
# (colour 0.91, where 0.85, count 0.67, which 0.64, exists 0.64) -- still rising when the schedule
# ended. It answers 74% of the tests' 50 held-out questions (20% blind). Issue 13's 90% target is NOT
# reached: a longer run (more language steps) is the next step. The previous checkpoint (plain-fill
# shapes, one-phase training) had 36.5%.
