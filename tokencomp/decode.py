"""Decoding after a compressed prefill: the metadata a compacted KV cache carries, the cache class
that keeps it consistent, and the per-step object that picks each layer's mask columns."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import masks as M
from .accounting import kept_count
from .compaction import compact
from .errors import UsageError
from .probes import cached_attention_row
from .ranking import best_mask

META_ATTR = "_tokencomp_meta"
"""Attribute of a compacted cache that holds its :class:`CacheMeta`."""


def forward_cache(kwargs: dict):
    """The KV cache a model forward was given: ``past_key_values=``, or ``cache=`` (some models' inner
    calls). The one cache-keyword lookup (engine, prefill, decode and integrations use it)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


@dataclass
class LayerMeta:
    """What a decode step needs to know about the compacted layers of one stage: kept original
    indices, live slots, and whether any slot is dead (known at the prefill: no host sync per step).
    All layers of a stage share one object."""

    idx: torch.Tensor
    alive: torch.Tensor
    has_dead: bool


@dataclass
class CacheMeta:
    """Metadata stored on the cache object after a compressed prefill (reordered with beam search)."""

    owner: "weakref.ref"  # the Handle that compacted the cache (weak: the cache must not keep it alive)
    prefill_len: int
    layers: dict[int, LayerMeta]
    is_vision: torch.Tensor  # (B, prefill_len) vision tokens of the prompt
    valid: torch.Tensor  # (B, prefill_len) real (non-padding) tokens of the prompt
    last: torch.Tensor  # (B,) index of each prompt's last real token (never hidden)
    budgets: dict = field(default_factory=dict)  # evicting decode stage layer -> (B,) tokens it keeps
    position_shift: Optional[torch.Tensor] = None  # (B,) positions a renumbering input stage removed

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for meta in {id(m): m for m in self.layers.values()}.values():  # once per stage
            meta.idx = meta.idx.index_select(0, beam_idx.to(meta.idx.device))
            meta.alive = meta.alive.index_select(0, beam_idx.to(meta.alive.device))
        for name in ("is_vision", "valid", "last"):
            t = getattr(self, name)
            setattr(self, name, t.index_select(0, beam_idx.to(t.device)))
        self.budgets = {k: v.index_select(0, beam_idx.to(v.device)) for k, v in self.budgets.items()}
        if self.position_shift is not None:
            self.position_shift = self.position_shift.index_select(0, beam_idx.to(self.position_shift.device))


def meta_of(cache) -> Optional[CacheMeta]:
    """The :class:`CacheMeta` of a compacted cache, else None."""
    meta = getattr(cache, META_ATTR, None) if cache is not None else None
    return meta if isinstance(meta, CacheMeta) else None


class CompactedCache:
    """Put in front of a cache's class after a compressed prefill: keeps our metadata in step with
    beam search, and refuses to decode once the handle that compacted it is gone (an unhooked model
    would otherwise fail deep inside attention, or silently read the wrong columns).

    A class, not patched instance methods: no reference cycle through the cache (it is freed as
    soon as its user drops it), and ``copy.deepcopy`` of the cache stays correct."""

    def update(self, *args, **kwargs):
        owner = self.__dict__[META_ATTR].owner()
        if owner is None or owner._removed:
            raise UsageError(
                "this KV cache was compacted by a tokencomp recipe that has since been removed; its layers hold "
                "different token counts. Finish generating before remove(), or start from a fresh cache"
            )
        return super().update(*args, **kwargs)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.__dict__[META_ATTR].reorder(beam_idx)

    # The model sizes masks and positions from layer 0's length. After an input stage layer 0 is
    # compacted too, so the cache reports every layer's *logical* length (tokens of the original
    # sequence plus those added since); the decode step picks each layer's mask columns from that.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._logical(layer_idx, super().get_seq_length(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        kv_length, offset = super().get_mask_sizes(query_length, layer_idx)
        return self._logical(layer_idx, kv_length - query_length) + query_length, offset

    def _logical(self, layer_idx: int, physical: int) -> int:
        meta = self.__dict__[META_ATTR]
        lm = meta.layers.get(layer_idx)
        if lm is None or physical == 0:
            return physical
        return physical - lm.idx.shape[1] + meta.prefill_len


def keep_cached_rows(entry, order: torch.Tensor, prefix: int) -> None:
    """Keep, of the first ``prefix`` rows of one cache layer's keys and values, the rows ``order``
    (B, K') in that order; the rows after the prefix (tokens added since) stay as they are."""
    gather = order[:, None, :, None].expand(-1, entry.keys.shape[1], -1, entry.keys.shape[-1])
    entry.keys = torch.cat([entry.keys[:, :, :prefix].gather(2, gather), entry.keys[:, :, prefix:]], dim=2)
    entry.values = torch.cat([entry.values[:, :, :prefix].gather(2, gather), entry.values[:, :, prefix:]], dim=2)


