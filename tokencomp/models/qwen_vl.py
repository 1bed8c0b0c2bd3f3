"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

M-RoPE needs nothing special: the text model folds the three position axes into ``(B, L, d)``
rotary tables before the layers, and the engine gathers those. Video is split into per-frame
groups (from ``video_grid_thw``) so quota selectors can budget frames. Qwen3-VL adds *deepstack*:
after its first decoder layers, vision features are added at ``visual_pos_masks``; once tokens
were dropped, the mask and the feature rows must be restricted to the kept tokens.

Token layout (heatmaps): every image and every temporal step of a video is one grid of
``h / merge`` x ``w / merge`` tokens (from ``image_grid_thw`` / ``video_grid_thw``) over the whole picture.
"""

from __future__ import annotations

import dataclasses

import torch

import tokencomp
from tokencomp.heatmap import Region
from tokencomp.interfaces import ModelAdapter
from tokencomp.masks import gather_seq, token_runs


@dataclasses.dataclass(frozen=True)
class QwenVLAdapter(ModelAdapter):
    """Qwen2-VL and Qwen2.5-VL."""

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
        pos = call_kwargs.get("position_ids")
        if pos is not None and pos.ndim == 3 and pos.shape[-1] == vision_mask.shape[1]:
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


@tokencomp.hookimpl
def register_model_adapters(register):
    register(QwenVLAdapter)
    register(Qwen3VLAdapter)
