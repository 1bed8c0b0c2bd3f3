"""A compressed prefill: the state of one forward that drops (or merges) vision tokens, and its
per-layer step. The :class:`~tokencomp.engine.Handle` creates one per compressed forward and calls
:meth:`Prefill.layer` from its decoder-layer hooks.

At a stage layer the step scores the live vision tokens, selects (and merges), and compacts the
hidden states; from then on every layer gets the attention mask, rotary tables and position ids
*gathered* from the full-length originals captured at layer 0 (kept tokens keep their original
positions). The compacted layers' indices go on the KV cache for the decode steps.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Optional

import torch

from . import masks as M
from .accounting import kept_count
from .compaction import compact
from .decode import CacheMeta, LayerMeta, attach, forward_cache, keep_cached_rows, meta_of
from .errors import PluginError, UnsupportedModelError
from .interfaces import LayerView, Stage
from .probes import attention_rows, layer_keys
from .stats import Stats


class Prefill:
    """State of one compressed prefill on one thread, and its per-layer step."""

    mode = "prefill"

    def __init__(self, handle, *, is_vision, valid, groups, last, keeps, signals, videos=None, grid_widths=None):
        self.handle = handle
        self.length = is_vision.shape[1]
        self.is_vision = is_vision  # (B, L)
        self.valid = valid  # (B, L) real (non-padding) tokens
        self.groups = groups  # (B, L) image / frame number, -1 elsewhere
        self.videos = videos  # (B, L) video of each video frame's token, -1 elsewhere; None: not known
        self.grid_widths = grid_widths  # (B, L) tokens per grid row of each vision token's group; None: not known
        self.last = last  # (B,) original index of the last real token
        self.keeps = keeps  # stage layer -> (B,) keep ratios of an input-dependent schedule
        self.signals = signals  # vision-tower signal -> values in placeholder order
        self.signal_full: dict = {}  # vision-tower signal -> (B, L) over the full sequence
        self.idx: Optional[torch.Tensor] = None  # (B, S) original indices of the current tokens; None: all
        self.alive: Optional[torch.Tensor] = None  # (B, S) False on filler slots
        self.full: Optional[dict] = None  # full-length layer kwargs captured at layer 0
        self.cur: Optional[dict] = None  # gathered layer kwargs for the current idx
        self.prev_hidden: Optional[torch.Tensor] = None
        self.prev_output: Optional[torch.Tensor] = None  # output of the layer before a variation stage
        self.embeddings: Optional[torch.Tensor] = None
        self.capture: dict = {}  # layer -> {"q": ..., "k": ...}
        self.probe_queries: dict = {}  # drop layer -> (B, Q) query indices at layer - 1
        self.counts: dict = {}  # layer -> (B,) vision tokens from that layer on
        self.kept: dict = {}  # layer -> per-sample kept vision positions
        self.slots: dict = {}  # layer -> per-sample summary-token positions
        self.cache: Any = None
        self.cache_meta: Optional[CacheMeta] = None
        self._layer_meta: Optional[LayerMeta] = None  # shared by the compacted layers of the last stage
        self.position_shift: Optional[torch.Tensor] = None  # (B,) positions removed by a renumbering input stage
        self.markers: Optional[torch.Tensor] = None  # (B, L) row-end tokens (image_newline) under a keep/rows policy
        self.rows: Optional[torch.Tensor] = None  # (B, L) grid row of every token

    # ------------------------------------------------------------------ hooks' entry points

    def layer(self, i: int, module, args, kwargs):
        """Decoder layer ``i`` is about to run: drop at a stage, then hand it the gathered kwargs."""
        h = self.handle
        hidden = args[0] if args else kwargs["hidden_states"]
        if i == 0:
            self.cache = forward_cache(kwargs)
            self.full = {k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")}
            if h._decode_stages and self.cache is not None:
                self._cache_meta()  # decode stages need the metadata even if the prefill drops nothing
            if h.recipe.newlines != "candidate":
                self.markers = h.adapter.row_markers(h.model, hidden, self.is_vision)
                if self.markers is not None:
                    # a token's grid row: the markers before it (a marker ends its own row)
                    self.rows = torch.cumsum(self.markers.long(), 1) - self.markers.long()
            if any(s.scorer.needs_embeddings for s in h._stages):
                self.embeddings = hidden
        stage = h._stage_at.get(i)
        if stage is not None:
            if h.profile:
                t0 = _clock(hidden)
                hidden = self._drop(stage, module, hidden)
                h.overhead_s += _clock(hidden) - t0
            else:
                hidden = self._drop(stage, module, hidden)
        if self.idx is not None:
            kwargs = dict(kwargs)
            kwargs.update(self.cur)
            if self.cache_meta is not None:
                self.cache_meta.layers[i] = self._layer_meta
        nxt = h._stage_at.get(i + 1)
        if nxt is not None:
            if nxt.scorer.needs_prev_hidden:
                self.prev_hidden = hidden
            if nxt.scorer.attention == "previous" or nxt.scorer.needs_prev_keys:
                self.capture[i] = {}
            if nxt.scorer.attention == "previous":
                self.probe_queries[i + 1] = nxt.scorer.queries(self._view(i, hidden, nxt))
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def captured(self, layer_idx: int, name: str, output) -> None:
        """The ``q``/``k`` projection of layer ``layer_idx`` ran (only kept for a probed layer)."""
        if layer_idx in self.capture:
            self.capture[layer_idx][name] = output

    def layer_output(self, output) -> None:
        """The layer before a variation stage returned: its own output, before anything the model
        adds between layers (Qwen3-VL deepstack), which is not the layer's variation."""
        self.prev_output = output[0] if isinstance(output, tuple) else output

    def stats(self) -> Stats:
        """What this prefill did (see :class:`~tokencomp.stats.Stats`)."""
        B = self.is_vision.shape[0]
        per_layer, cur = [], self.is_vision.sum(1)
        for i in range(self.handle._num_layers):
            cur = self.counts.get(i, cur)
            per_layer.append(cur)
        table = torch.stack(per_layer, dim=1).tolist() if per_layer else [[] for _ in range(B)]
        out_pos = self.idx if self.idx is not None else torch.arange(self.length, device=self.is_vision.device).expand(B, -1)
        return Stats(
            table,
            [{layer: rows[b] for layer, rows in self.kept.items()} for b in range(B)],
            [{layer: rows[b] for layer, rows in self.slots.items()} for b in range(B)],
            out_pos,
            self.length,
            self.is_vision.sum(1).tolist(),
            self.valid.sum(1).tolist(),
        )

    # ------------------------------------------------------------------ the view plugins see

    def _index(self, hidden) -> torch.Tensor:
        """(B, S) original indices of the current tokens."""
        if self.idx is not None:
            return self.idx
        B, S = hidden.shape[:2]
        return torch.arange(S, device=hidden.device).expand(B, S)

    def _view(self, layer: int, hidden, stage: Stage, attention=None, prev=None, prev_out=None) -> LayerView:
        B, S = hidden.shape[:2]
        idx = self._index(hidden)
        alive = self.alive if self.alive is not None else torch.ones(B, S, dtype=torch.bool, device=hidden.device)
        is_vision = self.is_vision.gather(1, idx)
        # The last real token produces the next token: it is never a candidate, even when a
        # prompt ends with vision tokens.
        pinned = idx == self.last[:, None]
        valid = self.valid.gather(1, idx)
        emb = self.embeddings
        if emb is not None and self.idx is not None:
            emb = M.gather_seq(emb, idx, 1)
        if self.markers is not None:
            pinned = pinned | self.markers.gather(1, idx)  # row ends follow the recipe's newline policy
        return LayerView(
            layer=layer,
            hidden=hidden,
            vision_mask=is_vision & alive & ~pinned,
            text_mask=valid & ~is_vision,
            last_index=(idx <= self.last[:, None]).sum(1) - 1,
            positions=idx,
            groups=self.groups.gather(1, idx),
            videos=None if self.videos is None else self.videos.gather(1, idx),
            grid_widths=None if self.grid_widths is None else self.grid_widths.gather(1, idx),
            token_index=(torch.cumsum(self.valid.long(), 1) - 1).gather(1, idx),
            prev_hidden=prev,
            prev_output=prev_out if prev is not None else None,
            embeddings=emb,
            prompt_embeddings=self.embeddings,
            prompt_vision_mask=self.is_vision & self.valid if self.embeddings is not None else None,
            attention=attention,
            keep=stage.keep,
            signals=self._signal_view(idx, stage.scorer) if stage.scorer.signals else {},
        )

    def _signal_view(self, idx: torch.Tensor, scorer) -> dict:
        """The scorer's vision-tower signals as (B, S) tensors over the current tokens."""
        out = {}
        for name in scorer.signals:
            full = self.signal_full.get(name)
            if full is None:
                values = self.signals.get(name)
                if values is None:
                    raise UnsupportedModelError(
                        f"scorer {scorer.name!r}: the vision tower did not run in this forward, so signal {name!r} is "
                        "missing (an inputs_embeds-only call?)"
                    )
                n = int(self.is_vision.sum())
                if values.numel() != n:
                    raise UnsupportedModelError(f"signal {name!r} has {values.numel()} values for {n} vision tokens")
                full = torch.zeros(self.is_vision.shape, dtype=values.dtype, device=values.device)
                full[self.is_vision.to(values.device)] = values
                self.signal_full[name] = full
            out[name] = full.to(idx.device).gather(1, idx)
        return out

    def _prev_keys(self, stage: Stage, hidden) -> torch.Tensor:
        """Layer ``l - 1``'s keys of the current tokens as it caches them: its captured ``k_proj``
        output through its k-norm (if any) and RoPE, all KV heads concatenated (B, S, Hkv·d)."""
        got = self.capture.get(stage.layer - 1, {})
        if "k" not in got:
            raise UnsupportedModelError(f"key projection of layer {stage.layer - 1} was not captured")
        attn = self.handle._layers[stage.layer - 1].self_attn
        cos, sin = (self.cur or self.full)["position_embeddings"]
        B, S = hidden.shape[:2]
        if self.handle.adapter.renumber:
            # A rotated key's L1 norm depends on its absolute position, which padding shifts (and a
            # plain forward numbers left padding, generate does not): rotate as in the sample's
            # unpadded run, counting from its first real token. M-RoPE ids already are.
            pos = self.full.get("position_ids")
            pos = torch.arange(self.length, device=hidden.device)[None] if pos is None else pos
            pos = pos.expand(B, self.length)
            pos = (pos - pos.gather(1, self.valid.long().argmax(1)[:, None])).gather(1, self._index(hidden))
            cos, sin = self.handle.adapter.rotary(self.handle.model)(hidden, position_ids=pos)
        return layer_keys(attn, got["k"], cos, sin).reshape(B, S, -1)

    def _probe(self, stage: Stage, module, hidden) -> torch.Tensor:
        """Attention rows for ``stage``'s scorer, from layer ``l-1``'s captured projections or layer ``l``'s own."""
        cos, sin = (self.cur or self.full)["position_embeddings"]
        idx = self._index(hidden)
        key_valid = self.valid.gather(1, idx)
        if self.alive is not None:
            key_valid = key_valid & self.alive
        if stage.scorer.attention == "previous":
            got = self.capture.pop(stage.layer - 1, {})
            queries = self.probe_queries.pop(stage.layer)
            if "q" not in got or "k" not in got:
                raise UnsupportedModelError(f"attention projections of layer {stage.layer - 1} were not captured")
            q_rows = M.gather_seq(got["q"], queries.clamp(min=0), 1)
            attn = self.handle._layers[stage.layer - 1].self_attn
            return attention_rows(attn, q_rows, got["k"], cos, sin, queries, key_valid, **stage.scorer.attention_rows)
        queries = stage.scorer.queries(self._view(stage.layer, hidden, stage))
        normed = module.input_layernorm(hidden)
        attn = module.self_attn
        q_rows = attn.q_proj(M.gather_seq(normed, queries.clamp(min=0), 1))
        return attention_rows(attn, q_rows, attn.k_proj(normed), cos, sin, queries, key_valid, **stage.scorer.attention_rows)

    # ------------------------------------------------------------------ one stage

    def _drop(self, stage: Stage, module, hidden):
        B, S = hidden.shape[:2]
        dev = hidden.device
        keys = self._prev_keys(stage, hidden) if stage.scorer.needs_prev_keys and stage.layer > 0 else None
        attention = self._probe(stage, module, hidden) if stage.scorer.attention else None
        self.capture.pop(stage.layer - 1, None)
        view = self._view(stage.layer, hidden, stage, attention, self.prev_hidden, self.prev_output)
        extra = {}
        if keys is not None:
            extra["prev_keys"] = keys
        if stage.scorer.needs_final_norm:
            extra["final_normed"] = self.handle._decoder.norm(hidden)
        if extra:
            view = dataclasses.replace(view, **extra)
        self.prev_hidden = self.prev_output = None
        idx = self._index(hidden)
        is_vision_cur = self.is_vision.gather(1, idx)
        pinned = is_vision_cur & (idx == self.last[:, None])  # a vision token that ends the prompt
        cand = view.vision_mask.clone()  # the engine's own copy: plugins only see the view
        n = cand.sum(1)
        budget = kept_count(n, self.keeps.get(stage.layer, stage.keep))
        merger = stage.merger
        summary = torch.zeros_like(budget)
        if merger is not None:
            summary = torch.minimum(merger.summary_tokens(budget).clamp(min=0).to(budget), budget)
        versions = _versions(view)
        replay = self.handle._opt("replay")
        if replay is not None and stage.layer in replay[0]:
            kept = self._replayed(replay, stage.layer, idx, cand)
            scores = kept.float()
        elif bool(n.any()):
            scores = stage.scorer.score(view)
            _check_scores(scores, stage, (B, S), dev, cand)
            _check_untouched(view, versions, f"scorer {stage.scorer.name!r}")
            kept = stage.selector.select(scores, view, budget - summary)
            _check_selection(kept, stage, (B, S))
            _check_untouched(view, versions, f"selector {stage.selector.name!r}")
            kept = kept.to(dev) & cand
        else:
            scores = torch.zeros(B, S, device=dev)
            kept = torch.zeros_like(cand)
        slots = None
        if merger is not None and bool(n.any()):
            dropped = cand & ~kept
            summary = torch.minimum(summary, dropped.sum(1))
            hidden, slots = _merge(merger, stage, view, versions, kept, dropped, summary)
            kept = kept | slots
        markers = self._markers_kept(idx, kept) if self.markers is not None else torch.zeros_like(kept)
        stay = ~is_vision_cur | pinned | kept | markers
        # Ragged batch: short rows are filled with the next-best dropped vision tokens, marked dead.
        rank = torch.where(cand, scores.float(), torch.full_like(scores, -1e30, dtype=torch.float32))
        order, self.alive = compact(stay, is_vision_cur & ~stay, rank)
        self.idx = idx.gather(1, order)
        self._layer_meta = LayerMeta(self.idx, self.alive, has_dead=not bool(self.alive.all()))
        hidden = M.gather_seq(hidden, order, 1)
        if stage.renumber:
            self._renumber(hidden)
        self.counts[stage.layer] = kept.sum(1) + pinned.sum(1) + markers.sum(1)
        self.kept[stage.layer] = _rows(self.idx, self.alive & self.is_vision.gather(1, self.idx))
        if slots is not None:
            self.slots[stage.layer] = _rows(idx, slots)
        self._regather(hidden.dtype)
        if self.cache is not None:
            self._cache_meta()
            if stage.evict_earlier:
                self._evict_earlier(stage.layer)
        return hidden

    def _evict_earlier(self, layer: int) -> None:
        """Compact the caches of the layers before ``layer`` (already filled: they ran) to the tokens
        this stage kept, and give them its metadata, so decode steps treat them like the layers after."""
        groups: dict = {}
        for j in range(layer):
            if self.cache.layers[j].is_initialized:
                groups.setdefault(id(self.cache_meta.layers.get(j)), []).append(j)
        for members in groups.values():
            old = self.cache_meta.layers.get(members[0])
            # Where each kept token sits in these layers' cache: both index lists ascend per row, and
            # every token kept now was there before.
            order = self.idx if old is None else torch.searchsorted(old.idx.contiguous(), self.idx.contiguous())
            for j in members:
                keep_cached_rows(self.cache.layers[j], order, self.cache.layers[j].keys.shape[2])
                self.cache_meta.layers[j] = self._layer_meta

    def _cache_meta(self) -> None:
        """Put this prefill's metadata on the KV cache (once)."""
        meta = meta_of(self.cache)
        if meta is None or meta.owner() is not self.handle:
            meta = CacheMeta(weakref.ref(self.handle), self.length, {}, self.is_vision, self.valid, self.last)
            attach(self.cache, meta)
        meta.position_shift = self.position_shift
        self.cache_meta = meta

    def _markers_kept(self, idx, kept) -> torch.Tensor:
        """The live row-end tokens that stay: all (``keep``) or those of rows keeping a token (``rows``)."""
        markers = self.markers.gather(1, idx)
        if self.alive is not None:
            markers &= self.alive
        if self.handle.recipe.newlines == "keep":
            return markers
        rows = self.rows.gather(1, idx)
        per_row = torch.zeros(rows.shape[0], self.length + 1, dtype=torch.long, device=rows.device)
        per_row.scatter_add_(1, rows, kept.long())
        return markers & (per_row.gather(1, rows) > 0)

    def _replayed(self, replay, layer: int, idx, cand) -> torch.Tensor:
        """The selection recorded for ``layer`` (summary slots excluded: the merger makes them again)."""
        wanted, wanted_slots = replay[0][layer], replay[1].get(layer)
        kept = torch.zeros_like(cand)
        for b in range(cand.shape[0]):
            kept[b] = cand[b] & torch.isin(idx[b], wanted[b].to(cand.device))
            if wanted_slots is not None:
                kept[b] &= ~torch.isin(idx[b], wanted_slots[b].to(cand.device))
        return kept

    def _renumber(self, hidden) -> None:
        """Contiguous positions for the kept tokens: each loses one position per removed real token
        before it. The full-length tables are rewritten, so later gathers use the new numbering."""
        B, L = self.is_vision.shape
        present = torch.zeros(B, L, dtype=torch.bool, device=self.idx.device).scatter(1, self.idx, self.alive)
        removed = self.valid & ~present
        shift = torch.cumsum(removed.long(), 1)
        pos = self.full["position_ids"]
        if pos is None:
            pos = torch.arange(L, device=shift.device).expand(B, L)
        pos = pos.expand(B, L) - shift
        self.full = dict(self.full, position_ids=pos)
        self.full["position_embeddings"] = self.handle.adapter.rotary(self.handle.model)(hidden, position_ids=pos)
        self.position_shift = shift[:, -1]

    def _regather(self, dtype) -> None:
        full, idx, kind = self.full, self.idx, self.handle._kind
        cos, sin = full["position_embeddings"]
        self.cur = {
            "attention_mask": M.gather_prefill_mask(
                full["attention_mask"], idx, self.alive, kind, dtype, has_dead=self._layer_meta.has_dead
            ),
            "position_embeddings": (M.gather_seq(cos, idx, 1), M.gather_seq(sin, idx, 1)),
            # FlashAttention reads gapped position ids as packed sequences when B == 1; RoPE is
            # already in position_embeddings, so flash layers get none after a drop.
            "position_ids": None if kind == M.FLASH else M.gather_positions(full["position_ids"], idx),
        }


