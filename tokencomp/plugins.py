"""The plugin registry: which scorers, selectors, mergers, schedules and model adapters exist.

A :class:`PluginRegistry` is one pluggy plugin manager and the table (:class:`Registry`) built from
it, the way pytest builds a plugin manager per session. Built-in plugins (every module of
``BUILTIN_PACKAGES``) are registered by module path through the same hooks a third party uses;
third-party plugins are found through the ``tokencomp`` entry-point group, loaded lazily once per
registry. Set ``TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points (tests, debugging) or
``TOKENCOMP_LOAD_PLUGINS=name1,name2`` to load only those entry points.

:data:`DEFAULT` is the registry everything uses unless told otherwise; ``load_recipe(...,
plugins=r)`` and ``apply(..., plugins=r)`` use another one (``with r.use():`` for a whole block),
e.g. to try a plugin without registering it process-wide. The module functions (:func:`registry`,
:func:`register`, :func:`unregister`, ...) act on the registry in effect (:func:`current`).

A plugin that fails to import or raises while registering does not take the others down: the
failure is kept as a :class:`PluginError` naming the plugin and its distribution
(``registry().errors``), and using a name it would have provided says so.

Names are unique per kind. A third-party class that takes a built-in name is ignored (the built-in
keeps working) and reported as an error; two third-party classes with one name make the name
unusable, with an error naming both. Likewise only a built-in may be marked ``default``, so the
default recipe never depends on which plugins are installed.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pluggy

from . import hookspecs
from .errors import PluginError
from .interfaces import Merger, ModelAdapter, Schedule, Scorer, Selector

BUILTIN_PACKAGES = ("tokencomp.scorers", "tokencomp.selectors", "tokencomp.mergers", "tokencomp.schedules", "tokencomp.models")
"""Packages whose every module is a built-in plugin, registered like a third-party one."""


def builtin_plugins() -> list[str]:
    """Module paths of the plugins that ship with tokencomp (every module of BUILTIN_PACKAGES)."""
    import pkgutil

    out = []
    for pkg in BUILTIN_PACKAGES:
        path = importlib.import_module(pkg).__path__
        out += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(path) if not m.name.startswith("_")]
    return sorted(out)


KINDS: dict[str, tuple[str, type]] = {
    "scorer": ("register_scorers", Scorer),
    "selector": ("register_selectors", Selector),
    "merger": ("register_mergers", Merger),
    "schedule": ("register_schedules", Schedule),
    "model_adapter": ("register_model_adapters", ModelAdapter),
}
"""Plugin kinds: hook name and base class of each."""

@dataclass
class Entry:
    """One registered class and where it came from."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str
    builtin: bool = False

    def origin(self) -> str:
        """``plugin 'x' (distribution version)``, for messages."""
        dist = f"{self.distribution} {self.version}".strip()
        return f"plugin {self.plugin!r} {dist if dist.startswith('(') else f'({dist})'}"

    def as_dict(self) -> dict[str, str]:
        """JSON-friendly summary (used by ``tokencomp plugins --json``)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "summary": self.cls.summary(),
        }


@dataclass
class Registry:
    """Every registered class by kind and name, plus the errors met while building it."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    errors: list[PluginError] = field(default_factory=list)
    clashes: dict[tuple[str, str], PluginError] = field(default_factory=dict)

    def names(self, kind: str) -> list[str]:
        """Registered names of one kind, sorted."""
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> type:
        """The class registered as ``name``; :class:`PluginError` with suggestions if there is none."""
        if (kind, name) in self.clashes:
            raise self.clashes[(kind, name)]
        try:
            return self.entries[kind][name].cls
        except KeyError:
            raise PluginError(self.unknown_message(kind, name)) from None

    def default_name(self, kind: str) -> str:
        """Name of the registered ``kind`` plugin marked ``default = True`` (exactly one must be).

        Third-party classes marked default do not count (they are reported in ``errors``).
        """
        marked = [e for e in self.entries[kind].values() if getattr(e.cls, "default", False) and e.builtin]
        if len(marked) != 1:
            who = ", ".join(f"{e.name!r} ({e.plugin})" for e in marked) or "none"
            raise PluginError(f"exactly one {kind.replace('_', ' ')} must be marked default; found {who}")
        return marked[0].name

    def unknown_message(self, kind: str, name: str) -> str:
        """Message for an unknown name: close matches, the allowed names and any broken plugins."""
        names = self.names(kind)
        msg = f"unknown {kind.replace('_', ' ')} {name!r}"
        close = difflib.get_close_matches(str(name), names, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        msg += f"; registered: {', '.join(names) or 'none'}"
        if self.errors:
            msg += "; note: " + "; ".join(str(e) for e in self.errors)
        return msg

    def adapter_class(self, model_class: type) -> Optional[type]:
        """The adapter class whose ``model_classes`` name ``model_class`` or its nearest base class, or None."""
        for cname in (c.__name__ for c in model_class.__mro__):
            for entry in self.entries["model_adapter"].values():
                if cname in entry.cls.model_classes:
                    return entry.cls
        return None

    def supported_classes(self) -> list[str]:
        """Every model class name some adapter handles, sorted."""
        return sorted(c for e in self.entries["model_adapter"].values() for c in e.cls.model_classes)

    def adapter_for(self, model) -> ModelAdapter:
        """The model adapter of ``model`` (its class or a base class is in the adapter's ``model_classes``),
        built from the model's config."""
        cls = self.adapter_class(type(model))
        if cls is not None:
            return cls.from_config(model.config)
        from .errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"no tokencomp model adapter for {type(model).__name__}; supported classes: "
            f"{', '.join(self.supported_classes())}. To add one, write a ModelAdapter subclass and register it with a "
            "`register_model_adapters` hook in a plugin (see plugins/ in the tokencomp repository)."
        )


