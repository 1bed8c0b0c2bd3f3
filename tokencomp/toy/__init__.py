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

# Provenance of the shipped checkpoint (fp16, 5.0 MB, 2.49M parameters): the step-600 save of
# ``python -m tokencomp.toy.train --steps 700 --out DIR`` (seed 0, one thread, ~28 min on a shared
# 2-core CPU; the run was stopped after that save). It is WEAK: 36.5% on 200 held-out questions
# (blind prior 31%); it reliably uses the image only for "where" questions. Issue 13's 90% target
# is not reached — longer training (more steps, lower LR once the LM loss leaves the 0.62 prior
# plateau) is the obvious next step.
#
# Retraining attempt (issue 13, item 4): continuing from the shipped weights with the vision tower
# frozen (``--init tokencomp/toy/checkpoint --freeze-vision --keep-best --lr 1e-3 --warmup 30
# --data-offset 20000``) left the LM loss on its 0.62 prior plateau; after 100 steps (~9 min on a
# contended core) validation accuracy was 0.365 vs 0.385 for the shipped weights (200 questions,
# test split seed 1), so nothing new was shipped. Accuracy under compression: ACCURACY.md.
