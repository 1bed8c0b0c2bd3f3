"""What every tiny family shares: special token ids, the text decoder shape, and the interface a
family module fills in (:class:`Family`, :class:`Layout`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# Special token ids, shared by all families. Small and distinct so they fit the 256-token vocab and
# a test can tell them apart; families without a video/vision-start token simply don't use them.
PAD_ID = 0  #: padding token (also the embedding padding_idx)
BOS_ID = 1  #: beginning-of-sequence token
EOS_ID = 2  #: end-of-sequence token
IMAGE_ID = 3  #: image placeholder token
VIDEO_ID = 4  #: video placeholder token (families that take video)
VISION_START_ID = 5  #: ``<|vision_start|>`` of the families that wrap vision tokens
VISION_END_ID = 6  #: ``<|vision_end|>``
TEXT_ID_MIN = 10  #: random prompt text is drawn from [TEXT_ID_MIN, VOCAB_SIZE)
VOCAB_SIZE = 256  #: text vocabulary size of every tiny model

# Text decoder shape shared by all families: GQA (4 query heads, 2 KV heads), head_dim 16.
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_POS = 1024

# Vision tower shape: as small as the modeling code allows.
VIS_HIDDEN = 32
VIS_HEADS = 2
VIS_INTERMEDIATE = 64

ATTN = ("eager", "sdpa", "flash_attention_2")


def text_kwargs(layers: int) -> dict:
    """Decoder fields common to every family's text config."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def attn_map(attn: str) -> dict:
    """Per-sub-config attention choice: `attn` for the text decoder, something CPU-safe for vision.

    The vision tower never needs flash attention for these tests, and keeping it on sdpa means a
    flash text decoder only needs flash kernels where they are being tested.
    """
    if attn not in ATTN:
        raise ValueError(f"attn must be one of {ATTN}, got {attn!r}")
    vision = "eager" if attn == "eager" else "sdpa"
    return {"": attn, "text_config": attn, "vision_config": vision}


class Draw:
    """The seeded random source of one ``make_inputs`` call: prompt text ids and pixels, drawn in
    the order the prompt is written (so the inputs depend only on the seed)."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def text(self, n: int) -> list[int]:
        """``n`` random text token ids."""
        return torch.randint(TEXT_ID_MIN, VOCAB_SIZE, (n,), generator=self.gen).tolist()

    def pixels(self, *shape: int) -> torch.Tensor:
        """A random pixel tensor of ``shape`` in the model's dtype."""
        return torch.randn(*shape, generator=self.gen).to(self.dtype)


@dataclass
class Item:
    """One image or video of a prompt: its run of token ids (with each token's ``mm_token_type_ids``
    value: 0 text, 1 image, 2 video), its pixels, and what else the family's processor reports
    about it (``meta``: an original size, a ``(t, h, w)`` grid)."""

    ids: list[int]
    types: list[int]
    pixels: torch.Tensor
    meta: Any = None

    @classmethod
    def run(cls, token: int, n: int, kind: int, pixels: torch.Tensor, meta: Any = None) -> "Item":
        """``n`` placeholder tokens ``token`` of type ``kind``."""
        return cls([token] * n, [kind] * n, pixels, meta)


class Layout:
    """How one family's processor lays images and videos out in a prompt and in the model inputs.
    A family module subclasses it; :func:`tokencomp.synthetic.make_inputs` writes the text around."""

    video: bool = False
    """Whether the family takes video."""
    token_types: bool = False
    """Whether the inputs carry ``mm_token_type_ids`` (needed where a grid decides positions)."""
    one_tile_when_several: bool = False
    """Whether several images per sample are each encoded as one tile (``image`` gets ``several``)."""

    def image(self, cfg, size: tuple[int, int], several: bool, draw: Draw) -> Item:  # pragma: no cover - interface
        """One image of ``size`` (H, W) pixels."""
        raise NotImplementedError

    def video_item(self, cfg, draw: Draw) -> Item:  # pragma: no cover - interface
        """One video of the family's default length (only called where :attr:`video` is True)."""
        raise NotImplementedError

    def pack(self, images: list[Item], videos: list[Item], batch: int, n_images: int) -> dict:  # pragma: no cover
        """The pixel inputs (and their metadata) of every image and video, in prompt order."""
        raise NotImplementedError


@dataclass(frozen=True)
class Family:
    """One family of tiny models: its model class, its config and its processor's input layout."""

    name: str
    """The family's ``config.model_type``."""
    model_class: type
    config: Callable[[dict], Any]
    """Builds the family's config from the shared text decoder fields (:func:`text_kwargs`)."""
    layout: Layout
    default_image: tuple[int, int]
    """Image (H, W) used when ``make_inputs`` gets no ``image_sizes``."""
    ragged_image_sizes: Optional[tuple[tuple[int, int], ...]] = None
    """Two image sizes whose samples differ in vision-token count (None: the family has one size)."""
