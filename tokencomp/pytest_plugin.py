"""tokencomp's test kit for plugin authors: an opt-in pytest plugin.

Enable it with ``pytest -p tokencomp.pytest_plugin``, or in a top-level ``conftest.py`` / test module::

    pytest_plugins = ["tokencomp.pytest_plugin"]

It provides:

* ``plugin_registry`` — a fresh :class:`tokencomp.plugins.PluginRegistry` (built-ins and, unless
  disabled, entry points), in effect for this test: ``load_recipe`` / ``apply`` / ``registry()``
  use it, and nothing registered in it reaches another test;
* ``in_process_plugin`` — ``register(obj, name)`` registers a plugin module or object for this test
  only, in ``plugin_registry`` (an object already registered, e.g. through its entry point, is left
  as it is);
* ``tiny_models`` (session) — ``tiny_models["llava"]``: the tiny random-weight model of each family
  (:data:`tokencomp.testing.FAMILIES`), built on first use and shared with :mod:`tokencomp.contract`;
* ``make_view`` — :func:`tokencomp.contract.make_view`, a valid ``LayerView`` from small tensors;
* ``contract`` — the :mod:`tokencomp.contract` module (``contract.check_scorer(MyScorer())``, ...).

Nothing heavy is imported until a fixture is used.
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "tokencomp_contract: runs the tokencomp plugin contract (tokencomp.contract)")


class _TinyModels(dict):
    """``family -> model``, built lazily (a missing key builds that family's tiny model)."""

    def __missing__(self, family):
        from .contract import tiny_model

        model = tiny_model(family)
        self[family] = model
        return model


@pytest.fixture(scope="session")
def tiny_models():
    """Tiny random-weight models of every family, by family name, built on first use (session-wide)."""
    return _TinyModels()


@pytest.fixture
def make_view():
    """:func:`tokencomp.contract.make_view`: ``make_view(hidden, vision_mask, layer=1, keep=0.5, **fields)``."""
    from .contract import make_view as build

    return build


@pytest.fixture
def contract():
    """The :mod:`tokencomp.contract` module: ``check_scorer`` / ``check_selector`` / ``check_merger``."""
    from . import contract as module

    return module


@pytest.fixture
def plugin_registry():
    """A fresh plugin registry in effect for this test only (``tokencomp.plugins.current()`` is it)."""
    from .plugins import PluginRegistry

    with PluginRegistry().use() as registry:
        yield registry


@pytest.fixture
def in_process_plugin(plugin_registry):
    """``register(obj, name)``: register a plugin object for this test only (in ``plugin_registry``)."""

    def register(obj, name, **kwargs):
        plugin_registry.load_plugins()
        if plugin_registry.pm.is_registered(obj):  # e.g. already loaded through its entry point
            return plugin_registry.pm.get_name(obj)
        return plugin_registry.register(obj, name=name, **kwargs)

    return register
