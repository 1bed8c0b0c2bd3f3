"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: plain causal Llama / Qwen2 decoders, nothing to adapt
beyond finding the image / video placeholder ids (NeXT's ``image_newline`` rows sit on placeholder
slots too, so they count as vision tokens). OneVision videos are split into frames for quotas.

Vision-tower signals: ``cls_attention`` from the CLIP / SigLIP layer whose output the projector reads
(``vision_feature_layer``, −2: the layer VisionZip and FasterVLM read ``attentions[-2]`` of; for a
tower without [CLS] the first token's row). LLaVA-1.5: each image's patches map 1:1, in order, to its
placeholder tokens; NeXT / OneVision: the per-tile rows go through the model's own
``pack_image_features`` (anyres tiles, unpadding, newline rows = 0)."""

from __future__ import annotations

import math
import threading

import torch

import tokencomp
from tokencomp.errors import copy_refused
from tokencomp.interfaces import ModelAdapter, token_runs


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
        packs = getattr(base, "pack_image_features", None)  # NeXT / OneVision: anyres tiles are packed

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


class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA-OneVision: images as LLaVA-NeXT; a video is frames of pooled tokens plus one newline."""

    name = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def install(self, model, engine):
        cfg = model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        # The model pools each frame's side x side grid to ceil(side/2) x ceil(side/2) tokens.
        self._frame_tokens = math.ceil(side / 2) ** 2
        self._video_id = getattr(cfg, "video_token_id", getattr(cfg, "video_token_index", None))
        return None

    def vision_groups(self, vision_mask, call_kwargs):
        input_ids = call_kwargs.get("input_ids")
        if input_ids is None or getattr(self, "_video_id", None) is None:
            return super().vision_groups(vision_mask, call_kwargs)
        out = torch.full_like(input_ids, -1)
        ft = self._frame_tokens
        for b in range(input_ids.shape[0]):
            group = 0
            for pos, end, tok in token_runs(vision_mask[b], input_ids[b]):  # an image may touch a video
                if tok == self._video_id:
                    # frames x ft pooled tokens, then one newline that joins the last frame
                    frames = max(1, (end - pos - 1) // ft)
                    k = torch.arange(end - pos, device=out.device)
                    out[b, pos:end] = group + torch.clamp(k // ft, max=frames - 1)
                    group += frames
                else:
                    out[b, pos:end] = group
                    group += 1
        return out


@tokencomp.hookimpl
def register_model_adapters(register):
    register(LlavaAdapter)
    register(LlavaOnevisionAdapter)
