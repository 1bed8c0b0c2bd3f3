"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL: configs and their processors' input layouts.

Patch 14, 2x2 spatial merge and 2-frame temporal patches: one LLM token per 28x28 px. Images and
videos are wrapped in vision start / end tokens; pixels are rows of flattened patches, with a
``(t, h, w)`` grid per item. Qwen3-VL writes each temporal step of a video as its own group after
a timestamp token.
"""

from __future__ import annotations

import math

import torch
import transformers

from .common import (
    HEADS,
    HIDDEN,
    IMAGE_ID,
    VIDEO_ID,
    VIS_HEADS,
    VIS_HIDDEN,
    VIS_INTERMEDIATE,
    VISION_END_ID,
    VISION_START_ID,
    Draw,
    Family,
    Item,
    Layout,
)

PATCH = 14
MERGE = 2
TEMPORAL = 2
VIDEO_FRAMES = 4  # -> grid t = 2, so videos really have several temporal steps
VIDEO_SIZE = (112, 112)  # -> grid (2, 8, 8) = 32 tokens

_IDS = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim/2 = 8 pairs as (t, h, w)


def _qwen2_config(text: dict):
    return transformers.Qwen2VLConfig(
        text_config=dict(**text, rope_parameters=dict(_MROPE)),
        vision_config=dict(
            depth=1,
            embed_dim=VIS_HIDDEN,
            hidden_size=HIDDEN,  # merger output = text hidden size
            mlp_ratio=2,
            num_heads=VIS_HEADS,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
        ),
        **_IDS,
    )


def _tower(**fields) -> dict:
    """Vision tower fields shared by the Qwen2.5-VL and Qwen3-VL tiny towers, plus ``fields``."""
    return dict(
        hidden_size=VIS_HIDDEN,
        intermediate_size=VIS_INTERMEDIATE,
        out_hidden_size=HIDDEN,
        num_heads=VIS_HEADS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        **fields,
    )


def _qwen2_5_config(text: dict):
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(**text, rope_parameters=dict(_MROPE)),
        # Block 0 uses windowed attention (window = 2x2 merged tokens), block 1 full attention, so
        # both vision attention paths run.
        vision_config=_tower(depth=2, window_size=56, fullatt_block_indexes=[1]),
        **_IDS,
    )


def _qwen3_config(text: dict):
    return transformers.Qwen3VLConfig(
        text_config=dict(
            **text,
            head_dim=HIDDEN // HEADS,
            # Interleaved M-RoPE over 8 rotary pairs: h gets pairs 1,4; w gets 2,5; t the rest
            # (the scaled-down analogue of the real [24, 20, 20]).
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        ),
        # Three vision blocks, each feeding one deepstack merger, so deepstack features are injected
        # after text layers 0, 1 and 2 like in the real model; an 8x8 learned position grid,
        # interpolated to each image.
        vision_config=_tower(depth=3, deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=64),
        **_IDS,
    )


def grid(size: tuple[int, int], frames: int = 1) -> tuple[int, int, int]:
    """The ``(t, h, w)`` patch grid of an image or video of ``size`` (H, W) pixels.

    Sides are rounded to the nearest multiple of patch*merge (28 px), at least one merged token,
    which is what the image processors' smart_resize does for small images.
    """
    unit = PATCH * MERGE
    gh = max(1, round(size[0] / unit)) * MERGE
    gw = max(1, round(size[1] / unit)) * MERGE
    return max(1, math.ceil(frames / TEMPORAL)), gh, gw


def _wrapped(token: int, n: int, kind: int) -> tuple[list[int], list[int]]:
    """``n`` placeholders between vision start / end tokens (which are text)."""
    return [VISION_START_ID] + [token] * n + [VISION_END_ID], [0] + [kind] * n + [0]


class QwenLayout(Layout):
    """Qwen2-VL / Qwen2.5-VL: wrapped placeholder runs; pixel rows concatenated, one grid per item."""

    video = True
    token_types = True  # transformers 5.x needs mm_token_type_ids to build M-RoPE positions from a grid

    def image(self, cfg, size, several, draw: Draw) -> Item:
        t, h, w = grid(size)
        pixels = draw.pixels(t * h * w, 3 * TEMPORAL * PATCH**2)
        return Item(*_wrapped(IMAGE_ID, t * h * w // MERGE**2, 1), pixels, (t, h, w))

    def video_item(self, cfg, draw: Draw) -> Item:
        t, h, w = grid(VIDEO_SIZE, VIDEO_FRAMES)
        pixels = draw.pixels(t * h * w, 3 * TEMPORAL * PATCH**2)
        return Item(*self._video_tokens(t, h * w // MERGE**2, draw), pixels, (t, h, w))

    def _video_tokens(self, steps: int, per_step: int, draw: Draw) -> tuple[list[int], list[int]]:
        return _wrapped(VIDEO_ID, steps * per_step, 2)

    def pack(self, images, videos, batch, n_images):
        out = {}
        for items, pixels, grids in ((images, "pixel_values", "image_grid_thw"), (videos, "pixel_values_videos", "video_grid_thw")):
            if items:
                out[pixels] = torch.cat([i.pixels for i in items])
                out[grids] = torch.tensor([i.meta for i in items], dtype=torch.long)
        return out


class Qwen3Layout(QwenLayout):
    """Qwen3-VL: each temporal step of a video is its own wrapped group after a timestamp text token,
    inside the outer start / end pair of the chat template."""

    def _video_tokens(self, steps, per_step, draw):
        ids, types = [VISION_START_ID], [0]
        for _ in range(steps):
            stamp = draw.text(1)
            step_ids, step_types = _wrapped(VIDEO_ID, per_step, 2)
            ids += stamp + step_ids
            types += [0] + step_types
        return ids + [VISION_END_ID], types + [0]


_RAGGED = ((112, 224), (56, 112))
FAMILIES = (
    # (112, 224): grid (1, 8, 16) = 32 tokens
    Family("qwen2_vl", transformers.Qwen2VLForConditionalGeneration, _qwen2_config, QwenLayout(), (112, 224), _RAGGED),
    Family("qwen2_5_vl", transformers.Qwen2_5_VLForConditionalGeneration, _qwen2_5_config, QwenLayout(), (112, 224), _RAGGED),
    Family("qwen3_vl", transformers.Qwen3VLForConditionalGeneration, _qwen3_config, Qwen3Layout(), (112, 224), _RAGGED),
)
"""The Qwen families, in :data:`tokencomp.synthetic.FAMILIES` order."""