def _own_version() -> str:
    try:
        return importlib.metadata.version("tokencomp")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class PluginRegistry:
    """One plugin manager (built-ins, entry points, in-process plugins) and the :class:`Registry`
    table built from it on first use and again after every change.

    Independent instances share nothing: a plugin registered in one is unknown to the others. Pass
    one to ``load_recipe(..., plugins=...)`` / ``apply(..., plugins=...)``, or make it the one in
    effect for a block with :meth:`use`."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._loaded = False
        self._load_errors: dict[str, PluginError] = {}  # entry-point name -> why it failed to load (latest attempt)
        self._distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._table: Optional[Registry] = None

    def __repr__(self) -> str:
        return f"<tokencomp.plugins.PluginRegistry{' (default)' if self is DEFAULT else ''} {len(self.pm.get_plugins())} plugins>"

    @contextlib.contextmanager
    def use(self) -> Iterator["PluginRegistry"]:
        """Context manager: this registry is the one in effect (:func:`current`) in this thread or task
        until the block ends."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def load_plugins(self) -> None:
        """Register the built-in plugins and, unless disabled, the entry-point plugins (once)."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            for modname in builtin_plugins():
                if self.pm.get_plugin(modname) is None:
                    self.pm.register(importlib.import_module(modname), name=modname)
            self._load_entrypoints()

    def register(self, plugin: Any, name: Optional[str] = None, *, distribution: Optional[tuple[str, str]] = None) -> str:
        """Register an in-process plugin object or module; returns the name it was registered under."""
        self.load_plugins()
        with self._lock:
            registered = self.pm.register(plugin, name=name)
            if distribution is not None:
                self._distributions[registered] = distribution
            self.invalidate()
            return registered

    def unregister(self, name: str) -> None:
        """Unregister a plugin by name (and forget a load error recorded under that name)."""
        with self._lock:
            self.pm.unregister(name=name)
            self._distributions.pop(name, None)
            self._load_errors.pop(name, None)
            self.invalidate()

    def invalidate(self) -> None:
        """Forget the built table: the next :meth:`registry` calls every ``register_*`` hook again."""
        self._table = None

    def reload_entrypoints(self) -> None:
        """Load entry points again, e.g. after installing a plugin distribution in this process."""
        importlib.invalidate_caches()  # let the import system see packages installed since start-up
        with self._lock:
            self.load_plugins()
            self._load_entrypoints()
            self.invalidate()

    def registry(self) -> Registry:
        """The table of every registered class, built on first use and after every change."""
        self.load_plugins()
        with self._lock:
            if self._table is None:
                self._table = self._build()
            return self._table

    def _dist_of(self, plugin_name: str) -> tuple[str, str]:
        if plugin_name in self._distributions:
            return self._distributions[plugin_name]
        if plugin_name.startswith("tokencomp."):
            return ("tokencomp", _own_version())
        return ("(in-process)", "")

    def _load_entrypoints(self) -> None:
        if os.environ.get("TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD"):
            return
        only = os.environ.get("TOKENCOMP_LOAD_PLUGINS")
        wanted = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            if wanted is not None and ep.name not in wanted:
                continue
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            dist_version = dist.version if dist is not None else "?"
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                self._load_errors[ep.name] = PluginError(
                    f"plugin {ep.name!r} (distribution {dist_name} {dist_version}) failed to load: "
                    f"{type(exc).__name__}: {exc}"
                )
                continue
            self._load_errors.pop(ep.name, None)
            self._distributions[ep.name] = (dist_name, dist_version)

    def _build(self) -> Registry:
        reg = Registry(errors=list(self._load_errors.values()))
        builtins = set(builtin_plugins())
        for kind, (hook_name, base) in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                dist, version = self._dist_of(impl.plugin_name)

                def add(cls, *, _kind=kind, _base=base, _impl=impl, _dist=dist, _version=version):
                    if not (isinstance(cls, type) and issubclass(cls, _base)):
                        raise PluginError(f"registered {cls!r}, which is not a subclass of {_base.__name__}")
                    if not isinstance(cls.name, str) or not cls.name:
                        raise PluginError(f"{cls.__qualname__} has no `name`")
                    entry = Entry(_kind, cls.name, cls, _impl.plugin_name, _dist, _version, _impl.plugin_name in builtins)
                    _add(reg, entry)

                try:
                    impl.function(register=add)
                except Exception as exc:
                    reg.errors.append(
                        PluginError(
                            f"plugin {impl.plugin_name!r} (distribution {dist} {version}) raised in {hook_name}: "
                            f"{type(exc).__name__}: {exc}"
                        )
                    )
        for kind, name in reg.clashes:
            reg.entries[kind].pop(name, None)
        for kind in KINDS:
            for entry in reg.entries[kind].values():
                # Only a class that itself says `default = True`: a subclass of a built-in default inherits
                # the attribute without asking for anything.
                if vars(entry.cls).get("default", False) and not entry.builtin:
                    reg.errors.append(
                        PluginError(
                            f"{kind.replace('_', ' ')} {entry.name!r} of {entry.origin()} is marked default, which "
                            "only a built-in may be; it is registered, but not used as the default"
                        )
                    )
        return reg


DEFAULT = PluginRegistry()
"""The registry in effect unless ``plugins=`` or :meth:`PluginRegistry.use` says otherwise."""

pm = DEFAULT.pm
"""The default registry's pluggy plugin manager (``current().pm`` is the one in effect)."""

