"""Helpers for tests on the tiny random-weight models of :mod:`tokencomp.synthetic` (which builds the
models and their inputs; everything it exports is importable from here too).

Typical use::

    model = build_tiny("qwen2_vl")
    inputs = make_inputs(model, batch=2, padding="left")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                         suppress_tokens=suppress_ids(model))
    alone = take_sample(inputs, 1)            # sample 1 by itself, unpadded
"""

from __future__ import annotations

from .synthetic import *  # noqa: F401,F403  (the model builders, importable from here as before)
from .synthetic import __all__ as _synthetic_all

__all__ = [*_synthetic_all, "take_sample", "vision_token_ids", "suppress_ids"]


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
