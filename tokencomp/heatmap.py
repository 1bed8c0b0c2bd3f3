"""Pictures of which vision tokens survived each stage, drawn over the original image.

Written without image libraries: a PNG encoder of a few lines (zlib + CRC) keeps the demo free of
optional dependencies.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import UnsupportedModelError
from .interfaces import token_runs


def demo_picture(size: int) -> torch.Tensor:
    """A deterministic, real-looking ``(3, size, size)`` picture in [0, 1]: sky, sun, hills, a house."""
    y = torch.linspace(0, 1, size)[:, None].expand(size, size)
    x = torch.linspace(0, 1, size)[None, :].expand(size, size)
    img = torch.stack([0.35 + 0.3 * y, 0.55 + 0.25 * y, 0.95 - 0.2 * y])  # sky gradient
    sun = ((x - 0.78) ** 2 + (y - 0.2) ** 2) < 0.01
    img[:, sun] = torch.tensor([1.0, 0.85, 0.2])[:, None]
    hill = y > 0.62 + 0.08 * torch.sin(x * 7.0)
    img[:, hill] = torch.stack([0.2 + 0.1 * x[hill], 0.55 - 0.15 * y[hill], 0.2 + 0 * x[hill]])
    wall = (x > 0.2) & (x < 0.45) & (y > 0.5) & (y < 0.75)
    img[:, wall] = torch.tensor([0.85, 0.8, 0.7])[:, None]
    roof = (y > 0.35) & (y <= 0.5) & ((x - 0.325).abs() < (y - 0.35) * 1.0)
    img[:, roof] = torch.tensor([0.7, 0.2, 0.15])[:, None]
    door = (x > 0.3) & (x < 0.35) & (y > 0.63) & (y < 0.75)
    img[:, door] = torch.tensor([0.35, 0.2, 0.1])[:, None]
    return img.clamp(0, 1)


def overlay(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Dim the patches of ``image`` (3, H, W) whose cell in ``keep`` (rows, cols) is False."""
    H, W = image.shape[1:]
    cell = torch.nn.functional.interpolate(keep[None, None].float(), size=(H, W), mode="nearest")[0, 0].bool()
    out = image.clone()
    out[:, ~cell] = out[:, ~cell] * 0.2 + 0.05
    return out


def write_png(path, image: torch.Tensor) -> None:
    """Write a ``(3, H, W)`` float image in [0, 1] as an 8-bit RGB PNG."""
    data = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    H, W = data.shape[:2]
    raw = b"".join(b"\x00" + bytes(data[r].flatten().tolist()) for r in range(H))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


# ------------------------------------------------------------------------------------------------
# Where each vision token of a sample lies in its image
# ------------------------------------------------------------------------------------------------


@dataclass
class Region:
    """A grid of vision tokens that together cover one image (or one video frame).

    ``positions[r, c]`` is the original sequence position of the token covering cell (r, c).
    LLaVA-NeXT / OneVision images have two regions (the low-resolution base view and the
    high-resolution view); their ``image_newline`` tokens cover no cell.
    """

    image: int
    frame: int
    view: str
    positions: torch.Tensor


def _grid(start: int, rows: int, cols: int) -> torch.Tensor:
    return torch.arange(start, start + rows * cols).view(rows, cols)


def token_layout(model, inputs: dict, sample: int = 0) -> list[Region]:
    """Map every vision token of ``inputs[sample]`` to its cell in its image or video frame.

    Supports LLaVA-1.5 (square grid), LLaVA-NeXT / OneVision single images (base view + anyres
    view with row newlines), and Qwen2/2.5/3-VL images and videos (dynamic grids, per frame).
    """
    cfg = model.config
    ids = inputs["input_ids"][sample]
    name = type(model).__name__
    img_id = getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None))
    vid_id = getattr(cfg, "video_token_id", getattr(cfg, "video_token_index", None))
    if name.startswith("Qwen"):
        return _qwen_layout(cfg, inputs, sample, ids, img_id, vid_id)
    runs = [(a, b) for a, b, _ in token_runs(ids == img_id)]
    if name == "LlavaForConditionalGeneration":
        out = []
        for i, (a, b) in enumerate(runs):
            side = int(round((b - a) ** 0.5))
            if side * side != b - a:
                raise UnsupportedModelError(f"image {i} has {b - a} tokens, not a square grid")
            out.append(Region(i, 0, "image", _grid(a, side, side)))
        return out
    if name in ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"):
        return _anyres_layout(model, inputs, sample, runs)
    raise UnsupportedModelError(f"no token layout for {name}")


