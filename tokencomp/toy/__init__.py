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
