"""Pictures of which vision tokens survived each stage, drawn over the region of the image the model saw.

:func:`token_layout` maps every vision token to its cell in a grid (one :class:`Region` per image,
anyres view or video frame) and, given the processor, to the rectangle of the original picture that
grid covers: the processor's own geometry is replayed. Both are family knowledge and come from the
model's adapter (:meth:`tokencomp.ModelAdapter.token_layout`). :func:`render_regions` draws, with Pillow, one row per region: the picture, then one
panel per stage with the dropped cells dimmed, each panel labelled with its stage and counts.

Pillow is imported when a picture is drawn, matplotlib (``pip install 'tokencomp[viz]'``) only by
:func:`require_matplotlib`: ``import tokencomp`` loads neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import UsageError

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
    """A grid of vision tokens that together cover one image (or one video frame); the model's adapter
    makes them (:meth:`tokencomp.ModelAdapter.token_layout`).

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
    frame_stride: int = 1
    """Video regions: input frames per temporal step (frame ``f`` shows input frame ``f * frame_stride``)."""


def token_layout(model, inputs: dict, sample: int = 0, *, processor=None, image_sizes=None) -> list[Region]:
    """Map every vision token of ``inputs[sample]`` to its cell in its image or video frame.

    The model's adapter knows its family's layout (:meth:`tokencomp.ModelAdapter.token_layout`):
    LLaVA-1.5 square grids, LLaVA-NeXT / OneVision single images (base view + anyres view with row
    newlines), Qwen2/2.5/3-VL images and videos (dynamic grids, per frame).

    With ``processor`` (the one that made ``inputs``), every region also gets its ``box`` in the
    original picture, replayed from the processor's geometry; ``image_sizes`` lists the original
    ``(height, width)`` of this sample's images (needed where the inputs do not carry them).
    """
    from .plugins import registry

    adapter = registry().adapter_for(model)
    return adapter.token_layout(model, inputs, sample, processor=processor, image_sizes=image_sizes)


def video_frame_indices(n_frames: int, grid_frames: int, frame_stride: int) -> list[int]:
    """The input frame shown for each temporal step of a video: a step covers ``frame_stride``
    consecutive frames (the processor repeats the last frame to fill the last step); show the first
    of them."""
    return [min(t * frame_stride, n_frames - 1) for t in range(grid_frames)]


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
    its original picture (PIL ``images``, ``video`` frames) that the model saw; a video step that
    covers several input frames shows the first of them (:func:`video_frame_indices`)."""
    inputs = {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}
    sizes = [(im.height, im.width) for im in images]
    regions = token_layout(model, inputs, sample, processor=processor, image_sizes=sizes)
    pictures = {("image", i, 0): im for i, im in enumerate(images)}
    names = []
    frames = list(video or [])
    videos = [r for r in regions if r.view == "video"]
    n_steps = 1 + max((r.frame for r in videos), default=-1)
    stride = videos[0].frame_stride if videos else 1
    shown = video_frame_indices(len(frames), n_steps, stride) if frames else []
    for r in regions:
        if r.view == "video":
            pictures[("video", r.image, r.frame)] = frames[shown[r.frame]]
            names.append(region_name(r, shown[r.frame]))
        else:
            names.append(region_name(r))
    return render_regions(pictures, regions, kept_positions, sample, names=names, **kwargs)
