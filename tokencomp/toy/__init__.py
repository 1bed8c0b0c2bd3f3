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

# Provenance of the shipped checkpoint (fp16, 5.0 MB, 2.49M parameters): two runs of
# ``python -m tokencomp.toy.train`` (single command of each, ~53 + ~23 min on the shared 2-core CPU,
# ~1.1 s per language step when the machine is quiet):
#   1. ``--keep-best --out A`` (the defaults: seed 0, 400 vision steps, 1600 language steps, batch 12,
#      lr 1e-3, attention guidance 0.5 at layers 2,3): validation 0.37 / 0.52 / 0.64 / 0.69 / 0.72 at
#      steps 200 / 600 / 800 / 1400 / 1600 (still rising when the schedule ended);
#   2. ``--init A --data-offset 100000 --steps 1100 --warmup 30 --lr 5e-4 --keep-best --out B``:
#      0.68 / 0.71 / 0.75 / 0.76 / 0.755 / 0.765 at steps 200 ... 1100 (colour 0.86, count 0.74,
#      exists 0.69, where 0.96, which 0.69). B is shipped.
# Validation: 200 held-out questions, test split seed 1, first-token argmax. It answers 78% of the
# tests' 50 held-out questions. Issue 13's 90% target is NOT reached; longer language training is
# the next step (the curve had not flattened). The previous checkpoint (plain-fill shapes, one-phase
# training) had 36.5%.
