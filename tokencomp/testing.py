"""Tiny random-weight vision-language models and synthetic inputs for tests, demos and benchmarks.

Nothing here touches the Hugging Face hub: every model is built from a hand-written config with
random weights, and every input is a random tensor of exactly the shape the model's processor would
have produced. Six families are covered (see :data:`FAMILIES`); they share one small text decoder
shape (hidden 64, 4 query heads, 2 KV heads, vocab 256) so that results are comparable across
families and a forward pass on CPU takes milliseconds.

Typical use::

    model = build_tiny("qwen2_vl")
    inputs = make_inputs(model, batch=2, padding="left")
    logits = model(**inputs).logits
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                         suppress_tokens=suppress_ids(model))

All special token ids are small and distinct (see the ``*_ID`` constants), and the random prompt
text is drawn from ``[TEXT_ID_MIN, VOCAB_SIZE)`` so it never collides with them.
"""

from __future__ import annotations

import math

import torch
import transformers
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.image_processing_utils import select_best_resolution

__all__ = [
    "FAMILIES",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "IMAGE_ID",
    "VIDEO_ID",
    "VISION_START_ID",
    "VISION_END_ID",
    "TEXT_ID_MIN",
    "VOCAB_SIZE",
    "tiny_config",
    "build_tiny",
    "make_inputs",
    "take_sample",
    "vision_token_ids",
    "suppress_ids",
]

#: Supported model families, by their ``config.model_type``.
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Special token ids, shared by all families. Small and distinct so they fit the 256-token vocab and
# a test can tell them apart; families without a video/vision-start token simply don't use them.
PAD_ID = 0  #: padding token (also the embedding padding_idx)
BOS_ID = 1  #: beginning-of-sequence token
EOS_ID = 2  #: end-of-sequence token
IMAGE_ID = 3  #: image placeholder token
VIDEO_ID = 4  #: video placeholder token (llava_onevision, Qwen families)
VISION_START_ID = 5  #: Qwen ``<|vision_start|>``
VISION_END_ID = 6  #: Qwen ``<|vision_end|>``
TEXT_ID_MIN = 10  #: random prompt text is drawn from [TEXT_ID_MIN, VOCAB_SIZE)
VOCAB_SIZE = 256  #: text vocabulary size of every tiny model

# Text decoder shape shared by all families: GQA (4 query heads, 2 KV heads), head_dim 16.
_HIDDEN = 64
_HEADS = 4
_KV_HEADS = 2
_INTERMEDIATE = 128
_MAX_POS = 1024

# Vision tower shape: as small as the modeling code allows.
_VIS_HIDDEN = 32
_VIS_HEADS = 2
_VIS_INTERMEDIATE = 64

# LLaVA-family towers are fixed-resolution; the tile side decides the tokens per tile.
_LLAVA_IMAGE = 112  # 8x8 = 64 patch tokens (CLS dropped)
_TILE = 56  # NeXT / OneVision anyres tile: 4x4 = 16 tokens per tile
_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # like NeXT's: always 2+ tiles
_OV_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]  # like OneVision's: a 1-tile option too
_ONEVISION_VIDEO_FRAMES = 8  # each frame pools 4x4 -> 2x2, plus one newline: 8*4+1 = 33 tokens

# Qwen: patch 14, 2x2 spatial merge, 2-frame temporal patches -> one LLM token per 28x28 px.
_QWEN_PATCH = 14
_QWEN_MERGE = 2
_QWEN_TEMPORAL = 2
_QWEN_VIDEO_FRAMES = 4  # -> grid t = 2, so videos really have several temporal steps
_QWEN_VIDEO_SIZE = (112, 112)  # -> grid (2, 8, 8) = 32 tokens

#: Two image sizes per family whose samples then differ in vision-token count (ragged batches).
RAGGED_IMAGE_SIZES = {
    "qwen2_vl": [(112, 224), (56, 112)],
    "qwen2_5_vl": [(112, 224), (56, 112)],
    "qwen3_vl": [(112, 224), (56, 112)],
    "llava_next": [(56, 112), (112, 112)],
    "llava_onevision": [(56, 112), (112, 112)],
}