_current: contextvars.ContextVar[PluginRegistry] = contextvars.ContextVar("tokencomp_plugins", default=DEFAULT)


def current() -> PluginRegistry:
    """The :class:`PluginRegistry` in effect: :data:`DEFAULT`, or the one a ``plugins=`` argument or
    :meth:`PluginRegistry.use` block chose."""
    return _current.get()


def registry() -> Registry:
    """The table of every plugin class of the registry in effect (:func:`current`)."""
    return current().registry()


def load_plugins() -> None:
    """Register the built-in and entry-point plugins of the registry in effect (once)."""
    current().load_plugins()


def register(plugin: Any, name: Optional[str] = None, *, distribution: Optional[tuple[str, str]] = None) -> str:
    """Register an in-process plugin object or module in the registry in effect; returns its name."""
    return current().register(plugin, name, distribution=distribution)


def unregister(name: str) -> None:
    """Unregister a plugin by name from the registry in effect."""
    current().unregister(name)


def invalidate() -> None:
    """Forget the built table of the registry in effect (rebuilt on next use)."""
    current().invalidate()


def reload_entrypoints() -> None:
    """Load entry points again into the registry in effect (after installing a plugin distribution)."""
    current().reload_entrypoints()


def _add(reg: Registry, entry: Entry) -> None:
    """Record ``entry``; on a name clash a built-in wins, and two third-party classes lose the name."""
    what = f"{entry.kind.replace('_', ' ')} name {entry.name!r}"
    other = reg.entries[entry.kind].get(entry.name)
    if other is None or (other.cls is entry.cls and entry.builtin and not other.builtin):
        reg.entries[entry.kind][entry.name] = entry
        return
    if other.cls is entry.cls:  # the same class twice (e.g. a plugin re-registering a built-in): no clash
        return
    if other.builtin != entry.builtin:
        builtin, third = (other, entry) if other.builtin else (entry, other)
        reg.errors.append(
            PluginError(f"{what} of {third.origin()} is ignored: it is the name of built-in {builtin.origin()}")
        )
        reg.entries[entry.kind][entry.name] = builtin
        reg.clashes.pop((entry.kind, entry.name), None)  # a built-in also beats an earlier third-party clash
        return
    err = PluginError(f"{what} is registered twice: by {other.origin()} and by {entry.origin()}")
    reg.clashes[(entry.kind, entry.name)] = err
    reg.errors.append(err)
