"""Random-weight models with the decoder shapes of real checkpoints: ``tokencomp bench --synthetic``
and ``tokencomp demo --synthetic``. Only the text decoder is real-sized (it is what tokencomp
compresses); the vision tower stays tiny."""

from __future__ import annotations

import torch

from .common import BOS_ID, IMAGE_ID, Draw
from .tiny import FAMILY_SPECS, tiny_config

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
        model = FAMILY_SPECS[family].model_class(cfg).to(dtype).eval()
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
        return FAMILY_SPECS["llava"].model_class(cfg).eval()


def demo_inputs(model, image: torch.Tensor, prompt_len: int = 24, seed: int = 0) -> dict:
    """Inputs of :func:`build_demo_model`: LLaVA-style prompt ids around the image placeholders, and
    CLIP-normalised pixels of ``image`` (a ``(3, H, W)`` tensor in [0, 1] of the model's input size)."""
    draw = Draw(seed, model.dtype)
    n = model.config.image_seq_length
    pre, post = draw.text(prompt_len), draw.text(prompt_len // 2)
    ids = torch.tensor([BOS_ID, *pre, *[IMAGE_ID] * n, *post])[None]
    mean = torch.tensor([0.481, 0.458, 0.408])[:, None, None]
    std = torch.tensor([0.269, 0.261, 0.276])[:, None, None]
    pixels = ((image - mean) / std)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
