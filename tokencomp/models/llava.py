"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: plain causal Llama / Qwen2 decoders, nothing to adapt
beyond finding the image / video placeholder ids (NeXT's ``image_newline`` rows sit on placeholder
slots too, so they count as vision tokens). OneVision videos are split into frames for quotas."""

from __future__ import annotations

import math

import torch

import tokencomp
from tokencomp.interfaces import ModelAdapter, token_runs


class LlavaAdapter(ModelAdapter):
    """LLaVA family (``Llava``, ``LlavaNext``, ``LlavaOnevision`` ``ForConditionalGeneration``)."""

    name = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA-OneVision: images as LLaVA-NeXT; a video is frames of pooled tokens plus one newline."""

    name = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def install(self, model, engine):
        cfg = model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        # The model pools each frame's side x side grid to ceil(side/2) x ceil(side/2) tokens.
        self._frame_tokens = math.ceil(side / 2) ** 2
        self._video_id = getattr(cfg, "video_token_id", getattr(cfg, "video_token_index", None))
        return None

    def vision_groups(self, vision_mask, call_kwargs):
        input_ids = call_kwargs.get("input_ids")
        if input_ids is None or getattr(self, "_video_id", None) is None:
            return super().vision_groups(vision_mask, call_kwargs)
        out = torch.full_like(input_ids, -1)
        ft = self._frame_tokens
        for b in range(input_ids.shape[0]):
            group = 0
            for pos, end, tok in token_runs(vision_mask[b], input_ids[b]):  # an image may touch a video
                if tok == self._video_id:
                    # frames x ft pooled tokens, then one newline that joins the last frame
                    frames = max(1, (end - pos - 1) // ft)
                    k = torch.arange(end - pos)
                    out[b, pos:end] = group + torch.clamp(k // ft, max=frames - 1)
                    group += frames
                else:
                    out[b, pos:end] = group
                    group += 1
        return out


@tokencomp.hookimpl
def register_model_adapters(register):
    register(LlavaAdapter)
    register(LlavaOnevisionAdapter)
