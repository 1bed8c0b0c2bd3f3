"""Pure functions that gather attention masks, rotary tables and positions for a compacted sequence,
and that find the runs of a token mask (:func:`token_runs`, for model adapters).

Three mask kinds reach the decoder layers of transformers 5.x: a 4-D mask (bool for SDPA, additive
float for eager), a 2-D ``(B, KV)`` padding mask for FlashAttention, or ``None`` (causal, no
padding). Compaction keeps *original* positions, so everything is gathered, never rebuilt.

``alive`` marks real tokens of the compacted sequence; ``False`` marks filler slots that keep a
ragged batch rectangular. Filler slots are hidden as keys from every other token (each still sees
itself so that no attention row is empty, which would give NaN under SDPA).
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import UnsupportedModelError

EAGER, SDPA, FLASH = "eager", "sdpa", "flash"


def mask_kind(attn_implementation: str) -> str:
    """Map a transformers attention implementation name to the mask kind it uses."""
    name = attn_implementation or "eager"
    if "flash" in name:
        return FLASH
    if "sdpa" in name:
        return SDPA
    if name == "eager":
        return EAGER
    raise UnsupportedModelError(f"attention implementation {name!r} is not supported by tokencomp (use eager, sdpa or flash_attention_2)")


def gather_seq(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather ``x`` along ``dim`` with per-sample indices ``idx`` (B, S); a batch dim of 1 broadcasts."""
    B = idx.shape[0]
    if x.shape[0] != B:
        x = x.expand(B, *x.shape[1:])
    shape = [1] * x.ndim
    shape[0], shape[dim] = B, idx.shape[1]
    index = idx.view(shape).expand(*[idx.shape[1] if d == dim else s for d, s in enumerate(x.shape)])
    return x.gather(dim, index)


def gather_positions(position_ids: Optional[torch.Tensor], idx: torch.Tensor) -> Optional[torch.Tensor]:
    """Gather ``(B, L)`` or ``(R, B, L)`` position ids to the kept tokens (original positions stay)."""
    if position_ids is None:
        return None
    if position_ids.ndim == 3:
        return torch.stack([gather_seq(p, idx, 1) for p in position_ids])
    return gather_seq(position_ids, idx, 1)


def _hide_dead(mask: torch.Tensor, dead_cols: torch.Tensor, self_cols: Optional[torch.Tensor]) -> torch.Tensor:
    """Hide ``dead_cols`` (B, KV) as keys in a 4-D mask, except on each dead slot's own row."""
    hide = dead_cols[:, None, None, :].expand(mask.shape[0], 1, mask.shape[2], mask.shape[3])
    if self_cols is not None:
        hide = hide & ~self_cols
    if mask.dtype == torch.bool:
        return mask & ~hide
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min)


