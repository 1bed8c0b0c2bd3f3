"""Tiny random-weight models of every family and random inputs of exactly the shape their
processors produce. Family-specific parts (config, placeholder layout, pixel packing) come from the
family modules' :class:`~tokencomp.synthetic.common.Family` entries; this module writes the text
around them, pads the batch and builds the model."""

from __future__ import annotations

import torch

from . import llava, qwen_vl
from .common import BOS_ID, EOS_ID, PAD_ID, Draw, Family, attn_map, text_kwargs

FAMILY_SPECS: dict[str, Family] = {f.name: f for f in (*llava.FAMILIES, *qwen_vl.FAMILIES)}
"""Every tiny family by its ``config.model_type``."""

FAMILIES = tuple(FAMILY_SPECS)
"""Supported model families, by their ``config.model_type``."""

RAGGED_IMAGE_SIZES = {f.name: list(f.ragged_image_sizes) for f in FAMILY_SPECS.values() if f.ragged_image_sizes}
"""Two image sizes per family whose samples then differ in vision-token count (ragged batches)."""


def family_spec(family: str) -> Family:
    """The :class:`Family` entry of ``family``; ``ValueError`` naming the known ones otherwise."""
    if family not in FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return FAMILY_SPECS[family]


def tiny_config(family: str, *, layers: int = 6, attn: str = "sdpa"):
    """Return the tiny config of `family` with `layers` text decoder layers.

    The text decoder gets attention implementation `attn` ("eager", "sdpa" or
    "flash_attention_2"); the vision tower uses eager when `attn` is eager and sdpa otherwise.
    Special token ids are the ``*_ID`` constants of :mod:`tokencomp.synthetic`.
    """
    spec = family_spec(family)
    if layers < 1:
        raise ValueError("layers must be >= 1")
    cfg = spec.config(text_kwargs(layers))
    cfg._attn_implementation = attn_map(attn)
    return cfg


def build_tiny(family: str, *, layers: int = 6, attn: str = "sdpa", seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build the tiny ``*ForConditionalGeneration`` of `family` with random weights, in eval mode.

    Weights depend only on `seed` (the global torch RNG state is saved and restored around the
    build, so callers' randomness is unaffected). The model is on CPU in `dtype`; its
    ``generation_config`` carries the pad/bos/eos ids so padded ``generate`` works.
    """
    cfg = tiny_config(family, layers=layers, attn=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FAMILY_SPECS[family].model_class._from_config(cfg, attn_implementation=attn_map(attn), dtype=dtype)
    model.eval()
    gen = model.generation_config
    gen.pad_token_id = PAD_ID
    gen.bos_token_id = BOS_ID
    gen.eos_token_id = EOS_ID
    return model


def _per_sample_sizes(spec: Family, image_sizes, batch: int, n_images: int) -> list[list[tuple[int, int]]]:
    """Normalise `image_sizes` to one (H, W) per image per sample."""
    if image_sizes is None:
        return [[spec.default_image] * n_images for _ in range(batch)]
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
    placeholders come in exactly the number and layout the family's processor produces (see the
    family modules). Text ids are drawn from ``[TEXT_ID_MIN, VOCAB_SIZE)``.

    Args:
        batch: number of samples. By default sample ``i`` has ``3 + 2*i`` prefix and ``3 + i``
            suffix tokens, so a batch is always padded.
        image_sizes: optional list with one entry per sample: an ``(H, W)`` pixel size for all of
            its images, or a list of ``n_images`` sizes. Fixed-resolution families accept only
            their size; anyres families' sizes select the tiling (ragged token counts); grid
            families round sizes to their patch unit and give ragged ``image_grid_thw``.
        n_images: images per sample (0 for none); separated by one text token.
        video: add one video per sample (families that take video only).
        padding: ``"left"`` or ``"right"``: where pad tokens (attention_mask 0) go.
        text_lens: optional list of ``(prefix_len, suffix_len)`` per sample.
        seed: all random content (text ids, pixels) depends only on this seed.

    Tensors are put on ``model.device``; pixel tensors use ``model.dtype``.
    """
    spec = family_spec(model.config.model_type)
    layout, cfg = spec.layout, model.config
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    if batch < 1 or n_images < 0:
        raise ValueError("need batch >= 1 and n_images >= 0")
    if video and not layout.video:
        raise ValueError(f"{spec.name} has no video input")
    if text_lens is None:
        text_lens = [(3 + 2 * i, 3 + i) for i in range(batch)]
    if len(text_lens) != batch:
        raise ValueError(f"text_lens has {len(text_lens)} entries, expected {batch}")
    sizes = _per_sample_sizes(spec, image_sizes, batch, n_images)
    draw = Draw(seed, model.dtype)
    several = layout.one_tile_when_several and n_images > 1

    seqs, types, images, videos = [], [], [], []  # token ids and mm_token_type_ids per sample; items in prompt order
    for b in range(batch):
        prefix, suffix = text_lens[b]
        ids, tt = draw.text(prefix), [0] * prefix
        for k, size in enumerate(sizes[b]):
            if k > 0:
                ids += draw.text(1)  # a separator (think "\n") keeps consecutive images apart
                tt += [0]
            images.append(layout.image(cfg, size, several, draw))
            ids, tt = ids + images[-1].ids, tt + images[-1].types
        if video:
            videos.append(layout.video_item(cfg, draw))
            ids, tt = ids + videos[-1].ids, tt + videos[-1].types
        seqs.append(ids + draw.text(suffix))
        types.append(tt + [0] * suffix)

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
    if layout.token_types:
        out["mm_token_type_ids"] = mm_types
    out.update(layout.pack(images, videos, batch, n_images))
    return {k: v.to(model.device) for k, v in out.items()}
