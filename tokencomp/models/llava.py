"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: plain causal Llama / Qwen2 decoders, nothing to adapt
beyond finding the image / video placeholder ids (NeXT's ``image_newline`` rows sit on placeholder
slots too, so they count as vision tokens). OneVision videos are split into frames for quotas.

Vision-tower signals: ``cls_attention`` from the CLIP / SigLIP layer whose output the projector reads
(``vision_feature_layer``, −2: the layer VisionZip and FasterVLM read ``attentions[-2]`` of; for a
tower without [CLS] the first token's row). LLaVA-1.5: each image's patches map 1:1, in order, to its
placeholder tokens; NeXT / OneVision: the per-tile rows go through the model's own
``pack_image_features`` (anyres tiles, unpadding, newline rows = 0); OneVision videos: each frame's
rows pooled by the model's own ``apply_pooling`` as the features are (bilinear, to half the side),
the video's closing newline 0. Values are kept per feature item on the encoder's output, so the items
``generate`` encodes before the prefill and repeats per beam or returned sequence get theirs back.

Token layout (heatmaps): LLaVA-1.5 images are square grids over the CLIP processor's pad / resize /
center crop; NeXT / OneVision images are a base view plus an anyres view whose rows end in
``image_newline`` tokens, found by replaying the model's own packing."""

from __future__ import annotations

import dataclasses
import inspect
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
        return _ClsAttention(model, self, emit).handles


_SIGNAL_ATTR = "_tokencomp_llava_cls_attention"
"""Attribute of a ``get_image_features`` / ``get_video_features`` output holding ``(items, signals)``:
its feature items as encoded and each item's per-token signal. ``generate`` encodes before the
prefill, repeats the items per beam / returned sequence and hands the output back as
``mm_encoder_outputs``; each item's signal is found again from the item itself."""


class _ClsAttention:
    """The hooks computing ``cls_attention`` on a CLIP / SigLIP tower (see the module docstring) and
    handing it to the engine in prompt order.

    The chosen layer's q / k projections give each tile's [CLS] row (the tower's output hook keeps
    them per tile); the wrapped ``get_image_features`` / ``get_video_features`` turn the rows into one
    signal per feature item (LLaVA-1.5: an image's patches; NeXT / OneVision: the model's own packing;
    OneVision video: the model's own frame pooling, newline 0) and store them on the output object.
    Before the language model runs, every forward emits the signal of the items it places, read from
    the outputs it encoded or was given, so items that ``generate`` repeated for beams get their values
    repeated too."""

    def __init__(self, model, adapter, emit):
        cfg = model.config
        base = model.model
        tower = base.vision_tower
        layers = next(m for n, m in tower.named_modules() if n.endswith("encoder")).layers
        vfl = cfg.vision_feature_layer  # hidden_states[vfl] is the output of layer vfl - 1
        self.attn = layers[max(0, len(layers) + vfl if vfl < 0 else vfl - 1)].self_attn
        self.strip_cls = cfg.vision_feature_select_strategy == "default"
        self.base, self.emit = base, emit
        self.ids = (adapter.image_token_id, adapter.video_token_id)
        self.local = threading.local()
        self.handles = [
            self.attn.q_proj.register_forward_hook(self._keep_query),
            self.attn.k_proj.register_forward_hook(self._attention_row),
            tower.register_forward_hook(self._tower_done),
            base.register_forward_pre_hook(self._call_start, with_kwargs=True),
            base.register_forward_hook(self._call_end, always_call=True),
            base.language_model.register_forward_pre_hook(self._place),
        ]
        self.packs = _packs(model) is not None
        if self.packs:
            self.handles.append(_Wrapped(base, "pack_image_features", self._pack))
        for kind in ("image", "video"):
            if getattr(base, f"get_{kind}_features", None) is not None:
                self.handles.append(_Wrapped(base, f"get_{kind}_features", self._encoder(kind)))

    # -------------------------------------------------------------------- one tower call

    def _keep_query(self, module, args, out):
        self.local.q = out[:, :1]  # the [CLS] row only

    def _attention_row(self, module, args, out):
        q = getattr(self.local, "q", None)
        self.local.q = None
        if q is None:
            return
        N, T, _ = out.shape
        H, d = self.attn.num_heads, self.attn.head_dim
        qh = q.reshape(N, 1, H, d).transpose(1, 2).float()
        kh = out.reshape(N, T, H, d).transpose(1, 2).float()
        row = torch.softmax((qh @ kh.transpose(-1, -2)) * self.attn.scale, dim=-1).mean(1)[:, 0]  # (N, T)
        self.local.row = row[:, 1:] if self.strip_cls else row

    def _tower_done(self, module, args, out):
        self.local.rows = getattr(self.local, "row", None)  # (tiles, patches) of this tower call
        self.local.row = None

    # -------------------------------------------------------------------- per feature item

    def _pack(self, original, image_features, *args, **kwargs):
        """Runs the model's own packing on the per-tile rows as well (tiles, unpadding, OneVision's
        downsampling; newline rows 0), one signal per image in the model's order."""
        out = original(image_features, *args, **kwargs)
        rows = getattr(self.local, "rows", None)
        sizes = [f.shape[0] for f in image_features]
        if rows is not None and rows.shape[0] == sum(sizes):
            signal = [r[..., None] for r in torch.split(rows, sizes)]
            kwargs = dict(kwargs, image_newline=torch.zeros(1, dtype=rows.dtype, device=rows.device))
            packed = original(signal, *args, **kwargs)[0]
            self.local.packed = [p.reshape(-1) for p in packed]
        return out

    def _encoder(self, kind):
        def encode(original, *args, **kwargs):
            self.local.rows = self.local.packed = None
            out = original(*args, **kwargs)
            items = getattr(out, "pooler_output", None)
            signals = self._item_signals(kind, items)
            self.local.rows = self.local.packed = None
            if signals is not None:
                out.__dict__[_SIGNAL_ATTR] = (list(items), signals)
                call = getattr(self.local, "call", None)
                if call is not None:
                    call["encoded"][kind] = out
            return out

        return encode

    def _item_signals(self, kind, items):
        """One float32 signal per feature item of a ``get_*_features`` output, or None."""
        rows = getattr(self.local, "rows", None)
        if rows is None or items is None:
            return None
        if kind == "video":  # OneVision: (videos, frames * pooled + 1) items, pooled like the features
            n = len(items)
            pooled = self.base.apply_pooling(rows[..., None]).reshape(n, -1)
            signals = list(torch.cat([pooled, pooled.new_zeros(n, 1)], dim=1))
        else:
            signals = getattr(self.local, "packed", None) if self.packs else list(rows)
        if signals is None or len(signals) != len(items) or any(s.shape[0] != i.shape[0] for s, i in zip(signals, items)):
            return None
        return signals

    # -------------------------------------------------------------------- one model forward

    def _call_start(self, module, args, kwargs):
        given = kwargs.get("mm_encoder_outputs") or {}
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.local.call = {"ids": ids, "embeds": kwargs.get("inputs_embeds"), "encoded": dict(given)}

    def _call_end(self, module, args, out):
        self.local.call = None

    def _place(self, module, args):
        call = getattr(self.local, "call", None)
        if call is None:
            return
        parts = {kind: v for kind, enc in call["encoded"].items() if enc is not None and (v := _signal_of(enc)) is not None}
        if not parts:
            return  # no tower output here: the engine reports the missing signal
        if len(parts) == 1:
            self.emit("cls_attention", next(iter(parts.values())))
            return
        # Images and a video in one prompt (OneVision): each kind fills its own placeholders.
        kinds = self._kinds(call)
        if kinds is None:
            return
        image, video = kinds
        is_image = image[image | video]
        if int(is_image.sum()) != parts["image"].numel() or int((~is_image).sum()) != parts["video"].numel():
            return  # the model itself refuses mismatched placeholder counts
        values = torch.empty(is_image.shape[0], dtype=torch.float32, device=parts["image"].device)
        is_image = is_image.to(values.device)
        values[is_image] = parts["image"]
        values[~is_image] = parts["video"].to(values.device)
        self.emit("cls_attention", values)

    def _kinds(self, call):
        """``(image, video)`` ``(B, L)`` placeholder masks of this forward, by the model's own rule (from
        its ids, or its embeddings equal to the placeholders' rows)."""
        ids, embeds = call["ids"], call["embeds"]
        if ids is None and embeds is None:
            return None
        image, video = self.base.get_placeholder_mask(ids, inputs_embeds=embeds if embeds is not None else ids.new_empty(0))
        return image[..., 0], video[..., 0]

    def __deepcopy__(self, memo):
        raise copy_refused()  # its hooks sit on the model: a copy would share this state


def _signal_of(encoded):
    """The signal of an encoded output's current feature items, one value per token: each item is
    matched to the item it was encoded as (the same tensor or view; or, where ``generate`` copied the
    rows of a stacked output, the same values). Unmatched items give the encoded order unchanged."""
    stored = getattr(encoded, "__dict__", {}).get(_SIGNAL_ATTR)
    if stored is None:
        return None
    originals, signals = stored
    out = []
    for item in encoded.pooler_output:  # a list of items, or a tensor's rows
        j = _index_of(item, originals)
        if j is None:
            return torch.cat(signals)
        out.append(signals[j])
    return torch.cat(out) if out else torch.cat(signals)


def _index_of(item: torch.Tensor, originals: list) -> Optional[int]:
    """Which of ``originals`` ``item`` is: the same tensor or view first, then equal values."""
    for j, o in enumerate(originals):
        if o is item or (o.data_ptr() == item.data_ptr() and o.shape == item.shape and o.stride() == item.stride()):
            return j
    for j, o in enumerate(originals):
        if o.shape == item.shape and o.device == item.device and torch.equal(o, item):
            return j
    return None


class _Wrapped:
    """A model method replaced by ``fn(original, *args, **kwargs)`` through an instance attribute with
    the original's signature (``generate`` picks the encoders' arguments by it); ``remove()`` deletes
    the attribute, restoring the class method."""

    def __init__(self, owner, name, fn):
        self.owner, self.name, self.fn = owner, name, fn
        self.original = getattr(owner, name)
        self.__signature__ = inspect.signature(self.original)
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        return self.fn(self.original, *args, **kwargs)

    def remove(self) -> None:
        if self.owner.__dict__.get(self.name) is self:
            delattr(self.owner, self.name)

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
    names = inspect.signature(inner.pack_image_features).parameters  # also while a recipe wraps it
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
