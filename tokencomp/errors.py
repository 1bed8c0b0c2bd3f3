"""Exception types raised by tokencomp. Every user-facing failure is one of these."""

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
    """A plugin failed to import or register, or two plugins claim the same name."""


class UnsupportedModelError(TokencompError, NotImplementedError):
    """The model (class, cache type, attention kind, layer type) is not supported by the engine."""