def _qwen_layout(cfg, inputs, sample, ids, img_id, vid_id) -> list[Region]:
    merge = cfg.vision_config.spatial_merge_size
    out = []
    for key, tok, grid_key in (("image", img_id, "image_grid_thw"), ("video", vid_id, "video_grid_thw")):
        grids = inputs.get(grid_key)
        if grids is None or tok is None:
            continue
        # Grids are listed sample after sample; count this sample's items from the tokens.
        tokens_per_item = [int(t * h * w) // merge**2 for t, h, w in grids.tolist()]
        all_ids = inputs["input_ids"]
        before = int((all_ids[:sample] == tok).sum())
        idx, seen = 0, 0
        while seen < before:
            seen += tokens_per_item[idx]
            idx += 1
        positions = (ids == tok).nonzero().flatten()
        p = 0
        item = 0
        while p < len(positions):
            t, h, w = grids[idx + item].tolist()
            rows, cols = h // merge, w // merge
            for frame in range(int(t)):
                cells = positions[p : p + rows * cols]
                out.append(Region(item, frame, key, cells.view(rows, cols)))
                p += rows * cols
            item += 1
    return out


def _anyres_layout(model, inputs, sample, runs) -> list[Region]:
    """Replay the model's own feature packing on placeholder features to find the row structure."""
    cfg = model.config
    inner = getattr(model, "model", model)
    sizes = inputs["image_sizes"]
    pixel = inputs["pixel_values"]
    per_sample = sizes.shape[0] // inputs["input_ids"].shape[0]
    if per_sample != 1 or len(runs) != 1:
        raise UnsupportedModelError("anyres layouts are drawn for one image per sample")
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = sizes[sample]
    tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    tiles = min(tiles, pixel.shape[1]) if pixel.ndim == 5 else tiles
    # Feature channel 0 holds a running index; the newline gets -1 so rows can be told apart.
    feats = torch.arange(tiles * side * side, dtype=torch.float32).view(tiles, side * side, 1)
    newline = torch.tensor([-1.0])
    kwargs = {"image_newline": newline}
    if "vision_feature_select_strategy" in inner.pack_image_features.__code__.co_varnames:
        kwargs["vision_feature_select_strategy"] = cfg.vision_feature_select_strategy
    packed, _ = inner.pack_image_features([feats], size[None], **kwargs)
    packed = packed[0][:, 0]
    a, b = runs[0]
    if packed.shape[0] != b - a:
        raise UnsupportedModelError(f"replayed packing gives {packed.shape[0]} tokens, the prompt has {b - a}")
    regions = [Region(0, 0, "base", _grid(a, side, side))] if tiles > 1 else []
    hires = torch.arange(a, b)[side * side :] if tiles > 1 else torch.arange(a, b)
    marks = packed[side * side :] if tiles > 1 else packed
    rows, row = [], []
    for pos, value in zip(hires.tolist(), marks.tolist()):
        if value < 0:
            rows.append(row)
            row = []
        else:
            row.append(pos)
    if row or not rows or len({len(r) for r in rows}) != 1:
        raise UnsupportedModelError("unexpected anyres packing (rows of different lengths)")
    regions.append(Region(0, 0, "anyres" if tiles > 1 else "image", torch.tensor(rows)))
    return regions


def render_regions(images, regions: list[Region], kept_positions: dict, sample: int = 0) -> torch.Tensor:
    """One row per region: its picture, then a dimmed copy per stage showing the kept tokens.

    ``images`` maps ``(region.view kind, region.image, region.frame)`` to a ``(3, H, W)`` picture,
    or is one picture used for every region; all pictures must share H and W.
    """
    rows = []
    for region in regions:
        if isinstance(images, torch.Tensor):
            image = images
        else:
            kind = "video" if region.view == "video" else "image"
            image = images[(kind, region.image, region.frame)]
        panels = [image]
        for layer in sorted(kept_positions):
            keep = torch.isin(region.positions, kept_positions[layer][sample].cpu())
            panels.append(overlay(image, keep))
        gap = torch.ones(3, image.shape[1], 4)
        row = []
        for p in panels:
            row += [p, gap]
        rows += [torch.cat(row[:-1], dim=2), torch.ones(3, 4, sum(p.shape[2] for p in row[:-1]))]
    return torch.cat(rows[:-1], dim=1)
