"""Attention rows for a few query tokens, computed from a layer's own projections.

Attention-based scorers need ``softmax(q_i · Kᵀ · scale + mask)`` for a
handful of query rows only. Computing those rows from the layer's q/k projections (after its q/k
norm and RoPE, grouped over GQA heads without repeating K) costs ``O(B·H·Q·S·d)`` and never builds
the ``S × S`` matrix, so the forward pass itself keeps running on SDPA or FlashAttention.
"""

from __future__ import annotations

import torch

from .errors import PluginError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim (the RoPE convention of Llama / Qwen in transformers)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def layer_keys(attn: torch.nn.Module, k_proj_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rope: bool = True) -> torch.Tensor:
    """``(B, S, Hkv, d)`` keys of a layer from its ``k_proj`` output (B, S, Hkv·d): through its per-head
    k-norm (Qwen3) and, with ``rope``, rotated by ``cos``/``sin`` (B|1, S, d): as the layer caches them."""
    B, S = k_proj_out.shape[:2]
    d = getattr(attn, "head_dim", None) or cos.shape[-1]
    k = k_proj_out.view(B, S, -1, d)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    if rope:
        k = k * cos.expand(B, -1, -1)[:, :, None] + rotate_half(k) * sin.expand(B, -1, -1)[:, :, None]
    return k


def attention_rows(
    attn: torch.nn.Module,
    q_proj_rows: torch.Tensor,
    k_proj_out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_index: torch.Tensor,
    key_valid: torch.Tensor,
    *,
    rope: bool = True,
    causal: bool = True,
    heads: str = "mean",
) -> torch.Tensor:
    """Attention probabilities ``(B, Q, S)`` of the query rows ``query_index``, averaged over heads
    (or their maximum: ``heads="max"``).

    ``q_proj_rows`` (B, Q, H·d) and ``k_proj_out`` (B, S, Hkv·d) are the outputs of ``attn.q_proj``
    and ``attn.k_proj``; ``cos``/``sin`` (B|1, S, d) are the layer's rotary tables; ``query_index``
    (B, Q) the rows' positions in the sequence (``-1``: padding row, returned as zeros);
    ``key_valid`` (B, S) the keys any query may see (real, live tokens). As the layer attends by
    default: after RoPE, causal, and the mean over heads; ``rope=False`` / ``causal=False`` /
    ``heads="max"`` give the rows some methods' own code computes instead (PruneVid: from the
    un-rotated q/k, over every key, the maximum over heads).
    """
    B, Q = query_index.shape
    d = getattr(attn, "head_dim", None) or cos.shape[-1]
    q = q_proj_rows.view(B, Q, -1, d)
    # Qwen3-style per-head q/k norm happens before RoPE, as in the attention module itself.
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    k = layer_keys(attn, k_proj_out, cos, sin, rope=rope)
    S = k.shape[1]
    if rope:
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        rows = query_index.clamp(min=0)
        cq = cos.gather(1, rows[..., None].expand(-1, -1, cos.shape[-1]))[:, :, None]
        sq = sin.gather(1, rows[..., None].expand(-1, -1, sin.shape[-1]))[:, :, None]
        q = q * cq + rotate_half(q) * sq
    H, Hkv = q.shape[2], k.shape[2]
    q = q.view(B, Q, Hkv, H // Hkv, d)
    scale = getattr(attn, "scaling", d**-0.5)
    logits = torch.einsum("bqngd,bsnd->bngqs", q.float(), k.float()) * scale
    allowed = key_valid[:, None, :].expand(B, Q, S)
    if causal:
        allowed = allowed & (torch.arange(S, device=rows.device)[None, None, :] <= rows[..., None])
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if heads == "mean":
        probs = probs.mean(dim=(1, 2))
    elif heads == "max":
        probs = probs.amax(dim=(1, 2))
    else:
        raise PluginError(f"attention rows: heads must be 'mean' or 'max', got {heads!r} (a scorer's attention_rows)")
    return torch.where((query_index >= 0)[..., None], probs, torch.zeros_like(probs))


def cached_attention_row(
    attn: torch.nn.Module,
    q_proj_out: torch.Tensor,
    cached_keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged attention probabilities ``(B, KV)`` of the *last* query of a decode step over a
    layer's cached keys (already normed and rotated, as the cache stores them).

    ``q_proj_out`` (B, Q, H·d): the layer's ``q_proj`` output for this step; ``cos``/``sin``
    (B|1, Q, d): this step's rotary tables; ``allowed`` (B, KV): the keys it may see.
    """
    B, Q = q_proj_out.shape[:2]
    Hkv, KV, d = cached_keys.shape[1], cached_keys.shape[2], cached_keys.shape[3]
    q = q_proj_out[:, -1:].view(B, 1, -1, d)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    c, s = cos.expand(B, -1, -1)[:, -1:, None], sin.expand(B, -1, -1)[:, -1:, None]
    q = (q * c + rotate_half(q) * s)[:, 0]  # (B, H, d)
    H = q.shape[1]
    q = q.view(B, Hkv, H // Hkv, d)
    scale = getattr(attn, "scaling", d**-0.5)
    logits = torch.einsum("bngd,bnkd->bngk", q.float(), cached_keys.float()) * scale
    logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=(1, 2))
