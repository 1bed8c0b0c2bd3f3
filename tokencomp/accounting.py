"""Token accounting shared by schedules, stats and benchmarks: vision tokens per layer for a schedule."""

from __future__ import annotations

from typing import Sequence

import torch


def tokens_per_layer(stages: Sequence, num_layers: int, n: int, min_keep: int = 0) -> list[int]:
    """Vision tokens entering each of ``num_layers`` layers when ``n`` enter layer 0 and each stage
    keeps ``floor(current * keep)`` (at least ``min_keep``, at most the current count)."""
    # Decode stages change what later tokens attend to, not what the prefill processes.
    by_layer = {s.layer: s.keep for s in stages if not getattr(s, "decode", None)}
    counts, cur = [], n
    for layer in range(num_layers):
        if layer in by_layer:
            cur = min(cur, max(min_keep, kept_count(cur, by_layer[layer])))
        counts.append(cur)
    return counts


def average_tokens(stages: Sequence, num_layers: int, n: int, min_keep: int = 0) -> float:
    """Mean over decoder layers of the vision tokens entering each (the papers' "retain N tokens")."""
    return sum(tokens_per_layer(stages, num_layers, n, min_keep)) / num_layers


def kept_count(n, keep):
    """``int(n * keep)`` exactly as the official method code computes it: the float64 product,
    truncated. Binary floating point shows through (``0.7 * 90 = 62.99…`` → 62, ``0.3 * 10`` → 3),
    which keeps paper reproductions at the same counts. ``n``: an int or a tensor of counts;
    ``keep``: a float, or a (B,) tensor of per-sample ratios."""
    if isinstance(n, int) and not isinstance(keep, torch.Tensor):
        return int(n * keep)
    n = torch.as_tensor(n)
    keep = keep.to(device=n.device, dtype=torch.float64) if isinstance(keep, torch.Tensor) else keep
    return torch.floor(n.double() * keep).long()