def causal_mask(kind: str, q_len: int, kv_len: int, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh causal mask (queries are the last ``q_len`` of ``kv_len`` keys) in the layout of ``kind``."""
    if kind == FLASH:
        return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    allowed = (torch.arange(kv_len, device=device)[None, :] <= q)[None, None].expand(batch, 1, q_len, kv_len)
    if kind == SDPA:
        return allowed.clone()
    out = torch.zeros(batch, 1, q_len, kv_len, dtype=dtype, device=device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def gather_prefill_mask(
    mask: Optional[torch.Tensor],
    idx: torch.Tensor,
    alive: torch.Tensor,
    kind: str,
    dtype: torch.dtype,
    has_dead: Optional[bool] = None,
) -> Optional[torch.Tensor]:
    """The prefill mask of the compacted sequence: rows and columns of the full mask at ``idx``.

    ``mask`` is the full-length mask the model built (4-D, 2-D or None); ``idx`` (B, S) are the kept
    tokens' original indices, ascending; ``alive`` (B, S) is False on filler slots.
    """
    B, S = idx.shape
    if has_dead is None:
        has_dead = not bool(alive.all())
    if mask is None:
        if not has_dead:
            return None  # still causal and rectangular: the kernel's is_causal path stays valid
        mask = causal_mask(kind, S, S, B, dtype, idx.device)
        compact = mask
    elif mask.ndim == 2:
        compact = gather_seq(mask, idx, 1)
    elif mask.ndim == 4:
        compact = gather_seq(gather_seq(mask, idx, 2), idx, 3)
    else:
        raise UnsupportedModelError(f"unsupported attention mask of shape {tuple(mask.shape)} (expected 2-D or 4-D)")
    if not has_dead:
        return compact
    if compact.ndim == 2:
        return compact * alive.to(compact.dtype) if compact.dtype != torch.bool else compact & alive
    eye = torch.eye(S, dtype=torch.bool, device=idx.device)[None, None]
    return _hide_dead(compact, ~alive, eye)


def remap_decode_mask(
    mask: Optional[torch.Tensor],
    idx: torch.Tensor,
    alive: torch.Tensor,
    prefill_len: int,
    kv_len: int,
    q_len: int,
    kind: str,
    dtype: torch.dtype,
    has_dead: Optional[bool] = None,
) -> Optional[torch.Tensor]:
    """The mask for one layer of a decode step after a compacted prefill.

    The model sizes its mask from the cache's logical length: the full ``prefill_len`` prefix plus
    the ``kv_len - prefill_len`` tokens added since; this layer's cache holds the ``idx`` (B, K)
    tokens of the prefix instead, then the same new tokens. Columns are picked accordingly.
    ``has_dead`` (whether ``alive`` has a False) may be given to save a host synchronisation.
    """
    if has_dead is None:
        has_dead = not bool(alive.all())
    if mask is None and not has_dead:
        return None  # causal, no padding, no filler: the kernel's own path stays valid
    B = idx.shape[0]
    tail = torch.arange(prefill_len, kv_len, device=idx.device).expand(B, -1)
    cols = torch.cat([idx, tail], dim=1)
    if mask is None:
        mask = causal_mask(kind, q_len, cols.shape[1], B, dtype, idx.device)
    elif mask.ndim == 2:
        mask = gather_seq(mask, cols, 1)
    elif mask.ndim == 4:
        mask = gather_seq(mask, cols, 3)
    else:
        raise UnsupportedModelError(f"unsupported attention mask of shape {tuple(mask.shape)} (expected 2-D or 4-D)")
    if not has_dead:
        return mask
    dead = torch.cat([~alive, torch.zeros_like(tail, dtype=torch.bool)], dim=1)
    if mask.ndim == 2:
        return mask & ~dead if mask.dtype == torch.bool else mask * (~dead).to(mask.dtype)
    return _hide_dead(mask, dead, None)


def hide_columns(mask: Optional[torch.Tensor], hide: torch.Tensor, kind: str, dtype: torch.dtype, q_len: int) -> torch.Tensor:
    """``mask`` with the key columns ``hide`` (B, KV) hidden from every query; a causal mask of the
    ``kind`` layout is built first when the model passed none."""
    B, KV = hide.shape
    if mask is None:
        mask = causal_mask(kind, q_len, KV, B, dtype, hide.device)
    if mask.ndim == 2:
        return mask & ~hide if mask.dtype == torch.bool else mask * (~hide).to(mask.dtype)
    return _hide_dead(mask, hide, None)


def token_runs(mask: torch.Tensor, ids: Optional[torch.Tensor] = None) -> list[tuple[int, int, Optional[int]]]:
    """``(start, end, token)`` of each run of True in the 1-D ``mask``; with ``ids`` a run also ends
    where the token id changes (an image placeholder run may touch a video run)."""
    flags = mask.tolist()
    toks = ids.tolist() if ids is not None else [None] * len(flags)
    out, pos, L = [], 0, len(flags)
    while pos < L:
        if not flags[pos]:
            pos += 1
            continue
        end = pos
        while end < L and flags[end] and toks[end] == toks[pos]:
            end += 1
        out.append((pos, end, toks[pos]))
        pos = end
    return out
