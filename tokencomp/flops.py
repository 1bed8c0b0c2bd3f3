"""Analytic cost model of a decoder-only transformer (what a token schedule can save at most).

Per decoder layer processing ``n`` new tokens against ``c`` cached ones (multiply-add = 2 FLOPs):

* projections: ``2·n·D·(H·d) + 2·2·n·D·(Hkv·d) + 2·n·(H·d)·D``  (q, k and v, o)
* gated MLP:   ``3 · 2·n·D·I``
* attention:   ``2 · 2·H·d · Σ_{i=1..n} (c + i)``  (QKᵀ and AV, causal: query ``i`` sees ``c + i`` keys)

Embedding, final norm, LM head and the vision tower are left out: they are the same with and
without compression. KV-cache bytes: ``Σ_l 2·Hkv·d·n_l·bytes_per_element``.

How exact it is:

* **projections and MLP: exact** — every multiply-add of the dense matrix products is counted, and
  they scale linearly with the tokens a layer processes;
* **attention: the causal triangle** — query ``i`` is charged for the ``c + i`` keys it may see,
  i.e. ``n·c + n(n+1)/2`` query-key pairs, not the ``n·(c + n)`` square. That is the arithmetic a
  causal kernel must do. Kernels that skip fully masked tiles (FlashAttention-2, the flash kernels
  behind PyTorch SDPA with ``is_causal``) come close to it, up to their tile size; eager attention
  and SDPA's math fallback compute the whole square and mask it, about twice the counted work;
* **left out**: softmax, RMSNorm, RoPE, residual adds and the MLP activation (element-wise,
  ``O(n·D)`` or ``O(H·n²)`` without a ``d`` factor), and the fixed per-layer cost of launching the
  kernels, which does not shrink with the token count (it dominates decode steps and short
  prefills on a CPU). Time ÷ FLOP ratios above 1 at small token counts come from these.

``tokencomp bench`` also measures the *physical limit* of a token schedule (the bare decoder layers
fed exactly the schedule's tokens, see :func:`tokencomp.bench.limit_prefill`), which carries the same
fixed costs: ``tokencomp ÷ limit`` is the overhead of the method itself, ``limit ÷ FLOPs`` what the
hardware makes of the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class DecoderShape:
    """The dimensions the cost model needs."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int

    @classmethod
    def from_config(cls, cfg) -> "DecoderShape":
        """Read the shape from a (text) config."""
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.hidden_size, heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim, cfg.intermediate_size, cfg.num_hidden_layers)


def layer_flops(shape: DecoderShape, new: int, cached: int = 0) -> int:
    """FLOPs of one layer for ``new`` tokens attending to ``cached`` earlier ones plus themselves."""
    D, H, Hkv, d, I = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate
    proj = 2 * new * D * H * d * 2 + 2 * 2 * new * D * Hkv * d
    mlp = 3 * 2 * new * D * I
    keys = new * cached + new * (new + 1) // 2
    attn = 2 * 2 * H * d * keys
    return proj + mlp + attn


def prefill_flops(shape: DecoderShape, tokens_per_layer: Sequence[int]) -> int:
    """FLOPs of a prefill where layer ``l`` processes ``tokens_per_layer[l]`` tokens."""
    return sum(layer_flops(shape, n) for n in tokens_per_layer)


def prefill_flops_compared(
    shape: DecoderShape, real_tokens: int, vision_in: int, vision_per_layer: Sequence[int]
) -> tuple[int, int]:
    """``(untouched, compressed)`` prefill FLOPs of one prompt of ``real_tokens`` tokens, ``vision_in``
    of them vision tokens, when ``vision_per_layer[l]`` vision tokens enter layer ``l`` (from
    :class:`~tokencomp.stats.Stats`: ``real_tokens``, ``input_vision_tokens``, ``vision_tokens_per_layer``).
    The one place a prefill's saving is counted (input stages included: layer 0 may be reduced too)."""
    text = real_tokens - vision_in
    untouched = prefill_flops(shape, [real_tokens] * len(vision_per_layer))
    return untouched, prefill_flops(shape, [text + v for v in vision_per_layer])


def decode_flops(shape: DecoderShape, cache_per_layer: Sequence[int], steps: int) -> int:
    """FLOPs of ``steps`` decode steps after a prefill that left ``cache_per_layer[l]`` tokens cached."""
    return sum(layer_flops(shape, 1, c + t) for c in cache_per_layer for t in range(steps))


def kv_cache_bytes(shape: DecoderShape, cache_per_layer: Sequence[int], bytes_per_element: int) -> int:
    """Bytes of keys and values held for ``cache_per_layer[l]`` tokens in each layer."""
    return sum(2 * shape.kv_heads * shape.head_dim * n * bytes_per_element for n in cache_per_layer)
