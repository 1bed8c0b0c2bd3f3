"""Tiny local checkpoints: moved to :mod:`tokencomp.synthetic.checkpoints`; importable from here as before."""

from .synthetic.checkpoints import CHAT_TEMPLATES, CHECKPOINT_FAMILIES, NEEDS_TORCHVISION, save_tiny_checkpoint  # noqa: F401

__all__ = ["save_tiny_checkpoint", "CHAT_TEMPLATES", "CHECKPOINT_FAMILIES", "NEEDS_TORCHVISION"]
