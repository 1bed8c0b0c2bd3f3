"""Tiny LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: configs and their processors' input layouts.

LLaVA-1.5 towers are fixed-resolution (one image = a square of patch tokens); NeXT / OneVision
images are anyres: a base tile plus the best grid of tiles for the image's size, unpadded, with one
``image_newline`` per row. OneVision also takes video (frames pooled 2x2, one newline at the end)
and encodes each of several images per sample as a single tile.
"""

from __future__ import annotations

import math

import torch
import transformers
from transformers.image_processing_utils import select_best_resolution

from .common import IMAGE_ID, VIDEO_ID, VIS_HEADS, VIS_HIDDEN, VIS_INTERMEDIATE, Draw, Family, Item, Layout

IMAGE = 112  # LLaVA-1.5 input side: 8x8 = 64 patch tokens (CLS dropped)
TILE = 56  # NeXT / OneVision anyres tile: 4x4 = 16 tokens per tile
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # like NeXT's: always 2+ tiles
ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]  # like OneVision's: a 1-tile option too
ONEVISION_VIDEO_FRAMES = 8  # each frame pools 4x4 -> 2x2, plus one newline: 8*4+1 = 33 tokens


def clip_vision(image_size: int) -> transformers.CLIPVisionConfig:
    """The one-layer CLIP tower of the LLaVA-1.5 / NeXT tiny models."""
    return transformers.CLIPVisionConfig(
        hidden_size=VIS_HIDDEN,
        intermediate_size=VIS_INTERMEDIATE,
        num_hidden_layers=1,
        num_attention_heads=VIS_HEADS,
        image_size=image_size,
        patch_size=14,
        projection_dim=VIS_HIDDEN,
    )


def _clip_llama(config_class, side: int, text: dict, **fields):
    """A CLIP tower of ``side`` px inputs on a Llama decoder (LLaVA-1.5, NeXT)."""
    return config_class(
        vision_config=clip_vision(side),
        text_config=transformers.LlamaConfig(**text),
        image_token_index=IMAGE_ID,
        image_seq_length=(side // 14) ** 2,
        # One vision layer, so read its output (the real -2 would be the patch embeddings).
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        **fields,
    )


def _llava_config(text: dict):
    return _clip_llama(transformers.LlavaConfig, IMAGE, text)


def _next_config(text: dict):
    return _clip_llama(transformers.LlavaNextConfig, TILE, text, image_grid_pinpoints=NEXT_PINPOINTS)


def _onevision_config(text: dict):
    return transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(
            hidden_size=VIS_HIDDEN,
            intermediate_size=VIS_INTERMEDIATE,
            num_hidden_layers=1,
            num_attention_heads=VIS_HEADS,
            image_size=TILE,
            patch_size=14,
            vision_use_head=False,
        ),
        text_config=transformers.Qwen2Config(**text, use_sliding_window=False),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token
    )


def _unpadded_grid(cur_h: int, cur_w: int, orig_h: int, orig_w: int) -> tuple[int, int]:
    """Size of the anyres feature grid after removing the letterbox padding.

    Same arithmetic as ``unpad_image`` in modeling_llava_next / modeling_llava_onevision.
    """
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return cur_h - 2 * pad, cur_w
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return cur_h, cur_w - 2 * pad


