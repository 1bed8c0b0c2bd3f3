"""Hook specifications of the ``tokencomp`` plugin system.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`. Each hook receives a
``register`` callable and calls it with classes; the registry records which plugin provided each
class.

The ``register_*`` hooks run whenever a registry builds its table: on first use, again after every
plugin registered or unregistered, and once per :class:`tokencomp.plugins.PluginRegistry` (tests and
``plugins=`` callers build their own). They must only call ``register`` and have no side effects
(no global state, no I/O, nothing that must happen once): whatever they do is done again on every
rebuild. Built-in plugins use exactly these hooks (see ``tokencomp.plugins.BUILTIN_PACKAGES``).
A class's ``name`` must be unique per kind: a built-in name cannot be taken over, and only built-ins
may be marked ``default`` (see ``tokencomp.plugins``). Recipe parameters are the dataclass fields,
checked against their type hints and their ``min`` / ``max`` metadata (see
``tokencomp.recipe.build_plugin``).

Example::

    import tokencomp

    @tokencomp.hookimpl
    def register_scorers(register):
        register(MyScorer)
"""

from __future__ import annotations

import pluggy

PROJECT = "tokencomp"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_scorers(register):
    """Register :class:`tokencomp.Scorer` subclasses: ``register(cls)``."""


@hookspec
def register_selectors(register):
    """Register :class:`tokencomp.Selector` subclasses: ``register(cls)``."""


@hookspec
def register_schedules(register):
    """Register :class:`tokencomp.Schedule` subclasses: ``register(cls)``."""


@hookspec
def register_mergers(register):
    """Register :class:`tokencomp.Merger` subclasses: ``register(cls)``."""


@hookspec
def register_model_adapters(register):
    """Register :class:`tokencomp.ModelAdapter` subclasses: ``register(cls)``."""
