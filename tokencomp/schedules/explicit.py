"""Explicit stages, exactly as written in the recipe (``schedule: {stages: [...]}``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import tokencomp
from tokencomp.interfaces import Schedule, Stage


@dataclass(frozen=True)
class ExplicitSchedule(Schedule):
    """The stages listed in the recipe: ``{layer | phase: input, keep[, scorer][, selector][, merge]}`` each."""

    name = "explicit"

    stages_: tuple[Stage, ...] = field(default=(), metadata={"recipe_key": "stages"})

    def __post_init__(self):
        if not self.stages_:
            raise ValueError("an explicit schedule needs at least one stage under `stages:`")

    def stages(self, num_layers: int):
        return list(self.stages_)


@tokencomp.hookimpl
def register_schedules(register):
    register(ExplicitSchedule)
