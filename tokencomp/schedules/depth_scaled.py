"""V²Drop's three-stage schedule (shallow / middle / deep) scaled to the decoder's depth."""

from __future__ import annotations

from dataclasses import dataclass

import tokencomp
from tokencomp.interfaces import Schedule, Stage


def scale_layers(fractions, num_layers: int) -> list[int]:
    """Map depth fractions to layer indices ``round(f * num_layers)``, at least 1, strictly increasing."""
    layers, last = [], 0
    for f in fractions:
        layer = max(last + 1, int(f * num_layers + 0.5))
        layers.append(layer)
        last = layer
    return layers


def check_fractions(keep, depth) -> None:
    """Keep ratios in [0, 1]; depth fractions in (0, 1) and strictly increasing."""
    bad = [k for k in keep if not 0.0 <= k <= 1.0]
    if bad:
        raise ValueError(f"keep ratios must be in [0, 1], got {bad[0]}")
    if any(not 0.0 < f < 1.0 for f in depth) or any(b <= a for a, b in zip(depth, depth[1:])):
        raise ValueError(f"depth fractions must be in (0, 1) and strictly increasing, got {list(depth)}")


@dataclass(frozen=True)
class V2DropSchedule(Schedule):
    """Drop at a shallow, a middle and a deep layer placed by depth fraction (paper: 3/17/22 of 32)."""

    name = "v2drop"
    default = True

    keep: tuple[float, ...] = (0.5, 0.3, 0.0)
    """Keep ratio at each stage, relative to the tokens still present (paper's 192-token setting)."""
    depth: tuple[float, ...] = (3 / 32, 17 / 32, 22 / 32)
    """Drop layers as fractions of the decoder depth; LLaVA-1.5-7B's 32 layers give 3, 17, 22."""

    def __post_init__(self):
        if len(self.keep) != len(self.depth):
            raise ValueError(f"keep has {len(self.keep)} entries but depth has {len(self.depth)}; they must match")
        if not self.keep:
            raise ValueError("keep and depth need at least one stage")
        check_fractions(self.keep, self.depth)

    def stages(self, num_layers: int):
        return [Stage(layer, k) for layer, k in zip(scale_layers(self.depth, num_layers), self.keep)]


@tokencomp.hookimpl
def register_schedules(register):
    register(V2DropSchedule)
