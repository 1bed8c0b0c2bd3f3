"""Budget solver: "retain N vision tokens on average over the decoder layers" → per-stage keep ratios.

This is what the papers mean by 192/128/64 tokens for progressive methods: ``N̄ = (1/L) Σ_l n_l``.
The solver puts the stages at depth fractions and finds one keep ratio ``r`` shared by every stage
but the last (whose keep is ``final``, 0 by default), by bisection: ``N̄`` grows with ``r``.
At run time the ratios are solved again for each sample's actual vision-token count, so
``tokens: 192`` means 192 on a 576-token image and on a 2880-token one alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import tokencomp
from tokencomp.accounting import average_tokens
from tokencomp.interfaces import Schedule, Stage
from tokencomp.schedules.depth_scaled import check_fractions, scale_layers


def solve_keep(target: float, layers: list[int], num_layers: int, n: int, final: float = 0.0) -> float:
    """Shared keep ratio ``r`` (stages ``[r, …, r, final]``) whose average token count is closest to
    ``target`` from below or equal; 1.0 if even ``r = 1`` cannot reach it."""

    def avg(r: float) -> float:
        keeps = [r] * (len(layers) - 1) + [final]
        return average_tokens([Stage(layer, k) for layer, k in zip(layers, keeps)], num_layers, n)

    if avg(1.0) <= target:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if avg(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class BudgetSchedule(Schedule):
    """Stages at depth fractions with keep ratios solved so N vision tokens remain on average."""

    name = "budget"

    tokens: float = 192.0
    """Target average vision tokens per decoder layer, for every input (more than it has: keep all)."""
    vision_tokens: int = 576
    """Vision-token count the static description (``validate``, ``describe``) is solved for; at run
    time each sample's own count is used."""
    depth: tuple[float, ...] = (3 / 32, 17 / 32, 22 / 32)
    """Drop layers as depth fractions (V²Drop's 3/17/22 of 32 by default)."""
    final: float = 0.0
    """Keep ratio of the last stage (0 drops every remaining vision token)."""

    def __post_init__(self):
        if not self.tokens >= 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")
        if not self.vision_tokens >= 1:
            raise ValueError(f"vision_tokens must be >= 1, got {self.vision_tokens}")
        if not self.depth:
            raise ValueError("depth needs at least one drop layer fraction")
        check_fractions([self.final], self.depth)

    def stages(self, num_layers: int):
        layers = scale_layers(self.depth, num_layers)
        return [Stage(layer, k) for layer, k in zip(layers, self.keeps_for(num_layers, self.vision_tokens))]

    def keeps_for(self, num_layers: int, vision_tokens: int) -> list[float]:
        layers = scale_layers(self.depth, num_layers)
        r = solve_keep(self.tokens, layers, num_layers, vision_tokens, self.final)
        return [r] * (len(layers) - 1) + [self.final]


@tokencomp.hookimpl
def register_schedules(register):
    register(BudgetSchedule)