def anyres_token_count(cfg, size: tuple[int, int], one_tile: bool) -> tuple[int, int]:
    """(tiles incl. the base tile, placeholder tokens) of one NeXT / OneVision image of ``size`` (H, W);
    ``one_tile``: encoded as a single base tile plus a newline (OneVision, several images per sample)."""
    tile = cfg.vision_config.image_size
    side = tile // cfg.vision_config.patch_size  # tokens per tile side (CLS, if any, dropped)
    base = side * side
    if one_tile:
        return 1, base + 1
    best_h, best_w = select_best_resolution(list(size), cfg.image_grid_pinpoints)
    nph, npw = best_h // tile, best_w // tile
    grid_h, grid_w = _unpadded_grid(nph * side, npw * side, *size)
    aspect = getattr(cfg, "vision_aspect_ratio", None)
    if aspect:
        # anyres_max_N (OneVision): grids larger than N tiles are bilinearly shrunk.
        max_tiles = int(aspect.strip("anyres_max_"))
        ratio = math.sqrt(grid_h * grid_w / (max_tiles * side**2))
        if ratio > 1.1:
            grid_h, grid_w = int(grid_h // ratio), int(grid_w // ratio)
    return 1 + nph * npw, base + grid_h * (grid_w + 1)  # +1: one image_newline per row


class SquareLayout(Layout):
    """LLaVA-1.5: a fixed-size image is ``(side / patch)^2`` placeholders; pixels ``(N, 3, side, side)``."""

    def image(self, cfg, size, several, draw: Draw) -> Item:
        side = cfg.vision_config.image_size
        if tuple(size) != (side, side):
            raise ValueError(f"{cfg.model_type} has a fixed {side}x{side} input; got image size {size}")
        pixels = draw.pixels(3, side, side)
        return Item.run(IMAGE_ID, (side // cfg.vision_config.patch_size) ** 2, 1, pixels)

    def pack(self, images, videos, batch, n_images):
        return {"pixel_values": torch.stack([i.pixels for i in images])} if images else {}


class AnyresLayout(Layout):
    """LLaVA-NeXT: anyres images; pixels ``(N, max tiles, 3, tile, tile)`` zero-padded, plus ``image_sizes``."""

    def image(self, cfg, size, several, draw: Draw) -> Item:
        tiles, n_tok = anyres_token_count(cfg, size, several)
        tile = cfg.vision_config.image_size
        return Item.run(IMAGE_ID, n_tok, 1, draw.pixels(tiles, 3, tile, tile), tuple(size))

    def pack(self, images, videos, batch, n_images):
        if not images:
            return {}
        # Processor format: zero-padded to the batch maximum; the model slices each image's real
        # tiles using image_sizes.
        first = images[0].pixels
        max_tiles = max(i.pixels.shape[0] for i in images)
        padded = first.new_zeros(len(images), max_tiles, *first.shape[1:])
        for k, item in enumerate(images):
            padded[k, : item.pixels.shape[0]] = item.pixels
        return {"pixel_values": padded, "image_sizes": torch.tensor([i.meta for i in images], dtype=torch.long)}


class OnevisionLayout(AnyresLayout):
    """LLaVA-OneVision: NeXT's images (one tile each when a sample has several, counted in
    ``batch_num_images``), and videos of pooled frames closed by one newline."""

    video = True
    one_tile_when_several = True

    def video_item(self, cfg, draw: Draw) -> Item:
        tile = cfg.vision_config.image_size
        side = tile // cfg.vision_config.patch_size
        frames = ONEVISION_VIDEO_FRAMES
        pixels = draw.pixels(frames, 3, tile, tile)
        # Each frame is 2x2-pooled; one image_newline closes the video.
        return Item.run(VIDEO_ID, frames * math.ceil(side / 2) ** 2 + 1, 2, pixels)

    def pack(self, images, videos, batch, n_images):
        out = super().pack(images, videos, batch, n_images)
        if images:
            out["batch_num_images"] = torch.tensor([n_images] * batch, dtype=torch.long)
        if videos:
            out["pixel_values_videos"] = torch.stack([v.pixels for v in videos])  # (B, frames, 3, h, w)
        return out


FAMILIES = (
    Family("llava", transformers.LlavaForConditionalGeneration, _llava_config, SquareLayout(), (IMAGE, IMAGE)),  # 64 tokens
    # base 16 + 1x2 tiles 4x8 grid + 4 newlines = 52 tokens
    Family("llava_next", transformers.LlavaNextForConditionalGeneration, _next_config, AnyresLayout(), (56, 112),
           ((56, 112), (112, 112))),
    Family("llava_onevision", transformers.LlavaOnevisionForConditionalGeneration, _onevision_config, OnevisionLayout(),
           (56, 112), ((56, 112), (112, 112))),
)
"""The LLaVA families, in :data:`tokencomp.synthetic.FAMILIES` order."""
