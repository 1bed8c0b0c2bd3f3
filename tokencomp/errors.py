"""Exception types raised by tokencomp. Every user-facing failure is one of these.

* :class:`RecipeError` — a recipe is malformed (``file:line:`` message);
* :class:`PluginError` — a plugin failed to load, clashes with another, or broke its contract at run
  time (wrong shape, NaN scores, a modified view);
* :class:`UnsupportedModelError` — the model, cache, attention kind or inputs are outside what the
  engine supports;
* :class:`UsageError` — the API or the command line was used wrongly (an invalid argument, a recipe
  applied twice, a compacted KV cache used with another or a removed handle).
"""

from __future__ import annotations


class TokencompError(Exception):
    """Base class of every error tokencomp raises on purpose."""


class RecipeError(TokencompError, ValueError):
    """A recipe is malformed. The message starts with ``file:line:`` (or ``<string>:line:``)."""

    def __init__(self, message: str, *, source: str = "<string>", line: int | None = None):
        self.source = source
        self.line = line if line is not None else 1  # unknown line: point at the top of the file
        self.reason = message
        super().__init__(f"{source}:{self.line}: {message}")


class PluginError(TokencompError):
    """A plugin failed to import or register, two plugins claim the same name, or a plugin broke its
    contract during a forward (the message names the plugin and the layer)."""


class UnsupportedModelError(TokencompError, NotImplementedError):
    """The model (class, cache type, attention kind, layer type) is not supported by the engine."""


class UsageError(TokencompError, ValueError, RuntimeError):
    """The API or the command line was used wrongly: an invalid argument or input shape, a recipe
    applied twice, a compacted KV cache reused after ``remove()`` or under another handle.
    (Also a ``ValueError`` and a ``RuntimeError``, the types such misuse raised before.)"""


def copy_refused() -> UsageError:
    """The error for ``copy.deepcopy`` of a model while a recipe is applied (raised by everything the
    engine or an adapter attaches to the model)."""
    return UsageError(
        "cannot copy.deepcopy a model while a tokencomp recipe is applied to it: the copy would share this "
        "handle's hooks. Copy before apply() or after remove(), then apply the recipe to the copy"
    )