def _rows(values: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per row, ``values[b][mask[b]]``, with two host synchronisations whatever the batch size."""
    return list(torch.split(values[mask], mask.sum(1).tolist()))


# ---------------------------------------------------------------------- plugin contracts


def _versions(view: LayerView) -> dict[str, int]:
    """In-place version counters of the view's tensors (to detect a plugin writing into them).
    Tensors made under ``torch.inference_mode()`` have no counter and are not checked."""
    return {
        f.name: v._version
        for f in dataclasses.fields(view)
        if isinstance(v := getattr(view, f.name), torch.Tensor) and not v.is_inference()
    }


def _check_untouched(view: LayerView, versions: dict[str, int], who: str) -> None:
    for name, version in versions.items():
        if getattr(view, name)._version != version:
            raise PluginError(f"{who} at layer {view.layer} modified view.{name} in place; plugins must treat the view as read-only")


def _check_scores(scores, stage: Stage, shape: tuple, device, cand: torch.Tensor) -> None:
    """A scorer's output: a (B, S) real tensor on the hidden states' device, no NaN on candidates.
    ±inf are valid scores (certainly keep / certainly drop); NaN has no order and is an error."""
    who = f"scorer {stage.scorer.name!r} at layer {stage.layer}"
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise PluginError(f"{who} returned {got}; expected a (B, S) = {shape} tensor")
    if scores.device != device:
        raise PluginError(f"{who} returned scores on {scores.device}; the hidden states are on {device}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise PluginError(f"{who} returned {scores.dtype} scores; expected real numbers")
    if scores.is_floating_point() and bool((torch.isnan(scores) & cand).any()):
        raise PluginError(f"{who} returned NaN scores for live vision tokens")


def _check_selection(kept, stage: Stage, shape: tuple) -> None:
    if not isinstance(kept, torch.Tensor) or tuple(kept.shape) != shape or kept.dtype != torch.bool:
        got = f"{tuple(kept.shape)} {kept.dtype}" if isinstance(kept, torch.Tensor) else type(kept).__name__
        raise PluginError(
            f"selector {stage.selector.name!r} at layer {stage.layer} returned {got}; expected a (B, S) = {shape} bool tensor"
        )


def _merge(merger, stage: Stage, view: LayerView, versions, kept, dropped, summary):
    """Run ``merger`` and hold it to its contract (see :class:`tokencomp.Merger`)."""
    who = f"merger {merger.name!r} at layer {stage.layer}"
    out = merger.merge(view, kept.clone(), dropped.clone(), summary.clone())
    _check_untouched(view, versions, who)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise PluginError(f"{who} must return a (hidden, slots) pair of tensors; got {type(out).__name__}")
    hidden, slots = out
    if hidden.shape != view.hidden.shape or hidden.dtype != view.hidden.dtype or hidden.device != view.hidden.device:
        raise PluginError(
            f"{who} returned hidden states {tuple(hidden.shape)} {hidden.dtype}; expected {tuple(view.hidden.shape)} {view.hidden.dtype}"
        )
    if slots.shape != kept.shape or slots.dtype != torch.bool:
        raise PluginError(f"{who} returned slots {tuple(slots.shape)} {slots.dtype}; expected a {tuple(kept.shape)} bool tensor")
    if bool((slots & ~dropped).any()) or not torch.equal(slots.sum(1), summary):
        raise PluginError(f"{who} must put exactly {summary.tolist()} summary tokens in dropped slots; got {slots.sum(1).tolist()}")
    return hidden, slots


def _clock(tensor: torch.Tensor) -> float:
    """Wall time after the device has finished queued work (only used when profiling)."""
    import time

    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()
