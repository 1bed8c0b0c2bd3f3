"""Token accounting shared by schedules, stats and benchmarks: vision tokens per layer for a schedule."""

from __future__ import annotations

from typing import Sequence

import torch


def tokens_per_layer(stages: Sequence, num_layers: int, n: int, min_keep: int = 0) -> list[int]:
    """Vision tokens entering each of ``num_layers`` layers when ``n`` enter layer 0 and each stage
    keeps ``floor(current * keep)`` (at least ``min_keep``, at most the current count)."""
    by_layer = {s.layer: s.keep for s in stages}
    counts, cur = [], n
    for layer in range(num_layers):
        if layer in by_layer:
            # A tiny epsilon keeps e.g. floor(576 * 0.3) == 172 despite binary floating point.
            cur = min(cur, max(min_keep, kept_count(cur, by_layer[layer])))
        counts.append(cur)
    return counts


def average_tokens(stages: Sequence, num_layers: int, n: int, min_keep: int = 0) -> float:
    """Mean over decoder layers of the vision tokens entering each (the papers' "retain N tokens")."""
    return sum(tokens_per_layer(stages, num_layers, n, min_keep)) / num_layers


def kept_count(n, keep: float):
    """``floor(n * keep)`` for a count or a tensor of counts, robust to binary rounding (0.3 * 10 → 3)."""
    if isinstance(n, int):
        return int(n * keep + 1e-9)
    return torch.floor(n.double() * keep + 1e-9).long()
