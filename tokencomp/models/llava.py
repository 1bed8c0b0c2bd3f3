"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: plain causal Llama / Qwen2 decoders, nothing to adapt
beyond finding the image / video placeholder ids (NeXT's ``image_newline`` rows sit on placeholder
slots too, so they count as vision tokens). OneVision videos are split into frames for quotas.

Vision-tower signals: ``cls_attention`` from the CLIP / SigLIP layer whose output the projector reads
(``vision_feature_layer``, −2: the layer VisionZip and FasterVLM read ``attentions[-2]`` of; for a
tower without [CLS] the first token's row). LLaVA-1.5: each image's patches map 1:1, in order, to its
placeholder tokens; NeXT / OneVision: the per-tile rows go through the model's own
``pack_image_features`` (anyres tiles, unpadding, newline rows = 0).

Token layout (heatmaps): LLaVA-1.5 images are square grids over the CLIP processor's pad / resize /
center crop; NeXT / OneVision images are a base view plus an anyres view whose rows end in
``image_newline`` tokens, found by replaying the model's own packing."""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Optional

import torch

import tokencomp
from tokencomp.errors import UnsupportedModelError, UsageError, copy_refused
from tokencomp.heatmap import Box, Region
from tokencomp.interfaces import ModelAdapter
from tokencomp.masks import token_runs


@dataclasses.dataclass(frozen=True)
class LlavaAdapter(ModelAdapter):
    """LLaVA family (``Llava``, ``LlavaNext``, ``LlavaOnevision`` ``ForConditionalGeneration``)."""

    name = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

    def row_markers(self, model, embeds, vision_mask):
        newline = getattr(getattr(model, "model", model), "image_newline", None)
        if newline is None:
            return None
        # The model writes its image_newline vector itself into these slots; no patch feature equals
        # it exactly.
        return (embeds == newline.to(embeds.dtype)).all(-1) & vision_mask

    def token_layout(self, model, inputs, sample=0, *, processor=None, image_sizes=None):
        ids = inputs["input_ids"][sample]
        runs = [(a, b) for a, b, _ in token_runs(ids == self.image_token_id)]
        if _packs(model) is None:  # LLaVA-1.5: one square grid per image
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
        regions, extent = _anyres_layout(model, inputs, sample, runs)
        if processor is not None and extent is not None:
            size = [int(v) for v in inputs["image_sizes"][sample].tolist()]
            for r in regions:
                if r.view == "anyres":
                    r.box = anyres_view_box(_image_processor(processor), model.config, size, extent)
        return regions

    def signal_names(self, model):
        return ("cls_attention",) if isinstance(model.config.vision_feature_layer, int) else ()

    def install_signals(self, model, names, emit):
        cfg = model.config
        tower = model.model.vision_tower
        layers = next(m for n, m in tower.named_modules() if n.endswith("encoder")).layers
        vfl = cfg.vision_feature_layer  # hidden_states[vfl] is the output of layer vfl - 1
        attn = layers[max(0, len(layers) + vfl if vfl < 0 else vfl - 1)].self_attn
        strip_cls = cfg.vision_feature_select_strategy == "default"
        local = threading.local()

        def keep_query(module, args, out):
            local.q = out[:, :1]  # the [CLS] row only

        def attention_row(module, args, out):
            q = getattr(local, "q", None)
            local.q = None
            if q is None:
                return
            N, T, _ = out.shape
            H, d = attn.num_heads, attn.head_dim
            qh = q.reshape(N, 1, H, d).transpose(1, 2).float()
            kh = out.reshape(N, T, H, d).transpose(1, 2).float()
            row = torch.softmax((qh @ kh.transpose(-1, -2)) * attn.scale, dim=-1).mean(1)[:, 0]  # (N, T)
            local.row = (row[:, 1:] if strip_cls else row).reshape(-1)

        base = model.model
        packs = _packs(model)

        def tower_done(module, args, out):
            row = getattr(local, "row", None)
            local.row = None
            if row is None:
                return
            if packs is None:
                emit("cls_attention", row, out)  # LLaVA-1.5: patches map 1:1, in order
            else:
                local.pending = (row.view(out.last_hidden_state.shape[0], -1), out)

        handles = [
            attn.q_proj.register_forward_hook(keep_query),
            attn.k_proj.register_forward_hook(attention_row),
            tower.register_forward_hook(tower_done),
        ]
        if packs is not None:
            handles.append(_PackSignals(base, packs, local, emit))
        return handles


class _PackSignals:
    """Runs the model's own ``pack_image_features`` (tiles, unpadding, newline rows, OneVision's
    downsampling) on the per-patch signal as well, so it lands on the LLM's vision tokens in the
    model's order (newline rows get 0). Installed as an instance attribute; ``remove()`` deletes it."""

    def __init__(self, base, original, local, emit):
        self.base, self.original, self.local, self.emit = base, original, local, emit
        base.pack_image_features = self

    def __call__(self, image_features, *args, **kwargs):
        out = self.original(image_features, *args, **kwargs)
        pending = getattr(self.local, "pending", None)
        self.local.pending = None
        if pending is not None:
            rows, carrier = pending
            sizes = [f.shape[0] for f in image_features]
            signal = [r[..., None].to(f.dtype) for r, f in zip(torch.split(rows, sizes), image_features)]
            kwargs = dict(kwargs, image_newline=torch.zeros(1, dtype=rows.dtype, device=rows.device))
            packed = self.original(signal, *args, **kwargs)[0]
            packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
            self.emit("cls_attention", packed.reshape(-1).float(), carrier)
        return out

    def remove(self) -> None:
        if self.base.__dict__.get("pack_image_features") is self:
            del self.base.pack_image_features

    def __deepcopy__(self, memo):
        raise copy_refused()


@dataclasses.dataclass(frozen=True)
class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA-OneVision: images as LLaVA-NeXT; a video is frames of pooled tokens plus one newline."""

    name = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    frame_tokens: int = 0
    """Tokens per video frame: the model pools each frame's side x side grid to ceil(side/2)^2."""

    @classmethod
    def from_config(cls, config):
        side = config.vision_config.image_size // config.vision_config.patch_size
        return dataclasses.replace(super().from_config(config), frame_tokens=math.ceil(side / 2) ** 2)

    def vision_groups(self, vision_mask, call_kwargs):
        input_ids = call_kwargs.get("input_ids")
        if input_ids is None or self.video_token_id is None:
            return super().vision_groups(vision_mask, call_kwargs)
        out = torch.full_like(input_ids, -1)
        ft = self.frame_tokens
        for b in range(input_ids.shape[0]):
            group = 0
            for pos, end, tok in token_runs(vision_mask[b], input_ids[b]):  # an image may touch a video
                if tok == self.video_token_id:
                    # frames x ft pooled tokens, then one newline that joins the last frame
                    frames = max(1, (end - pos - 1) // ft)
                    k = torch.arange(end - pos, device=out.device)
                    out[b, pos:end] = group + torch.clamp(k // ft, max=frames - 1)
                    group += frames
                else:
                    out[b, pos:end] = group
                    group += 1
        return out


def _packs(model):
    """The model's ``pack_image_features`` (NeXT / OneVision: anyres tiles are packed), or None (LLaVA-1.5)."""
    return getattr(getattr(model, "model", model), "pack_image_features", None)


# ------------------------------------------------------------------------------------------------
# Token layout: where each vision token lies in its picture (tokencomp.heatmap draws it)
# ------------------------------------------------------------------------------------------------


def _grid(start: int, rows: int, cols: int) -> torch.Tensor:
    return torch.arange(start, start + rows * cols).view(rows, cols)


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
    feature rows/columns ``(top, left, bottom, right)`` in the padded canvas, replayed through the
    model's own packing)."""
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


def _anyres_layout(model, inputs, sample, runs):
    """Replay the model's own feature packing on placeholder features to find the row structure
    and, for the high-resolution view, where its unpadded grid lies in the padded tile canvas.
    Returns the regions and that extent (None without a high-resolution view)."""
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
    regions.append(Region(0, 0, "anyres" if tiles > 1 else "image", torch.tensor(rows)))
    if tiles == 1:
        return regions, None
    grid = torch.tensor(coords).view(len(rows), len(rows[0]), 2)
    r0, r1 = _extent(grid[..., 0].amin(), grid[..., 0].amax(), len(rows))
    c0, c1 = _extent(grid[..., 1].amin(), grid[..., 1].amax(), len(rows[0]))
    return regions, (r0, c0, r1, c1)


def _extent(lo, hi, n: int) -> tuple[float, float]:
    """The span [start, end) in feature units covered by ``n`` evenly spaced cells whose centers run
    from feature ``lo`` to ``hi`` (integers when unpadded only, fractional after downsampling)."""
    lo, hi = float(lo), float(hi)
    step = (hi - lo) / (n - 1) if n > 1 else 1.0
    return lo + 0.5 - step / 2, hi + 0.5 + step / 2


@tokencomp.hookimpl
def register_model_adapters(register):
    register(LlavaAdapter)
    register(LlavaOnevisionAdapter)
