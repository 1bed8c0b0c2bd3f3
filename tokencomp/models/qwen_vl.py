"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

M-RoPE needs nothing special: the text model folds the three position axes into ``(B, L, d)``
rotary tables before the layers, and the engine gathers those. Video is split into per-frame
groups (from ``video_grid_thw``) so quota selectors can budget frames, and those of one video are
marked as one (video methods read them even where a timestamp separates frames, as in Qwen3-VL, from
the video's grid or its encoded features). Qwen3-VL adds *deepstack*:
after its first decoder layers, vision features are added at ``visual_pos_masks``; once tokens
were dropped, the mask and the feature rows must be restricted to the kept tokens.

Token layout (heatmaps): every image and every temporal step of a video is one grid of
``h / merge`` x ``w / merge`` tokens (from ``image_grid_thw`` / ``video_grid_thw``) over the whole picture.

Vision-tower signal ``cls_attention``, the no-[CLS] variant (VisionZip's and VisPruner's choice for
SigLIP towers): Qwen towers have no [CLS] token, so a patch's value is the attention it *receives* at
the last vision block (the one whose output the merger reads), averaged over heads and over the
queries that attend to it. Those are the queries of its own attention segment, exactly as the block
attends (its ``cu_seqlens``): an image, or one temporal step of a video; a window where that block is
windowed (Qwen2.5-VL's released checkpoints end on a full-attention block). Each segment's patch values
therefore sum to 1, and in a prompt with images of different sizes the smaller image's patches get
larger values. The ``merge x merge`` patches the merger folds into one LLM token are *summed* (the
attention mass that token receives; a mean would scale everything by ``1 / merge**2``, same order), and
Qwen2.5-VL's window reordering of the patches is undone, so the values follow the features into the
prompt (images and videos interleaved as the prompt has them). Computed in float32 from the block's
own ``qkv`` output and rotary function, blockwise over equal-length segments and query chunks (at
most :data:`CHUNK_ELEMENTS` scores at once, or one query row), never through eager attention or ``output_attentions``.
LightCompress's Qwen2.5-VL VisPruner *sums* over the queries and averages the 4 patches: the same
order within one image or frame, a different one across images of different sizes.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections import defaultdict

import torch

import tokencomp
from tokencomp.errors import UnsupportedModelError, copy_refused
from tokencomp.heatmap import Region
from tokencomp.interfaces import ModelAdapter
from tokencomp.masks import gather_seq, token_runs

_SIGNAL_ATTR = "_tokencomp_qwen_cls_attention"
"""Attribute of a vision tower's output holding ``(pooled features, per-token signal)``: ``generate``
encodes images before the prefill and hands those output objects back as ``mm_encoder_outputs``."""

CHUNK_ELEMENTS = 1 << 24
"""Attention scores materialised at once (float32) when computing ``cls_attention``: 64 MiB."""


@dataclasses.dataclass(frozen=True)
class QwenVLAdapter(ModelAdapter):
    """Qwen2-VL and Qwen2.5-VL. Signal ``cls_attention``: attention received per patch at the last
    vision block (no [CLS]), see the module docstring."""

    name = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    renumber = False  # M-RoPE: three position axes per token, laid out by the image grid

    merge: int = 2
    """``spatial_merge_size``: one LLM token per ``merge x merge`` patches."""
    temporal_patch: int = 1
    """``temporal_patch_size``: input video frames per temporal step."""

    @classmethod
    def from_config(cls, config):
        vision = getattr(config, "vision_config", None)
        return dataclasses.replace(
            super().from_config(config),
            merge=getattr(vision, "spatial_merge_size", 2),
            temporal_patch=getattr(vision, "temporal_patch_size", None) or 1,
        )

    def vision_groups(self, vision_mask, call_kwargs):
        pos = _mrope_ids(call_kwargs, vision_mask.shape[1])
        if pos is not None:
            # generate() passes M-RoPE ids [text;] t, h, w: a new frame starts where t changes.
            t = pos[-3]
            changed = torch.nn.functional.pad(t[:, 1:] != t[:, :-1], (1, 0), value=True)
            starts = vision_mask & (changed | ~torch.nn.functional.pad(vision_mask, (1, 0))[:, :-1])
            groups = torch.cumsum(starts.long(), dim=1) - 1
            return torch.where(vision_mask, groups, torch.full_like(groups, -1))
        return self._groups_from_grid(vision_mask, call_kwargs)

    def _groups_from_grid(self, vision_mask, call_kwargs):
        """Plain forward calls carry ``video_grid_thw`` instead: frames of h*w/merge^2 tokens."""
        groups = super().vision_groups(vision_mask, call_kwargs)
        grid = call_kwargs.get("video_grid_thw")
        input_ids = call_kwargs.get("input_ids")
        video_id = self.video_token_id
        if grid is None or input_ids is None or video_id is None:
            return groups
        merge = self.merge
        frame_sizes = [int(h * w) // (merge * merge) for t, h, w in grid.tolist() for _ in range(int(t))]
        frames = iter(frame_sizes)
        out = groups.clone()
        for b in range(vision_mask.shape[0]):
            g = 0
            for pos, end, tok in token_runs(vision_mask[b], input_ids[b]):
                if tok == video_id:
                    p = pos
                    while p < end:
                        size = next(frames, end - p)
                        out[b, p : p + size] = g
                        g, p = g + 1, p + size
                else:
                    out[b, pos:end] = g
                    g += 1
        return out

    def vision_videos(self, vision_mask, groups, call_kwargs):
        # The video placeholders, in prompt order over the batch, hold each video's features in turn:
        # t*h*w/merge^2 of its grid, or the rows of its pre-encoded features (generate encodes them
        # before the prefill and drops the grid). Counting them finds a video even where its frames
        # are not one run (Qwen3-VL writes a timestamp and vision start / end around every frame).
        ids, types = call_kwargs.get("input_ids"), call_kwargs.get("mm_token_type_ids")
        if ids is not None and self.video_token_id is not None:
            video = vision_mask & (ids == self.video_token_id)
        elif types is not None:
            video = vision_mask & (types.to(vision_mask.device) == 2)  # inputs_embeds calls: the processor's token types
        else:
            return None
        sizes = _video_sizes(call_kwargs, self.merge, video.device)
        if sizes is None:
            return None
        rank = (torch.cumsum(video.flatten().long(), 0) - 1).view_as(video)
        which = torch.searchsorted(torch.cumsum(sizes, 0), rank, right=True)
        return torch.where(video, which, torch.full_like(which, -1))

    def vision_grid_widths(self, vision_mask, groups, call_kwargs):
        pos = _mrope_ids(call_kwargs, vision_mask.shape[1])
        if pos is not None:
            # M-RoPE ids (generate passes them): a group's tokens span its grid's columns on the w axis.
            w = pos[-1].to(vision_mask.device).long()
            g = groups.clamp(min=0)  # group numbers are < L: an (B, L) table holds them without a sync
            big = torch.iinfo(torch.long).max
            hi = torch.full_like(w, -big).scatter_reduce(1, g, torch.where(vision_mask, w, -big), reduce="amax")
            lo = torch.full_like(w, big).scatter_reduce(1, g, torch.where(vision_mask, w, big), reduce="amin")
            return torch.where(vision_mask, (hi - lo + 1).gather(1, g), torch.zeros_like(w))
        # A plain forward carries the grids: the k-th image's (frame's) tokens are the k-th run of its
        # placeholder count, w / merge tokens per row. Tokens of a kind whose grid the call lacks get 0.
        ids = call_kwargs.get("input_ids")
        if ids is None:
            return None
        out = torch.zeros_like(groups)
        for tok, key in ((self.image_token_id, "image_grid_thw"), (self.video_token_id, "video_grid_thw")):
            grid = call_kwargs.get(key)
            if tok is None or grid is None or len(grid) == 0:
                continue
            t, h, w = grid.to(out.device).long().unbind(-1)
            sizes, widths = t * h * w // self.merge**2, w // self.merge  # a video's frames share its grid
            mask = vision_mask & (ids.to(out.device) == tok)
            rank = (torch.cumsum(mask.flatten().long(), 0) - 1).view_as(mask)
            which = torch.searchsorted(torch.cumsum(sizes, 0), rank, right=True).clamp(max=len(sizes) - 1)
            out = torch.where(mask, widths[which], out)
        return out

    def signal_names(self, model):
        tower = _tower(model)
        blocks = getattr(tower, "blocks", None)
        return ("cls_attention",) if blocks and hasattr(getattr(blocks[-1], "attn", None), "qkv") else ()

    def install_signals(self, model, names, emit):
        return _ReceivedAttention(model, self, emit).handles

    def token_layout(self, model, inputs, sample=0, *, processor=None, image_sizes=None):
        # Whole images / frames: no box needed. Grids are listed sample after sample.
        ids = inputs["input_ids"][sample]
        out = []
        for key, tok, grid_key in (("image", self.image_token_id, "image_grid_thw"), ("video", self.video_token_id, "video_grid_thw")):
            grids = inputs.get(grid_key)
            if grids is None or tok is None:
                continue
            # Count this sample's first item from the tokens of the samples before it.
            tokens_per_item = [int(t * h * w) // self.merge**2 for t, h, w in grids.tolist()]
            before = int((inputs["input_ids"][:sample] == tok).sum())
            idx, seen = 0, 0
            while seen < before:
                seen += tokens_per_item[idx]
                idx += 1
            positions = (ids == tok).nonzero().flatten()
            p, item = 0, 0
            stride = self.temporal_patch if key == "video" else 1
            while p < len(positions):
                t, h, w = grids[idx + item].tolist()
                rows, cols = h // self.merge, w // self.merge
                for frame in range(int(t)):
                    cells = positions[p : p + rows * cols]
                    out.append(Region(item, frame, key, cells.view(rows, cols), frame_stride=stride))
                    p += rows * cols
                item += 1
        return out


@dataclasses.dataclass(frozen=True)
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: Qwen-VL plus deepstack feature injection restricted to the kept vision tokens."""

    name = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)

    def install(self, model, engine):
        decoder = self.language_model(model)
        original = decoder._deepstack_process  # bound method of the class

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            selection = engine.selection()
            if selection is None:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            full = visual_pos_masks.to(torch.bool)
            # Row of each vision token in visual_embeds: its rank among vision tokens, row-major.
            rank = (torch.cumsum(full.flatten().long(), 0) - 1).view_as(full)
            idx = selection.positions.to(full.device)
            kept = gather_seq(full, idx, 1) & selection.alive.to(full.device)
            rows = gather_seq(rank, idx, 1)[kept]
            return original(hidden_states, kept, visual_embeds[rows.to(visual_embeds.device)])

        # An instance attribute shadows the class method; deleting it restores the model exactly.
        decoder._deepstack_process = deepstack_process

        def undo():
            if decoder.__dict__.get("_deepstack_process") is deepstack_process:
                del decoder._deepstack_process

        return undo


def _mrope_ids(call_kwargs, length: int) -> "torch.Tensor | None":
    """The call's M-RoPE position ids ``([text;] t, h, w, B, L)``, as generate passes them for the
    whole prompt, or None (a plain forward: the model derives them from the grids itself)."""
    pos = call_kwargs.get("position_ids")
    return pos if pos is not None and pos.ndim == 3 and pos.shape[-1] == length else None


def _tower(model):
    return getattr(getattr(model, "model", model), "visual", None)


def _video_sizes(call_kwargs, merge: int, device) -> "torch.Tensor | None":
    """``(N,)`` long: placeholder tokens of each of the call's videos, from ``video_grid_thw`` or the
    per-video rows of pre-encoded video features; None when the call carries neither."""
    grid = call_kwargs.get("video_grid_thw")
    if grid is not None:
        return (grid.prod(-1) // merge**2).to(device)
    items = getattr((call_kwargs.get("mm_encoder_outputs") or {}).get("video"), "pooler_output", None)
    if items is None or isinstance(items, torch.Tensor):
        return None  # one tensor for all videos: their boundaries are lost
    return torch.tensor([len(item) for item in items], dtype=torch.long, device=device)


def received_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens, scale: float, budget: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``(N,)`` float32: the softmax attention each of the ``N`` rows receives from the queries of its
    segment (``cu_seqlens``: segment boundaries, attention never crosses them), averaged over the ``H``
    heads and over those queries. ``q``, ``k``: ``(N, H, d)`` after the rotary embedding.

    Segments of equal length are batched; queries go in chunks so that at most ``budget`` scores
    exist at once (one segment's full ``n x n`` matrix never does when it is larger)."""
    N, H, _ = q.shape
    out = torch.zeros(N, dtype=torch.float32, device=q.device)
    bounds = [int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    starts = defaultdict(list)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            starts[b - a].append(a)
    for n, first in starts.items():
        rows = torch.tensor(first, device=q.device)[:, None] + torch.arange(n, device=q.device)  # (G, n)
        qs = q[rows].transpose(1, 2).float()  # (G, H, n, d)
        ks = k[rows].transpose(1, 2).float()
        per_query = max(1, budget // (H * n))  # (segment, query) pairs whose scores fit the budget
        seg_step, q_step = (max(1, per_query // n), n) if per_query >= n else (1, per_query)
        acc = torch.zeros(rows.shape, dtype=torch.float32, device=q.device)
        for g in range(0, len(first), seg_step):
            kt = ks[g : g + seg_step].transpose(-1, -2)
            for c in range(0, n, q_step):
                p = torch.softmax((qs[g : g + seg_step, :, c : c + q_step] @ kt) * scale, dim=-1)
                acc[g : g + seg_step] += p.sum(dim=(1, 2))
        out[rows.reshape(-1)] = (acc / (H * n)).reshape(-1)
    return out


class _ReceivedAttention:
    """The hooks computing ``cls_attention`` on a Qwen vision tower (see the module docstring) and
    handing it to the engine in prompt order.

    One tower call encodes all images (or all videos) of a forward: its last block's attention gives
    per-patch values (hooks on that block's attention and ``qkv``), the tower's output hook folds them
    into per-token values in feature order and stores them on the output object. The base model's
    forward then emits one value per vision token, images and videos interleaved as the prompt has
    them; outputs that ``generate`` encoded beforehand (``mm_encoder_outputs``, possibly expanded for
    beams) are read back from their stored values."""

    def __init__(self, model, adapter, emit):
        base = getattr(model, "model", model)
        tower = base.visual
        attn = tower.blocks[-1].attn
        rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision", None)
        if rotary is None:
            raise UnsupportedModelError(f"cls_attention: no apply_rotary_pos_emb_vision next to {type(attn).__name__}")
        # Qwen2.5-VL runs its blocks on patches reordered window by window; the merger's output is
        # put back in raster order with the inverse of that window index.
        windows = hasattr(tower, "fullatt_block_indexes") and getattr(tower, "window_size", None)
        window_index = getattr(sys.modules[type(tower).__module__], "get_vision_window_index", None) if windows else None
        if windows and window_index is None:
            raise UnsupportedModelError(f"cls_attention: cannot replay the window order of {type(tower).__name__}")
        self.base, self.tower, self.attn, self.rotary = base, tower, attn, rotary
        self.window_index, self.emit = window_index, emit
        self.ids = (adapter.image_token_id, adapter.video_token_id)
        self.unit = tower.spatial_merge_size**2
        self.local = threading.local()
        self.handles = [
            tower.register_forward_pre_hook(self._tower_start, with_kwargs=True),
            attn.register_forward_pre_hook(self._attn_start, with_kwargs=True),
            attn.qkv.register_forward_hook(self._qkv_done),
            tower.register_forward_hook(self._tower_done),
            base.register_forward_pre_hook(self._call_start, with_kwargs=True),
            base.register_forward_hook(self._call_end, always_call=True),
        ]

    # -------------------------------------------------------------------- one tower call

    def _tower_start(self, module, args, kwargs):
        order = None
        if self.window_index is not None:
            # The window order the tower uses: precomputed by the caller (both kwargs, as the tower
            # requires), or computed from the grid by the tower's own function.
            if kwargs.get("window_index") is not None and kwargs.get("cu_window_seqlens") is not None:
                order = kwargs["window_index"]
            else:
                grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
                order, _ = self.window_index(
                    grid, spatial_merge_size=module.spatial_merge_size, window_size=module.window_size, patch_size=module.patch_size
                )
        self.local.run = {"order": order}

    def _attn_start(self, module, args, kwargs):
        run = getattr(self.local, "run", None)
        if run is not None:
            run["cu"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            run["rope"] = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)

    def _qkv_done(self, module, args, out):
        run = getattr(self.local, "run", None)
        if run is None or run.get("cu") is None or run.get("rope") is None:
            return
        n = out.shape[0]
        q, k, _ = out.reshape(n, 3, self.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = run["rope"]
        q, k = self.rotary(q, k, cos, sin)  # the block's own rotary, same dtypes as the block
        run["patches"] = received_attention(q, k, run["cu"], self.attn.scaling)

    def _tower_done(self, module, args, out):
        run = getattr(self.local, "run", None)
        self.local.run = None
        patches = None if run is None else run.get("patches")
        if patches is None:
            return
        tokens = patches.view(-1, self.unit).sum(1)  # the merger folds `unit` consecutive patches
        if run["order"] is not None:
            tokens = tokens[torch.argsort(run["order"].to(tokens.device))]
        pooled = getattr(out, "pooler_output", None)
        out.__dict__[_SIGNAL_ATTR] = (pooled, tokens)
        call = getattr(self.local, "call", None)
        if call is not None and call["pending"]:
            call["parts"][call["pending"].pop(0)] = tokens
            if not call["pending"]:
                self._emit(call)

    # -------------------------------------------------------------------- one model forward

    def _call_start(self, module, args, kwargs):
        given = kwargs.get("mm_encoder_outputs") or {}
        parts = {}
        for kind, encoded in given.items():
            stored = getattr(encoded, "__dict__", {}).get(_SIGNAL_ATTR)
            if stored is not None:
                parts[kind] = _rows_of(encoded.pooler_output, *stored)
        # The base model encodes images, then videos (its forward's order), when given pixels.
        pixels = (("image", "pixel_values"), ("video", "pixel_values_videos"))
        pending = [k for k, px in pixels if kwargs.get(px) is not None and given.get(k) is None]
        ids = kwargs.get("input_ids", args[0] if args else None)
        call = {"ids": ids, "embeds": kwargs.get("inputs_embeds"), "parts": parts, "pending": pending}
        self.local.call = call
        if parts and not pending:
            self._emit(call)

    def _call_end(self, module, args, out):
        self.local.call = None

    def _emit(self, call):
        parts = call["parts"]
        if len(parts) == 1:
            self.emit("cls_attention", next(iter(parts.values())))
            return
        # Images and videos in one prompt: the model scatters each kind into its own placeholders;
        # lay both out in the order of all vision tokens.
        kinds = self._kinds(call)
        if kinds is None:
            return  # the engine reports the missing signal
        image, video = kinds
        is_image = image[image | video].to(parts["image"].device)
        values = torch.empty(is_image.shape[0], dtype=torch.float32, device=is_image.device)
        values[is_image] = parts["image"]
        values[~is_image] = parts["video"].to(values.device)
        self.emit("cls_attention", values)

    def _kinds(self, call):
        """``(image, video)`` ``(B, L)`` placeholder masks of this forward, from its ids or embeddings."""
        ids, embeds = call["ids"], call["embeds"]
        if ids is not None:
            return ids == self.ids[0], ids == self.ids[1]
        if embeds is None:
            return None
        table = self.base.get_input_embeddings()
        marks = [(embeds == table(torch.tensor(i, device=embeds.device)).to(embeds.dtype)).all(-1) for i in self.ids]
        return marks[0], marks[1]

    def __deepcopy__(self, memo):
        raise copy_refused()  # its hooks sit on the model: a copy would share this handle's state


def _rows_of(items, pooled, tokens):
    """The signal of an encoded output's feature rows ``items`` (a tensor or the per-item split that
    ``get_image_features`` returns, possibly repeated by ``generate`` for beams): each item is a view
    of the tower's ``pooled`` output, and its offset there says which signal rows it carries."""
    if isinstance(items, torch.Tensor) or pooled is None:
        return tokens
    out = []
    for item in items:
        if item.untyped_storage().data_ptr() != pooled.untyped_storage().data_ptr():
            return tokens  # not views of the pooled output: assume the original order
        start = (item.storage_offset() - pooled.storage_offset()) // pooled.stride(0)
        out.append(tokens[start : start + item.shape[0]])
    return torch.cat(out) if out else tokens


@tokencomp.hookimpl
def register_model_adapters(register):
    register(QwenVLAdapter)
    register(Qwen3VLAdapter)
