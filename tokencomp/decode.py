"""Decoding after a compressed prefill: the metadata a compacted KV cache carries, the cache class
that keeps it consistent, and the per-step object that picks each layer's mask columns."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from . import masks as M
from .errors import UsageError

META_ATTR = "_tokencomp_meta"
"""Attribute of a compacted cache that holds its :class:`CacheMeta`."""


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

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for meta in {id(m): m for m in self.layers.values()}.values():  # once per stage
            meta.idx = meta.idx.index_select(0, beam_idx.to(meta.idx.device))
            meta.alive = meta.alive.index_select(0, beam_idx.to(meta.alive.device))


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
    """One decode step on a compacted cache: each compacted layer attends to its own kept prefix
    plus the tokens added since, so its mask columns are picked from the model's full-length mask.
    The mask is built once per stage per step (the layers of a stage share it) and without host
    synchronisation."""

    mode = "decode"

    def __init__(self, meta: CacheMeta, kind: str):
        self.cache_meta = meta
        self.kind = kind
        self._masks: dict[int, Optional[torch.Tensor]] = {}  # id(LayerMeta) -> this step's mask

    def layer(self, i: int, module, args, kwargs):
        meta = self.cache_meta.layers.get(i)
        if meta is None:
            return None
        mask = kwargs.get("attention_mask")
        key = id(meta)
        if key not in self._masks:
            hidden = args[0] if args else kwargs["hidden_states"]
            q_len = hidden.shape[1]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            prefill_len = self.cache_meta.prefill_len
            kv_len = cache.layers[i].get_seq_length() - meta.idx.shape[1] + prefill_len + q_len
            self._masks[key] = M.remap_decode_mask(
                mask, meta.idx, meta.alive, prefill_len, kv_len, q_len, self.kind, hidden.dtype, has_dead=meta.has_dead
            )
        new = self._masks[key]
        if new is mask:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = new
        return args, kwargs
