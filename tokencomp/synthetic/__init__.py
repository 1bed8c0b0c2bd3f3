"""Random-weight models of every supported family, built offline in milliseconds, and inputs of
exactly the shape the family's processor produces: for tests, the demo and benchmarks.

Nothing here touches the Hugging Face hub: every model is built from a hand-written config with
random weights. Six families (:data:`FAMILIES`) share one small text decoder shape (hidden 64, 4
query heads, 2 KV heads, vocab 256), so results are comparable across families and a forward on
CPU takes milliseconds. All special token ids are small and distinct (the ``*_ID`` constants); random
prompt text is drawn from ``[TEXT_ID_MIN, VOCAB_SIZE)`` so it never collides with them.

* :mod:`~tokencomp.synthetic.tiny` — :func:`tiny_config`, :func:`build_tiny`, :func:`make_inputs`;
* :mod:`~tokencomp.synthetic.llava`, :mod:`~tokencomp.synthetic.qwen_vl` — one module per family
  group: its configs and its processor's input layout (a :class:`~tokencomp.synthetic.common.Family`
  entry each);
* :mod:`~tokencomp.synthetic.shapes` — real checkpoints' decoder shapes (``bench --synthetic``) and
  the ``demo --synthetic`` model;
* :mod:`~tokencomp.synthetic.checkpoints` — tiny checkpoint folders with the family's processor,
  tokenizer and chat template, loadable with ``from_pretrained``.

Typical use::

    model = build_tiny("qwen2_vl")
    inputs = make_inputs(model, batch=2, padding="left")
    logits = model(**inputs).logits
"""

from .checkpoints import save_tiny_checkpoint
from .common import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, TEXT_ID_MIN, VIDEO_ID, VISION_END_ID, VISION_START_ID, VOCAB_SIZE, attn_map
from .shapes import BENCH_SYNTHETIC, SYNTHETIC, build_demo_model, build_synthetic, demo_inputs, parse_synthetic
from .tiny import FAMILIES, FAMILY_SPECS, RAGGED_IMAGE_SIZES, build_tiny, family_spec, make_inputs, tiny_config

__all__ = [
    "FAMILIES",
    "FAMILY_SPECS",
    "RAGGED_IMAGE_SIZES",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "IMAGE_ID",
    "VIDEO_ID",
    "VISION_START_ID",
    "VISION_END_ID",
    "TEXT_ID_MIN",
    "VOCAB_SIZE",
    "attn_map",
    "family_spec",
    "tiny_config",
    "build_tiny",
    "make_inputs",
    "SYNTHETIC",
    "BENCH_SYNTHETIC",
    "parse_synthetic",
    "build_synthetic",
    "build_demo_model",
    "demo_inputs",
    "save_tiny_checkpoint",
]
