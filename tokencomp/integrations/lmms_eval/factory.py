"""Registration (``--model tokencomp``) and the factory of lmms-eval classes with tokencomp mixed in."""

from __future__ import annotations

import importlib
from typing import Optional

from lmms_eval.api.model import lmms

from ...errors import UnsupportedModelError, UsageError
from . import llava_hf
from .mixin import TokencompModel

__all__ = ["MODEL_ID", "BASES", "MODEL_TYPES", "manifests", "model_class", "class_named", "base_for", "Tokencomp"]

MODEL_ID = "tokencomp"

#: lmms-eval model name -> (module, class) of lmms-eval's own implementation.
BASES = {
    "llava_hf": ("lmms_eval.models.simple.llava_hf", "LlavaHf"),
    "qwen2_vl": ("lmms_eval.models.simple.qwen2_vl", "Qwen2_VL"),
    "qwen2_5_vl": ("lmms_eval.models.simple.qwen2_5_vl", "Qwen2_5_VL"),
    "qwen3_vl": ("lmms_eval.models.simple.qwen3_vl", "Qwen3_VL"),
}

#: Hugging Face ``config.model_type`` -> lmms-eval model name.
MODEL_TYPES = {
    "llava": "llava_hf",
    "llava_next": "llava_hf",
    "llava_onevision": "llava_hf",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
}

_NAMES = {"llava_hf": "TokencompLlavaHf", "qwen2_vl": "TokencompQwen2_VL", "qwen2_5_vl": "TokencompQwen2_5_VL", "qwen3_vl": "TokencompQwen3_VL"}
_EXTRA = {"llava_hf": llava_hf.batching_mixin}  # base -> the mixins between ours and lmms-eval's class
_classes: dict[str, type] = {}


def manifests():
    """The entry-point payload read by lmms-eval's ``ModelRegistryV2.load_entrypoint_manifests``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__package__}.Tokencomp")]


def model_class(base: str) -> type:
    """lmms-eval's class for ``base`` (an lmms-eval model name, see :data:`BASES`) with tokencomp mixed in."""
    if base not in BASES:
        raise UsageError(f"tokencomp: base {base!r} is not supported; expected one of {sorted(BASES)}")
    cls = _classes.get(base)
    if cls is None:
        module, name = BASES[base]
        parent = getattr(importlib.import_module(module), name)
        extra = (_EXTRA[base](),) if base in _EXTRA else ()
        # named in the package, which resolves these names: instances pickle, lmms-eval finds the class
        attrs = {"__module__": __package__, "is_simple": True, "_tokencomp_base": base}
        cls = type(_NAMES[base], (TokencompModel, *extra, parent), attrs)
        _classes[base] = cls
    return cls


def class_named(name: str) -> Optional[type]:
    """The :func:`model_class` called ``name`` (``TokencompLlavaHf``, ...), or None."""
    for base, cname in _NAMES.items():
        if name == cname:
            return model_class(base)
    return None


def base_for(pretrained: str, base: Optional[str] = None) -> str:
    """The lmms-eval model name to build on: ``base`` if given, else from the checkpoint's ``model_type``."""
    if base:
        return MODEL_TYPES.get(base, base)
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(pretrained).model_type
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"tokencomp: checkpoint {pretrained!r} has model_type {model_type!r}; supported: {sorted(MODEL_TYPES)} "
            f"(or pass base=one of {sorted(BASES)})"
        )
    return MODEL_TYPES[model_type]


class Tokencomp(lmms):
    """``--model tokencomp``: builds :func:`model_class` for the checkpoint and returns that instance.

    ``Tokencomp(pretrained=..., recipe=..., base=None, stats_path=None, **parent_args)``.
    """

    is_simple = True

    def __new__(cls, pretrained: Optional[str] = None, base: Optional[str] = None, **kwargs):
        if pretrained is None:
            raise UsageError("tokencomp: --model_args needs pretrained=<checkpoint id or path>")
        return model_class(base_for(pretrained, base))(pretrained=pretrained, **kwargs)

    def generate_until(self, requests):  # pragma: no cover - never instantiated
        raise NotImplementedError

    def loglikelihood(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until_multi_round(self, requests):  # pragma: no cover
        raise NotImplementedError
