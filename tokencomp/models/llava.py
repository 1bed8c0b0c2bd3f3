"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: plain causal Llama / Qwen2 decoders, nothing to adapt
beyond finding the image / video placeholder ids (NeXT's ``image_newline`` rows sit on placeholder
slots too, so they count as vision tokens)."""

from __future__ import annotations

import tokencomp
from tokencomp.interfaces import ModelAdapter


class LlavaAdapter(ModelAdapter):
    """LLaVA family (``Llava``, ``LlavaNext``, ``LlavaOnevision`` ``ForConditionalGeneration``)."""

    name = "llava"
    model_classes = (
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration",
    )


@tokencomp.hookimpl
def register_model_adapters(register):
    register(LlavaAdapter)
