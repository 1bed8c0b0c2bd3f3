"""Pictures of which vision tokens survived each stage, drawn over the region of the image the model saw.

:func:`token_layout` maps every vision token to its cell in a grid (one :class:`Region` per image,
anyres view or video frame) and, given the processor, to the rectangle of the original picture that
grid covers: the processor's own geometry is replayed (LLaVA-1.5: optional pad to square, resize of
the shortest edge, center crop; LLaVA-NeXT / OneVision: the squashed base view, and the anyres view
resized into the best grid resolution, padded, tiled and unpadded by the model; Qwen: the whole
image or frame). :func:`render_regions` draws, with Pillow, one row per region: the picture, then one
panel per stage with the dropped cells dimmed, each panel labelled with its stage and counts.

Pillow is imported when a picture is drawn, matplotlib (``pip install 'tokencomp[viz]'``) only by
:func:`require_matplotlib`: ``import tokencomp`` loads neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import UnsupportedModelError, UsageError
from .interfaces import token_runs

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in the original picture's pixels


def require_matplotlib():
    """``matplotlib.pyplot``, or a one-line :class:`UsageError` saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("matplotlib is not installed: pip install 'tokencomp[viz]'") from None
    return plt


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


def to_pil(image):
    """A ``(3, H, W)`` float tensor in [0, 1] (or a PIL image) as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    data = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(data.numpy(), "RGB")


def save_png(path, picture) -> None:
    """Write a picture (PIL image, a :class:`Rendering`, or a ``(3, H, W)`` tensor in [0, 1]) as a PNG."""
    if isinstance(picture, Rendering):
        picture = picture.image
    to_pil(picture).save(path, format="PNG")


# ------------------------------------------------------------------------------------------------
# Where each vision token of a sample lies in its image
# ------------------------------------------------------------------------------------------------


@dataclass
class Region:
    """A grid of vision tokens that together cover one image (or one video frame).

    ``positions[r, c]`` is the original sequence position of the token covering cell (r, c).
    LLaVA-NeXT / OneVision images have two regions (the low-resolution base view and the
    high-resolution view); their ``image_newline`` tokens cover no cell. ``box`` is the rectangle
    ``(left, top, right, bottom)`` of the original picture, in its pixels, that the grid covers
    uniformly (it may reach outside the picture where the processor padded); None: the whole picture.
    """

    image: int
    frame: int
    view: str
    positions: torch.Tensor
    box: Optional[Box] = None
    # anyres views: the grid's extent (top, left, bottom, right) in features of the padded tile canvas
    _extent: Optional[tuple[float, float, float, float]] = field(default=None, repr=False)


def _grid(start: int, rows: int, cols: int) -> torch.Tensor:
    return torch.arange(start, start + rows * cols).view(rows, cols)


def token_layout(model, inputs: dict, sample: int = 0, *, processor=None, image_sizes=None) -> list[Region]:
    """Map every vision token of ``inputs[sample]`` to its cell in its image or video frame.

    Supports LLaVA-1.5 (square grid), LLaVA-NeXT / OneVision single images (base view + anyres
    view with row newlines), and Qwen2/2.5/3-VL images and videos (dynamic grids, per frame).

    With ``processor`` (the one that made ``inputs``), every region also gets its ``box`` in the
    original picture, replayed from the processor's geometry; ``image_sizes`` lists the original
    ``(height, width)`` of this sample's images (needed for LLaVA-1.5, whose inputs do not carry it).
    """
    cfg = model.config
    ids = inputs["input_ids"][sample]
    name = type(model).__name__
    img_id = getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None))
    vid_id = getattr(cfg, "video_token_id", getattr(cfg, "video_token_index", None))
    if name.startswith("Qwen"):
        return _qwen_layout(cfg, inputs, sample, ids, img_id, vid_id)  # whole images / frames: box None
    runs = [(a, b) for a, b, _ in token_runs(ids == img_id)]
    if name == "LlavaForConditionalGeneration":
        out = []
        for i, (a, b) in enumerate(runs):
            side = int(round((b - a) ** 0.5))
            if side * side != b - a:
                raise UnsupportedModelError(f"image {i} has {b - a} tokens, not a square grid")
            region = Region(i, 0, "image", _grid(a, side, side))
            if processor is not None:
                if image_sizes is None or len(image_sizes) <= i:
                    raise UsageError("token_layout: LLaVA boxes need the original image_sizes")
                region.box = clip_view_box(_image_processor(processor), *image_sizes[i])
            out.append(region)
        return out
    if name in ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"):
        regions = _anyres_layout(model, inputs, sample, runs)
        if processor is not None:
            size = [int(v) for v in inputs["image_sizes"][sample].tolist()]
            for r in regions:
                if r.view == "anyres":
                    r.box = anyres_view_box(_image_processor(processor), cfg, size, r._extent)
        return regions
    raise UnsupportedModelError(f"no token layout for {name}")


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


def _size_hw(size) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """(height, width, shortest_edge) of a processor size (a dict or a SizeDict)."""
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    return get("height"), get("width"), get("shortest_edge")


def clip_view_box(ip, height: int, width: int) -> Box:
    """The rectangle of a ``height`` x ``width`` picture that a LLaVA-1.5 image processor (CLIP or
    LLaVA) hands to the vision tower: optional pad to a square, resize, center crop."""
    from transformers.image_transforms import get_resize_output_image_size

    # The current image is the original's rectangle `box`, stretched to cur_h x cur_w pixels.
    left, top, right, bottom = 0.0, 0.0, float(width), float(height)
    cur_h, cur_w = height, width
    if getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square"):  # LlavaImageProcessor
        side = max(height, width)
        if width > height:
            top -= (side - height) // 2
        else:
            left -= (side - width) // 2
        right, bottom = left + side, top + side
        cur_h = cur_w = side
    if getattr(ip, "do_resize", True) and ip.size is not None:
        h, w, short = _size_hw(ip.size)
        if short:
            import numpy as np

            new_h, new_w = get_resize_output_image_size(
                np.zeros((cur_h, cur_w, 1), dtype=np.uint8), size=short, default_to_square=False
            )
        else:
            new_h, new_w = h, w
    else:
        new_h, new_w = cur_h, cur_w
    sy, sx = (bottom - top) / new_h, (right - left) / new_w  # original pixels per resized pixel
    if getattr(ip, "do_center_crop", False) and getattr(ip, "crop_size", None) is not None:
        ch, cw, _ = _size_hw(ip.crop_size)
        ct, cl = (new_h - ch) // 2, (new_w - cw) // 2  # numpy center_crop (negative: padded)
        top, left = top + ct * sy, left + cl * sx
        bottom, right = top + ch * sy, left + cw * sx
    return (left, top, right, bottom)


def anyres_view_box(ip, cfg, size, extent) -> Box:
    """The rectangle of the original picture that a LLaVA-NeXT / OneVision anyres grid covers.

    The processor resizes the picture into the best grid resolution (aspect kept), pads it centered
    with zeros and cuts it into tiles; the model unpads the tile features (``extent``: the grid's
    feature rows/columns in the padded canvas, replayed through the model's own packing)."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    H, W = size
    pinpoints = getattr(ip, "image_grid_pinpoints", None) or cfg.image_grid_pinpoints
    best_h, best_w = select_best_resolution((H, W), [list(p) for p in pinpoints])
    new_h, new_w = get_patch_output_size(torch.zeros(1, H, W), (best_h, best_w), input_data_format="channels_first")
    pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    tile = cfg.vision_config.image_size
    px = tile / (tile // cfg.vision_config.patch_size)  # canvas pixels per feature
    top, left, bottom, right = extent
    sy, sx = H / new_h, W / new_w
    return ((left * px - pad_x) * sx, (top * px - pad_y) * sy, (right * px - pad_x) * sx, (bottom * px - pad_y) * sy)


def video_frame_indices(n_frames: int, grid_frames: int, temporal_patch_size: int) -> list[int]:
    """The input frame shown for each temporal grid step of a Qwen video: a step covers
    ``temporal_patch_size`` consecutive frames (the processor repeats the last frame to fill the
    last step); show the first of them."""
    return [min(t * temporal_patch_size, n_frames - 1) for t in range(grid_frames)]


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
    """Replay the model's own feature packing on placeholder features to find the row structure
    and, for the high-resolution view, where its unpadded grid lies in the padded tile canvas."""
    cfg = model.config
    inner = getattr(model, "model", model)
    sizes = inputs["image_sizes"]
    pixel = inputs["pixel_values"]
    per_sample = sizes.shape[0] // inputs["input_ids"].shape[0]
    if per_sample != 1 or len(runs) != 1:
        raise UnsupportedModelError("anyres layouts are drawn for one image per sample")
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

    size = sizes[sample]
    tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    tiles = min(tiles, pixel.shape[1]) if pixel.ndim == 5 else tiles
    # Channels: 0 a running index (the newline gets -1 so rows can be told apart); 1 and 2 the
    # feature's row and column in the padded canvas of tiles (interpolated if the model downsamples).
    feats = torch.zeros(tiles, side * side, 3)
    feats[..., 0] = torch.arange(tiles * side * side, dtype=torch.float32).view(tiles, side * side)
    if tiles > 1:
        nph, npw = get_anyres_image_grid_shape(size.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        rr = torch.arange(nph * side, dtype=torch.float32)[:, None].expand(nph * side, npw * side)
        cc = torch.arange(npw * side, dtype=torch.float32)[None, :].expand(nph * side, npw * side)
        canvas = torch.stack([rr, cc], -1)  # (rows, cols, 2) -> per tile, row-major within the tile
        per_tile = canvas.view(nph, side, npw, side, 2).permute(0, 2, 1, 3, 4).reshape(nph * npw, side * side, 2)
        feats[1 : 1 + nph * npw, :, 1:] = per_tile[: tiles - 1]
    newline = torch.tensor([-1.0, -1.0, -1.0])
    kwargs = {"image_newline": newline}
    names = inner.pack_image_features.__code__.co_varnames
    if "vision_feature_select_strategy" in names:
        kwargs["vision_feature_select_strategy"] = cfg.vision_feature_select_strategy
    if "vision_aspect_ratio" in names and getattr(cfg, "vision_aspect_ratio", None):
        kwargs["vision_aspect_ratio"] = cfg.vision_aspect_ratio
    packed, _ = inner.pack_image_features([feats], size[None], **kwargs)
    packed = packed[0]
    a, b = runs[0]
    if packed.shape[0] != b - a:
        raise UnsupportedModelError(f"replayed packing gives {packed.shape[0]} tokens, the prompt has {b - a}")
    regions = [Region(0, 0, "base", _grid(a, side, side))] if tiles > 1 else []
    hires = torch.arange(a, b)[side * side :] if tiles > 1 else torch.arange(a, b)
    marks = packed[side * side :] if tiles > 1 else packed
    rows, row, coords = [], [], []
    for pos, value in zip(hires.tolist(), marks.tolist()):
        if value[0] < 0:
            rows.append(row)
            row = []
        else:
            row.append(pos)
            coords.append(value[1:])
    if row or not rows or len({len(r) for r in rows}) != 1:
        raise UnsupportedModelError("unexpected anyres packing (rows of different lengths)")
    region = Region(0, 0, "anyres" if tiles > 1 else "image", torch.tensor(rows))
    if tiles > 1:
        grid = torch.tensor(coords).view(len(rows), len(rows[0]), 2)
        r0, r1 = _extent(grid[..., 0].amin(), grid[..., 0].amax(), len(rows))
        c0, c1 = _extent(grid[..., 1].amin(), grid[..., 1].amax(), len(rows[0]))
        region._extent = (r0, c0, r1, c1)
    regions.append(region)
    return regions


def _extent(lo, hi, n: int) -> tuple[float, float]:
    """The span [start, end) in feature units covered by ``n`` evenly spaced cells whose centers run
    from feature ``lo`` to ``hi`` (integers when unpadded only, fractional after downsampling)."""
    lo, hi = float(lo), float(hi)
    step = (hi - lo) / (n - 1) if n > 1 else 1.0
    return lo + 0.5 - step / 2, hi + 0.5 + step / 2


# ------------------------------------------------------------------------------------------------
# Drawing (Pillow)
# ------------------------------------------------------------------------------------------------


@dataclass
class Panel:
    """One picture of a :class:`Rendering`: region ``region`` (index into the regions drawn) at stage
    ``stage`` (None: the picture itself; 0: the input phase; else the decoder layer). ``box`` is where
    its picture lies in the rendering ``(left, top, right, bottom)``, ``label_box`` its label strip."""

    region: int
    stage: Optional[int]
    label: str
    box: tuple[int, int, int, int]
    label_box: tuple[int, int, int, int]
    kept: Optional[int] = None
    cells: int = 0


@dataclass
class Rendering:
    image: object  # PIL.Image.Image
    panels: list[Panel]

    def legend(self) -> list[str]:
        """One line per row of panels: what each panel, left to right, shows."""
        lines: dict[int, list[str]] = {}
        for p in self.panels:
            lines.setdefault(p.region, []).append(p.label)
        return [f"row {i + 1}: " + " | ".join(labels) for i, labels in enumerate(lines.values())]


def region_name(region: Region, frame_index: Optional[int] = None) -> str:
    if region.view == "video":
        extra = f" (input frame {frame_index})" if frame_index is not None else ""
        return f"video {region.image} frame {region.frame}{extra}"
    view = "" if region.view == "image" else f" {region.view} view"
    return f"image {region.image}{view}"


def stage_label(stage: int, kept: int, total: int) -> str:
    return f"{'input' if stage == 0 else f'layer {stage}'}: {kept} / {total} kept"


LABEL_HEIGHT = 14
GAP = 4


def render_regions(images, regions: list[Region], kept_positions: dict, sample: int = 0, *,
                   height: int = 224, names: Optional[list[str]] = None) -> Rendering:
    """One row per region: the region of its picture the model saw, then a copy per stage with the
    dropped tokens' cells dimmed; a label strip above every panel names the stage and its counts.

    ``images`` maps ``(kind, region.image, region.frame)`` (kind "image" or "video") to a picture (PIL
    image or ``(3, H, W)`` tensor in [0, 1]), or is one picture used for every region. Each region's
    ``box`` (None: the whole picture) is drawn ``height`` pixels high, aspect kept; its grid covers it
    uniformly. ``names`` overrides the label of each row's first panel.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    if not regions:
        raise UsageError("no vision tokens in the prompt: nothing to draw (give an image or a video)")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    stages = sorted(kept_positions)
    rows = []  # (list of (label, PIL picture, kept, cells, stage))
    for k, region in enumerate(regions):
        if isinstance(images, dict):
            kind = "video" if region.view == "video" else "image"
            picture = to_pil(images[(kind, region.image, region.frame)])
        else:
            picture = to_pil(images)
        box = region.box or (0.0, 0.0, float(picture.width), float(picture.height))
        bw, bh = box[2] - box[0], box[3] - box[1]
        grid_rows, grid_cols = region.positions.shape
        ph = max(height, grid_rows)
        pw = max(grid_cols, int(round(ph * bw / bh)))
        view = picture.transform((pw, ph), Image.Transform.EXTENT, data=box, resample=Image.Resampling.BICUBIC)
        base = np.asarray(view, dtype=np.float32)
        ri = (np.arange(ph) * grid_rows) // ph
        ci = (np.arange(pw) * grid_cols) // pw
        cells = region.positions.numel()
        row = [(names[k] if names else region_name(region), view, None, cells, None)]
        for stage in stages:
            keep = torch.isin(region.positions, kept_positions[stage][sample].cpu()).numpy()
            mask = keep[ri][:, ci]
            dim = base.copy()
            dim[~mask] = dim[~mask] * 0.2 + 12.75
            pic = Image.fromarray(dim.round().clip(0, 255).astype(np.uint8), "RGB")
            n_kept = int(keep.sum())
            row.append((stage_label(stage, n_kept, cells), pic, n_kept, cells, stage))
        rows.append(row)
    # Layout: every panel gets a slot as wide as its picture or its label, whichever is wider.
    placed, width, y = [], 0, 0
    for k, row in enumerate(rows):
        x = 0
        ph = row[0][1].height
        for label, pic, n_kept, cells, stage in row:
            l, t, r, b = measure.textbbox((0, 0), label, font=font)
            slot = max(pic.width, r - l + 4)
            placed.append((k, stage, label, pic, (x, y), n_kept, cells, slot))
            x += slot + GAP
        width = max(width, x - GAP)
        y += LABEL_HEIGHT + ph + GAP
    canvas = Image.new("RGB", (width, y - GAP), "white")
    draw = ImageDraw.Draw(canvas)
    panels = []
    for k, stage, label, pic, (x, y0), n_kept, cells, slot in placed:
        draw.text((x + 2, y0 + 1), label, fill="black", font=font)
        canvas.paste(pic, (x, y0 + LABEL_HEIGHT))
        panels.append(Panel(k, stage, label, (x, y0 + LABEL_HEIGHT, x + pic.width, y0 + LABEL_HEIGHT + pic.height),
                            (x, y0, x + slot, y0 + LABEL_HEIGHT), n_kept, cells))
    return Rendering(canvas, panels)


def render_inputs(model, processor, inputs: dict, images, video, kept_positions: dict, sample: int = 0,
                  **kwargs) -> Rendering:
    """:func:`render_regions` for a prompt made by ``processor``: each region drawn over the part of
    its original picture (PIL ``images``, ``video`` frames) that the model saw; a Qwen video step
    shows the first input frame it covers (:func:`video_frame_indices`)."""
    inputs = {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}
    sizes = [(im.height, im.width) for im in images]
    regions = token_layout(model, inputs, sample, processor=processor, image_sizes=sizes)
    pictures = {("image", i, 0): im for i, im in enumerate(images)}
    names = []
    frames = list(video or [])
    n_steps = 1 + max((r.frame for r in regions if r.view == "video"), default=-1)
    vision = getattr(model.config, "vision_config", None)
    tps = getattr(vision, "temporal_patch_size", None) or 1
    shown = video_frame_indices(len(frames), n_steps, tps) if frames else []
    for r in regions:
        if r.view == "video":
            pictures[("video", r.image, r.frame)] = frames[shown[r.frame]]
            names.append(region_name(r, shown[r.frame]))
        else:
            names.append(region_name(r))
    return render_regions(pictures, regions, kept_positions, sample, names=names, **kwargs)