# Default image (H, W) per family when make_inputs gets no image_sizes.
_DEFAULT_IMAGE = {
    "llava": (_LLAVA_IMAGE, _LLAVA_IMAGE),  # 64 tokens
    "llava_next": (56, 112),  # base 16 + 1x2 tiles 4x8 grid + 4 newlines = 52 tokens
    "llava_onevision": (56, 112),  # same layout as NeXT = 52 tokens
    "qwen2_vl": (112, 224),  # grid (1, 8, 16) = 32 tokens
    "qwen2_5_vl": (112, 224),
    "qwen3_vl": (112, 224),
}

_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}

_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_ANYRES = ("llava_next", "llava_onevision")
_ATTN = ("eager", "sdpa", "flash_attention_2")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _text_kwargs(layers: int) -> dict:
    """Decoder fields common to every family's text config."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=_HIDDEN,
        intermediate_size=_INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS,
        max_position_embeddings=_MAX_POS,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def _clip_vision(image_size: int) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(
        hidden_size=_VIS_HIDDEN,
        intermediate_size=_VIS_INTERMEDIATE,
        num_hidden_layers=1,
        num_attention_heads=_VIS_HEADS,
        image_size=image_size,
        patch_size=14,
        projection_dim=_VIS_HIDDEN,
    )


def _attn_map(attn: str) -> dict:
    """Per-sub-config attention choice: `attn` for the text decoder, something CPU-safe for vision.

    The vision tower never needs flash attention for these tests, and keeping it on sdpa means a
    flash text decoder only needs flash kernels where they are being tested.
    """
    if attn not in _ATTN:
        raise ValueError(f"attn must be one of {_ATTN}, got {attn!r}")
    vision = "eager" if attn == "eager" else "sdpa"
    return {"": attn, "text_config": attn, "vision_config": vision}


# Placeholder and delimiter ids shared by the three Qwen-VL families.
_QWEN_IDS = dict(
    image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID
)


def tiny_config(family: str, *, layers: int = 6, attn: str = "sdpa") -> transformers.PretrainedConfig:
    """Return the tiny config of `family` with `layers` text decoder layers.

    The text decoder gets attention implementation `attn` ("eager", "sdpa" or
    "flash_attention_2"); the vision tower uses eager when `attn` is eager and sdpa otherwise.
    Special token ids are the module's ``*_ID`` constants.
    """
    _check_family(family)
    if layers < 1:
        raise ValueError("layers must be >= 1")
    text = _text_kwargs(layers)

    if family == "llava":
        cfg = transformers.LlavaConfig(
            vision_config=_clip_vision(_LLAVA_IMAGE),
            text_config=transformers.LlamaConfig(**text),
            image_token_index=IMAGE_ID,
            image_seq_length=(_LLAVA_IMAGE // 14) ** 2,
            # One vision layer, so read its output (the real -2 would be the patch embeddings).
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
    elif family == "llava_next":
        cfg = transformers.LlavaNextConfig(
            vision_config=_clip_vision(_TILE),
            text_config=transformers.LlamaConfig(**text),
            image_token_index=IMAGE_ID,
            image_grid_pinpoints=_NEXT_PINPOINTS,
            image_seq_length=(_TILE // 14) ** 2,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
    elif family == "llava_onevision":
        cfg = transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(
                hidden_size=_VIS_HIDDEN,
                intermediate_size=_VIS_INTERMEDIATE,
                num_hidden_layers=1,
                num_attention_heads=_VIS_HEADS,
                image_size=_TILE,
                patch_size=14,
                vision_use_head=False,
            ),
            text_config=transformers.Qwen2Config(**text, use_sliding_window=False),
            image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID,
            image_grid_pinpoints=_OV_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",  # SigLIP has no CLS token
        )
    elif family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(
            text_config=dict(
                **text,
                # M-RoPE splits head_dim/2 = 8 rotary pairs into (t, h, w) sections.
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            ),
            vision_config=dict(
                depth=1,
                embed_dim=_VIS_HIDDEN,
                hidden_size=_HIDDEN,  # merger output = text hidden size
                mlp_ratio=2,
                num_heads=_VIS_HEADS,
                patch_size=_QWEN_PATCH,
                spatial_merge_size=_QWEN_MERGE,
                temporal_patch_size=_QWEN_TEMPORAL,
            ),
            **_QWEN_IDS,
        )
    elif family == "qwen2_5_vl":
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=dict(
                **text,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            ),
            vision_config=dict(
                depth=2,
                hidden_size=_VIS_HIDDEN,
                intermediate_size=_VIS_INTERMEDIATE,
                out_hidden_size=_HIDDEN,
                num_heads=_VIS_HEADS,
                patch_size=_QWEN_PATCH,
                spatial_merge_size=_QWEN_MERGE,
                temporal_patch_size=_QWEN_TEMPORAL,
                # Block 0 uses windowed attention (window = 2x2 merged tokens), block 1 full
                # attention, so both vision attention paths run.
                window_size=56,
                fullatt_block_indexes=[1],
            ),
            **_QWEN_IDS,
        )
    else:  # qwen3_vl
        cfg = transformers.Qwen3VLConfig(
            text_config=dict(
                **text,
                head_dim=_HIDDEN // _HEADS,
                # Interleaved M-RoPE over 8 rotary pairs: h gets pairs 1,4; w gets 2,5; t the rest
                # (the scaled-down analogue of the real [24, 20, 20]).
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [4, 2, 2],
                    "mrope_interleaved": True,
                },
            ),
            vision_config=dict(
                # Three vision blocks, each feeding one deepstack merger, so deepstack features are
                # injected after text layers 0, 1 and 2 like in the real model.
                depth=3,
                deepstack_visual_indexes=[0, 1, 2],
                hidden_size=_VIS_HIDDEN,
                intermediate_size=_VIS_INTERMEDIATE,
                out_hidden_size=_HIDDEN,
                num_heads=_VIS_HEADS,
                patch_size=_QWEN_PATCH,
                spatial_merge_size=_QWEN_MERGE,
                temporal_patch_size=_QWEN_TEMPORAL,
                num_position_embeddings=64,  # 8x8 learned grid, interpolated to each image
            ),
            **_QWEN_IDS,
        )

    cfg._attn_implementation = _attn_map(attn)
    return cfg


def build_tiny(
    family: str,
    *,
    layers: int = 6,
    attn: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """Build the tiny ``*ForConditionalGeneration`` of `family` with random weights, in eval mode.

    Weights depend only on `seed` (the global torch RNG state is saved and restored around the
    build, so callers' randomness is unaffected). The model is on CPU in `dtype`; its
    ``generation_config`` carries the pad/bos/eos ids so padded ``generate`` works.
    """
    cfg = tiny_config(family, layers=layers, attn=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _CLASSES[family]._from_config(cfg, attn_implementation=_attn_map(attn), dtype=dtype)
    model.eval()
    gen = model.generation_config
    gen.pad_token_id = PAD_ID
    gen.bos_token_id = BOS_ID
    gen.eos_token_id = EOS_ID
    return model


def _family_of(model) -> str:
    family = model.config.model_type
    _check_family(family)
    return family


def vision_token_ids(model) -> list[int]:
    """Image (and, where the family has one, video) placeholder token ids: the model adapter's."""
    from .plugins import registry

    return registry().adapter_for(model).vision_token_ids()


def suppress_ids(model) -> list[int]:
    """All special placeholder ids of `model` (image, video, vision start/end).

    Pass as ``generate(suppress_tokens=...)``: a random model may otherwise emit a placeholder,
    which breaks any later re-run of the prompt plus generated tokens.
    """
    cfg = model.config
    ids = vision_token_ids(model)
    for name in ("vision_start_token_id", "vision_end_token_id"):
        value = getattr(cfg, name, None)
        if value is not None:
            ids.append(value)
    return sorted(set(ids))


# ----------------------------------------------------------------------------- token counts


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


def _anyres_layout(cfg, size: tuple[int, int], multi_image: bool) -> tuple[int, int]:
    """(tiles incl. the base tile, placeholder tokens) of one NeXT/OneVision image of `size` (H, W)."""
    tile = cfg.vision_config.image_size
    side = tile // cfg.vision_config.patch_size  # tokens per tile side (CLS, if any, dropped)
    base = side * side
    if multi_image:
        # OneVision with several images per sample encodes each as a single base tile + newline.
        return 1, base + 1
    best_h, best_w = select_best_resolution(list(size), cfg.image_grid_pinpoints)
    nph, npw = best_h // tile, best_w // tile
    grid_h, grid_w = _unpadded_grid(nph * side, npw * side, *size)
    if cfg.model_type == "llava_onevision":
        # anyres_max_N: grids larger than N tiles are bilinearly shrunk.
        max_tiles = int(cfg.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(grid_h * grid_w / (max_tiles * side**2))
        if ratio > 1.1:
            grid_h, grid_w = int(grid_h // ratio), int(grid_w // ratio)
    return 1 + nph * npw, base + grid_h * (grid_w + 1)  # +1: one image_newline per row


def _qwen_grid(size: tuple[int, int], frames: int = 1) -> tuple[int, int, int]:
    """Qwen (t, h, w) patch grid for an image or video of `size` (H, W) pixels.

    Sides are rounded to the nearest multiple of patch*merge (28 px), at least one merged token,
    which is what the Qwen image processors' smart_resize does for small images.
    """
    unit = _QWEN_PATCH * _QWEN_MERGE
    gh = max(1, round(size[0] / unit)) * _QWEN_MERGE
    gw = max(1, round(size[1] / unit)) * _QWEN_MERGE
    return max(1, math.ceil(frames / _QWEN_TEMPORAL)), gh, gw


# ----------------------------------------------------------------------------- inputs


def _per_sample_sizes(family: str, image_sizes, batch: int, n_images: int) -> list[list[tuple[int, int]]]:
    """Normalise `image_sizes` to one (H, W) per image per sample."""
    if image_sizes is None:
        return [[_DEFAULT_IMAGE[family]] * n_images for _ in range(batch)]
    if len(image_sizes) != batch:
        raise ValueError(f"image_sizes has {len(image_sizes)} entries, expected one per sample ({batch})")
    def is_size(x) -> bool:
        # A bare (H, W) pair; elements may be Python, numpy or 0-d tensor integers.
        return len(x) == 2 and not any(hasattr(v, "__len__") for v in x)

    out = []
    for entry in image_sizes:
        if is_size(entry):
            out.append([(int(entry[0]), int(entry[1]))] * n_images)  # one size for all its images
        else:
            if len(entry) != n_images or not all(is_size(s) for s in entry):
                raise ValueError(f"image_sizes entry {entry!r}: expected (H, W) or {n_images} (H, W) pairs")
            out.append([(int(s[0]), int(s[1])) for s in entry])
    return out


def make_inputs(
    model,
    *,
    batch: int = 1,
    image_sizes=None,
    n_images: int = 1,
    video: bool = False,
    padding: str = "left",
    text_lens=None,
    seed: int = 0,
) -> dict:
    """Random multimodal inputs for `model`, ready for ``model(**inputs)`` and ``model.generate(**inputs)``.

    Each sample is ``prefix text, n_images images, [video], suffix text``: the image/video
    placeholders come in exactly the number the model expects (Qwen: wrapped in vision start/end
    tokens; Qwen3-VL videos: one start/end group per temporal step, preceded by a timestamp-like
    text token, as its processor does). Text ids are drawn from ``[TEXT_ID_MIN, VOCAB_SIZE)``.

    Args:
        batch: number of samples. By default sample ``i`` has ``3 + 2*i`` prefix and ``3 + i``
            suffix tokens, so a batch is always padded.
        image_sizes: optional list with one entry per sample: an ``(H, W)`` pixel size for all of
            its images, or a list of ``n_images`` sizes. llava accepts only its fixed 112x112;
            NeXT/OneVision sizes select the anyres tiling (ragged token counts); Qwen sizes are
            rounded to multiples of 28 px and give ragged ``image_grid_thw``.
        n_images: images per sample (0 for none). Multi-image OneVision samples use one tile per
            image (``batch_num_images``), like its processor.
        video: add one video per sample (llava_onevision and Qwen families only).
        padding: ``"left"`` or ``"right"``: where pad tokens (attention_mask 0) go.
        text_lens: optional list of ``(prefix_len, suffix_len)`` per sample.
        seed: all random content (text ids, pixels) depends only on this seed.

    Tensors are put on ``model.device``; pixel tensors use ``model.dtype``.
    """
    family = _family_of(model)
    cfg = model.config
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    if batch < 1 or n_images < 0:
        raise ValueError("need batch >= 1 and n_images >= 0")
    if video and family not in ("llava_onevision",) + _QWEN:
        raise ValueError(f"{family} has no video input")
    if text_lens is None:
        text_lens = [(3 + 2 * i, 3 + i) for i in range(batch)]
    if len(text_lens) != batch:
        raise ValueError(f"text_lens has {len(text_lens)} entries, expected {batch}")
    sizes = _per_sample_sizes(family, image_sizes, batch, n_images)

    gen = torch.Generator().manual_seed(seed)
    pix_dtype = model.dtype

    def text(n: int) -> list[int]:
        return torch.randint(TEXT_ID_MIN, VOCAB_SIZE, (n,), generator=gen).tolist()

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(pix_dtype)

    seqs: list[list[int]] = []  # token ids per sample
    types: list[list[int]] = []  # Qwen mm_token_type_ids per sample: 0 text, 1 image, 2 video
    images: list[torch.Tensor] = []  # per-image pixel tensor, in prompt order over the batch
    image_hw: list[tuple[int, int]] = []  # NeXT/OneVision original sizes
    image_grids: list[tuple[int, int, int]] = []
    videos: list[torch.Tensor] = []
    video_grids: list[tuple[int, int, int]] = []
    multi_image = family == "llava_onevision" and n_images > 1

    for b in range(batch):
        prefix, suffix = text_lens[b]
        ids, tt = text(prefix), [0] * prefix

        def add(tokens: list[int], kind: int) -> None:
            ids.extend(tokens)
            tt.extend([kind] * len(tokens))

        for k, size in enumerate(sizes[b]):
            if k > 0:
                add(text(1), 0)  # a separator (think "\n") keeps consecutive images apart
            if family == "llava":
                side = cfg.vision_config.image_size
                if tuple(size) != (side, side):
                    raise ValueError(f"llava has a fixed {side}x{side} input; got image size {size}")
                images.append(pixels(3, side, side))
                n_tok = (side // cfg.vision_config.patch_size) ** 2
                add([IMAGE_ID] * n_tok, 1)
            elif family in _ANYRES:
                tiles, n_tok = _anyres_layout(cfg, size, multi_image)
                tile = cfg.vision_config.image_size
                images.append(pixels(tiles, 3, tile, tile))
                image_hw.append(tuple(size))
                add([IMAGE_ID] * n_tok, 1)
            else:
                t, h, w = _qwen_grid(size)
                images.append(pixels(t * h * w, 3 * _QWEN_TEMPORAL * _QWEN_PATCH**2))
                image_grids.append((t, h, w))
                add([VISION_START_ID], 0)
                add([IMAGE_ID] * (t * h * w // _QWEN_MERGE**2), 1)
                add([VISION_END_ID], 0)

        if video:
            if family == "llava_onevision":
                tile = cfg.vision_config.image_size
                side = tile // cfg.vision_config.patch_size
                frames = _ONEVISION_VIDEO_FRAMES
                videos.append(pixels(frames, 3, tile, tile))
                # Each frame is 2x2-pooled; one image_newline closes the video.
                add([VIDEO_ID] * (frames * math.ceil(side / 2) ** 2 + 1), 2)
            else:
                t, h, w = _qwen_grid(_QWEN_VIDEO_SIZE, _QWEN_VIDEO_FRAMES)
                videos.append(pixels(t * h * w, 3 * _QWEN_TEMPORAL * _QWEN_PATCH**2))
                video_grids.append((t, h, w))
                per_step = h * w // _QWEN_MERGE**2
                if family == "qwen3_vl":
                    # Qwen3-VL positions each temporal step as its own group, separated by a
                    # timestamp text, inside the outer start/end pair of the chat template.
                    add([VISION_START_ID], 0)
                    for _ in range(t):
                        add(text(1), 0)
                        add([VISION_START_ID], 0)
                        add([VIDEO_ID] * per_step, 2)
                        add([VISION_END_ID], 0)
                    add([VISION_END_ID], 0)
                else:
                    add([VISION_START_ID], 0)
                    add([VIDEO_ID] * (t * per_step), 2)
                    add([VISION_END_ID], 0)

        add(text(suffix), 0)
        seqs.append(ids)
        types.append(tt)

    length = max(len(s) for s in seqs)
    input_ids = torch.full((batch, length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    mm_types = torch.zeros((batch, length), dtype=torch.long)
    for b, (ids, tt) in enumerate(zip(seqs, types)):
        sl = slice(length - len(ids), length) if padding == "left" else slice(0, len(ids))
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
        mm_types[b, sl] = torch.tensor(tt)

    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family in _QWEN:
        # transformers 5.x needs this to build M-RoPE positions whenever a grid_thw is passed.
        out["mm_token_type_ids"] = mm_types
    if images:
        if family == "llava":
            out["pixel_values"] = torch.stack(images)
        elif family in _ANYRES:
            # Processor format: (num_images, max_tiles, 3, h, w), zero-padded to the batch maximum;
            # the model slices each image's real tiles using image_sizes.
            max_tiles = max(x.shape[0] for x in images)
            padded = images[0].new_zeros(len(images), max_tiles, *images[0].shape[1:])
            for i, x in enumerate(images):
                padded[i, : x.shape[0]] = x
            out["pixel_values"] = padded
            out["image_sizes"] = torch.tensor(image_hw, dtype=torch.long)
            if family == "llava_onevision":
                out["batch_num_images"] = torch.tensor([n_images] * batch, dtype=torch.long)
        else:
            out["pixel_values"] = torch.cat(images)
            out["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
    if videos:
        if family == "llava_onevision":
            out["pixel_values_videos"] = torch.stack(videos)  # (B, frames, 3, h, w)
        else:
            out["pixel_values_videos"] = torch.cat(videos)
            out["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
    return {k: v.to(model.device) for k, v in out.items()}


def take_sample(inputs: dict, index: int) -> dict:
    """Sample `index` of a batch built by :func:`make_inputs`, alone and without padding.

    Useful to check that a padded batch gives the same results as running each sample by itself.
    Relies on make_inputs' layout: the same number of images (and at most one video) per sample.
    """
    mask = inputs["attention_mask"][index].bool()
    batch = inputs["input_ids"].shape[0]
    out = {
        "input_ids": inputs["input_ids"][index][mask][None],
        "attention_mask": inputs["attention_mask"][index][mask][None],
    }
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][index][mask][None]

    def rows_of(pixel_key: str, grid_key: str) -> None:
        # Qwen: pixel rows are concatenated over all items; each item has prod(grid) rows.
        grids = inputs[grid_key]
        per = grids.shape[0] // batch
        counts = grids.prod(-1)
        start = int(counts[: index * per].sum())
        stop = start + int(counts[index * per : (index + 1) * per].sum())
        out[pixel_key] = inputs[pixel_key][start:stop]
        out[grid_key] = grids[index * per : (index + 1) * per]

    if "image_grid_thw" in inputs:
        rows_of("pixel_values", "image_grid_thw")
    elif "pixel_values" in inputs:
        per = inputs["pixel_values"].shape[0] // batch
        sl = slice(index * per, (index + 1) * per)
        out["pixel_values"] = inputs["pixel_values"][sl]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][sl]
        if "batch_num_images" in inputs:
            out["batch_num_images"] = inputs["batch_num_images"][index : index + 1]
    if "video_grid_thw" in inputs:
        rows_of("pixel_values_videos", "video_grid_thw")
    elif "pixel_values_videos" in inputs:
        out["pixel_values_videos"] = inputs["pixel_values_videos"][index : index + 1]
    return out


# ------------------------------------------------------------------------------------------------
# Synthetic models with the decoder shapes of real checkpoints (for benchmarks)
# ------------------------------------------------------------------------------------------------

SYNTHETIC = {
    # name: (family, hidden, heads, kv_heads, intermediate, layers, mrope_section)
    "llava-1.5-7b": ("llava", 4096, 32, 32, 11008, 32, None),
    "llava-1.5-13b": ("llava", 5120, 40, 40, 13824, 40, None),
    "llava-next-7b": ("llava_next", 4096, 32, 32, 11008, 32, None),
    "llava-onevision-7b": ("llava_onevision", 3584, 28, 4, 18944, 28, None),
    "qwen2-vl-7b": ("qwen2_vl", 3584, 28, 4, 18944, 28, [16, 24, 24]),
    "qwen2.5-vl-7b": ("qwen2_5_vl", 3584, 28, 4, 18944, 28, [16, 24, 24]),
}
"""Decoder shapes of real checkpoints, for random-weight benchmark models (``--synthetic``)."""


def parse_synthetic(spec: str) -> tuple[str, dict]:
    """Parse ``NAME[:key=value,...]`` (keys: layers, hidden, heads, kv_heads, intermediate)."""
    name, _, rest = spec.partition(":")
    if name not in SYNTHETIC:
        raise ValueError(f"unknown synthetic model {name!r}; known: {', '.join(SYNTHETIC)}")
    family, hidden, heads, kv, inter, layers, _ = SYNTHETIC[name]
    dims = dict(hidden=hidden, heads=heads, kv_heads=kv, intermediate=inter, layers=layers)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in dims or not value.isdigit():
            raise ValueError(f"bad synthetic option {item!r} in {spec!r}; use e.g. {name}:layers=8,hidden=1024")
        dims[key] = int(value)
    if dims["hidden"] % dims["heads"] or dims["heads"] % dims["kv_heads"]:
        raise ValueError(f"{spec}: hidden must divide by heads, and heads by kv_heads")
    return family, dims


BENCH_SYNTHETIC = "llava-1.5-7b:layers=8,hidden=1024,heads=16,kv_heads=16,intermediate=2816"
"""``tokencomp bench``'s default model: LLaVA-1.5-7B's decoder, narrowed and shortened to run in seconds."""


def build_synthetic(spec: str, *, attn: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A random-weight model of the family of ``spec`` whose text decoder has the real shape.

    The vision tower stays tiny: benchmarks feed ``inputs_embeds`` with an explicit vision mask, so
    only the language model (the part tokencomp compresses) is measured.
    """
    family, dims = parse_synthetic(spec)
    cfg = tiny_config(family, layers=dims["layers"], attn=attn)
    text = cfg.get_text_config()
    text.hidden_size = dims["hidden"]
    text.num_attention_heads = dims["heads"]
    text.num_key_value_heads = dims["kv_heads"]
    text.intermediate_size = dims["intermediate"]
    text.max_position_embeddings = 32768
    head_dim = dims["hidden"] // dims["heads"]
    if hasattr(text, "head_dim"):
        text.head_dim = head_dim
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and "mrope_section" in rope:
        half = head_dim // 2
        rope["mrope_section"] = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _CLASSES[family](cfg).to(dtype).eval()
    return model


def build_demo_model(layers: int, image_size: int):
    """``tokencomp demo --synthetic``'s model: a random-weight LLaVA-1.5 with ``layers`` decoder layers
    and ``(image_size / 14)^2`` vision tokens per image, but a narrow decoder (hidden 256) so it runs
    on a laptop CPU in well under a second."""
    cfg = tiny_config("llava", layers=layers)
    cfg.vision_config.image_size = image_size
    cfg.image_seq_length = (image_size // 14) ** 2
    text = cfg.get_text_config()
    text.hidden_size, text.intermediate_size = 256, 1024
    text.num_attention_heads, text.num_key_value_heads = 8, 8
    text.head_dim = 32
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _CLASSES["llava"](cfg).eval()


def demo_inputs(model, image: torch.Tensor, prompt_len: int = 24, seed: int = 0) -> dict:
    """Inputs of :func:`build_demo_model`: LLaVA-style prompt ids around the image placeholders, and
    CLIP-normalised pixels of ``image`` (a ``(3, H, W)`` tensor in [0, 1] of the model's input size)."""
    gen = torch.Generator().manual_seed(seed)
    n = model.config.image_seq_length
    pre = torch.randint(TEXT_ID_MIN, VOCAB_SIZE, (prompt_len,), generator=gen)
    post = torch.randint(TEXT_ID_MIN, VOCAB_SIZE, (prompt_len // 2,), generator=gen)
    ids = torch.cat([torch.tensor([BOS_ID]), pre, torch.full((n,), IMAGE_ID), post])[None]
    mean = torch.tensor([0.481, 0.458, 0.408])[:, None, None]
    std = torch.tensor([0.269, 0.261, 0.276])[:, None, None]
    pixels = ((image - mean) / std)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


from .checkpoints import save_tiny_checkpoint  # noqa: E402,F401
