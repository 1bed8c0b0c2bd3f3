"""The built-in plugin classes, by class name, for Python-first recipes::

    from tokencomp import methods
    recipe = tokencomp.Recipe.of(scorer=methods.SomeScorer(), stages=[(3, 0.5), (17, 0.3), (22, 0.0)])

(``sorted(methods.classes())`` lists the names; the README shows the usual ones.)

Generated from the plugin registry on first use (every built-in scorer, selector, merger and
schedule; a new built-in appears here by itself), so ``import tokencomp`` stays light: nothing of
this module's contents is imported until one of its names is asked for.
"""

from __future__ import annotations

KINDS = ("scorer", "selector", "merger", "schedule")
"""Plugin kinds exported here."""

_table: dict[str, type] | None = None


def classes() -> dict[str, type]:
    """Class name -> class of every built-in scorer, selector, merger and schedule."""
    global _table
    if _table is None:
        from .errors import PluginError
        from .plugins import registry

        reg, out = registry(), {}
        for kind in KINDS:
            for entry in reg.entries[kind].values():
                if not entry.builtin:
                    continue
                name = entry.cls.__name__
                if name in out and out[name] is not entry.cls:
                    raise PluginError(f"two built-in plugin classes are named {name}: {out[name]!r} and {entry.cls!r}")
                out[name] = entry.cls
        _table = dict(sorted(out.items()))
    return _table


def __getattr__(name: str):
    if name == "__all__":  # `from tokencomp.methods import *`
        return list(classes())
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return classes()[name]
    except KeyError:
        raise AttributeError(f"module 'tokencomp.methods' has no attribute {name!r}; built-in plugin classes: {', '.join(classes())}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(classes()))