_compacted_classes: dict[type, type] = {}


def attach(cache, meta: CacheMeta) -> None:
    """Store ``meta`` on the cache and give it the :class:`CompactedCache` behaviour."""
    setattr(cache, META_ATTR, meta)
    cls = type(cache)
    if issubclass(cls, CompactedCache):
        return
    sub = _compacted_classes.get(cls)
    if sub is None:
        name = f"Compacted{cls.__name__}"
        sub = type(name, (CompactedCache, cls), {"__module__": __name__, "__qualname__": name})
        globals().setdefault(name, sub)  # picklable by name
        _compacted_classes[cls] = sub
    cache.__class__ = sub


class Decode:
    """One decode step on a compacted cache.

    Each compacted layer attends to its own kept prefix plus the tokens added since, so its mask
    columns are picked from the model's full-length mask, once per stage per step and without host
    synchronisation. Decode stages (``phase: decode``) then choose, from the new token's attention
    at layer ``l - 1``, which cached vision tokens layers ``l`` and later attend to: hidden for this
    step (``mask``) or removed from those layers' cache (``evict``)."""

    mode = "decode"

    def __init__(self, handle, meta: CacheMeta):
        self.handle = handle
        self.cache_meta = meta
        self.kind = handle._kind
        self._masks: dict = {}  # (id(LayerMeta), hidden-by) -> this step's mask
        self._q: dict[int, torch.Tensor] = {}  # layer -> this step's q projection (decode stages' probes)
        self._hidden: list = []  # (first layer, (B, total) original positions hidden from it on) this step

    def shift_positions(self, kwargs: dict) -> dict:
        """After a renumbering input stage, new tokens continue the renumbered positions."""
        shift = self.cache_meta.position_shift
        if shift is None:
            return kwargs
        pos = kwargs.get("position_ids")
        if pos is None:
            ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            start = forward_cache(kwargs).get_seq_length()  # logical length
            pos = torch.arange(start, start + ref.shape[1], device=shift.device).expand(ref.shape[0], -1)
        kwargs = dict(kwargs)
        kwargs["position_ids"] = pos - shift.to(pos.device)[:, None]
        return kwargs

    def captured(self, layer_idx: int, name: str, output) -> None:
        """A probed layer's q projection ran for this step's tokens."""
        if name == "q":
            self._q[layer_idx] = output

    def layer_output(self, output) -> None:
        """Not used while decoding."""

    def layer(self, i: int, module, args, kwargs):
        stage = self.handle._decode_at.get(i)
        if stage is not None:
            self._decode_stage(stage, kwargs)
        meta = self.cache_meta.layers.get(i)
        hidden_by = [h for first, h in self._hidden if first <= i]
        if meta is None and not hidden_by:
            return None
        mask = kwargs.get("attention_mask")
        key = (id(meta), len(hidden_by))
        if key not in self._masks:
            h = args[0] if args else kwargs["hidden_states"]
            cache = forward_cache(kwargs)
            new, cols = self._remapped(i, meta, mask, h, cache)
            for hide in hidden_by:
                hide = torch.nn.functional.pad(hide, (0, h.shape[1]))  # room for this step's tokens
                new = M.hide_columns(new, hide.gather(1, cols), self.kind, h.dtype, h.shape[1])
            self._masks[key] = new
        new = self._masks[key]
        if new is mask:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = new
        return args, kwargs

    def _columns(self, i: int, cache) -> torch.Tensor:
        """(B, KV) original position of every column of layer ``i``'s cache (before this step's tokens)."""
        meta, prefill_len = self.cache_meta.layers.get(i), self.cache_meta.prefill_len
        B = self.cache_meta.is_vision.shape[0]
        physical = cache.layers[i].keys.shape[-2] if cache.layers[i].is_initialized else 0
        dev = self.cache_meta.is_vision.device
        if meta is None:
            return torch.arange(physical, device=dev).expand(B, -1)
        tail = torch.arange(prefill_len, prefill_len + physical - meta.idx.shape[1], device=dev).expand(B, -1)
        return torch.cat([meta.idx, tail], dim=1)

    def _remapped(self, i: int, meta, mask, hidden, cache):
        """This step's mask for layer ``i`` before any decode-stage hiding, and its key columns'
        original positions (including this step's tokens)."""
        q_len = hidden.shape[1]
        cols = self._columns(i, cache)
        total = self.cache_meta.prefill_len + cols.shape[1] - (meta.idx.shape[1] if meta is not None else self.cache_meta.prefill_len)
        step = torch.arange(total, total + q_len, device=cols.device).expand(cols.shape[0], -1)
        if meta is None:
            return mask, torch.cat([cols, step], dim=1)
        kv_len = total + q_len
        new = M.remap_decode_mask(
            mask, meta.idx, meta.alive, self.cache_meta.prefill_len, kv_len, q_len, self.kind, hidden.dtype, has_dead=meta.has_dead
        )
        return new, torch.cat([cols, step], dim=1)

    def _decode_stage(self, stage, kwargs) -> None:
        """Rank the vision tokens cached in layer ``l`` by the new token's attention at layer ``l - 1``."""
        h, meta, l = self.handle, self.cache_meta, stage.layer
        cache = forward_cache(kwargs)
        q = self._q.pop(l - 1, None)
        if q is None or not cache.layers[l - 1].is_initialized:
            return
        cols_prev = self._columns(l - 1, cache)  # includes this step's tokens: layer l - 1 already ran
        B = cols_prev.shape[0]
        n_total = meta.prefill_len + (cols_prev.shape[1] - (meta.layers[l - 1].idx.shape[1] if l - 1 in meta.layers else meta.prefill_len))
        valid = torch.cat([meta.valid, torch.ones(B, n_total - meta.prefill_len, dtype=torch.bool, device=meta.valid.device)], 1)
        allowed = valid.gather(1, cols_prev)
        if l - 1 in meta.layers:
            lm = meta.layers[l - 1]
            allowed[:, : lm.idx.shape[1]] &= lm.alive
        cos, sin = kwargs["position_embeddings"]
        row = cached_attention_row(h._layers[l - 1].self_attn, q, cache.layers[l - 1].keys, cos, sin, allowed)  # (B, KV)
        scores = torch.zeros(B, n_total, dtype=row.dtype, device=row.device).scatter(1, cols_prev, row)
        # Candidates: vision tokens still attended to in layer l (the last prompt token never hidden).
        cols = self._columns(l, cache)
        vision = torch.cat([meta.is_vision, torch.zeros(B, n_total - meta.prefill_len, dtype=torch.bool, device=meta.is_vision.device)], 1)
        vision &= torch.arange(n_total, device=vision.device)[None] != meta.last[:, None]
        cand = vision.gather(1, cols)
        if l in meta.layers:
            cand[:, : meta.layers[l].idx.shape[1]] &= meta.layers[l].alive
        for first, hide in self._hidden:
            cand &= ~hide.gather(1, cols)
        n = cand.sum(1)
        if stage.decode == "evict":
            budget = meta.budgets.setdefault(l, kept_count(n, stage.keep))
        else:
            budget = kept_count(n, stage.keep)
        keep = best_mask(scores.gather(1, cols), cand, budget)
        hide_cols = cand & ~keep
        if stage.decode == "mask":
            hide = torch.zeros(B, n_total, dtype=torch.bool, device=cols.device)
            self._hidden.append((l, hide.scatter(1, cols, hide_cols)))
        else:
            self._evict(l, cache, cols, hide_cols)

    def _evict(self, l: int, cache, cols: torch.Tensor, hide_cols: torch.Tensor) -> None:
        """Remove the hidden prefix columns from the caches of layers ``l`` and later (shared per stage)."""
        meta = self.cache_meta
        hide = torch.zeros(cols.shape[0], int(cols.max()) + 1, dtype=torch.bool, device=cols.device).scatter(1, cols, hide_cols)
        groups: dict = {}
        for j in range(l, self.handle._num_layers):
            if cache.layers[j].is_initialized:
                groups.setdefault(id(meta.layers.get(j)), []).append(j)
        for members in groups.values():
            old = meta.layers.get(members[0])
            idx = old.idx if old is not None else torch.arange(meta.prefill_len, device=cols.device).expand(cols.shape[0], -1)
            alive = old.alive if old is not None else torch.ones_like(idx, dtype=torch.bool)
            gone = hide.gather(1, idx.clamp(max=hide.shape[1] - 1)) & alive
            stay = alive & ~gone
            order, new_alive = compact(stay, ~stay, torch.zeros(stay.shape, device=stay.device))
            shared = LayerMeta(idx.gather(1, order), new_alive, has_dead=not bool(new_alive.all()))
            for j in members:
                keep_cached_rows(cache.layers[j], order, idx.shape[1])
                meta.layers[j] = shared
