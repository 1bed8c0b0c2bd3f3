"""``lmms-eval --model tokencomp``: evaluate a recipe with the current, unmodified lmms-eval (>= 0.7).

    lmms-eval --model tokencomp \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,recipe=v2drop/llava-1.5-7b-192 \\
        --tasks gqa,mme,pope --batch_size 8

**Registration.** ``pyproject.toml`` declares an entry point in lmms-eval's ``lmms_eval.models``
group that names :func:`manifests`. lmms-eval's ``ModelRegistryV2`` loads every manifest of that
group when ``lmms_eval.models`` is imported, so ``--model tokencomp`` (``lmms_eval.models.get_model``)
resolves to :class:`~.factory.Tokencomp`.

**Model classes.** :class:`~.factory.Tokencomp` is a factory. It reads the checkpoint's ``config.model_type``
(or the ``base=`` argument, an lmms-eval model name) and builds lmms-eval's *own* class for it,
extended by :class:`~.mixin.TokencompModel`:

=============================================  =================================================
``model_type``                                 lmms-eval class (``base=``)
=============================================  =================================================
``llava``, ``llava_next``, ``llava_onevision`` ``LlavaHf`` (``llava_hf``)
``qwen2_vl``                                   ``Qwen2_VL`` (``qwen2_vl``)
``qwen2_5_vl``                                 ``Qwen2_5_VL`` (``qwen2_5_vl``)
``qwen3_vl``                                   ``Qwen3_VL`` (``qwen3_vl``)
=============================================  =================================================

The parent loads the model and processor exactly as ``--model llava_hf`` etc. would; then the
recipe is applied to the loaded Hugging Face model with :func:`tokencomp.apply`. Every argument
other than ``recipe``, ``base`` and ``stats_path`` goes to the parent class unchanged
(``attn_implementation=``, ``max_pixels=``, ``device_map=``, ...). Without ``recipe`` (or with
``recipe=none``) the model runs untouched and the same statistics are recorded: that is the
vanilla row of a table.

**Batching.** lmms-eval's ``LlavaHf`` refuses ``batch_size > 1``; here image/text requests are
batched (left padding) with the same prompts and generation settings as ``LlavaHf`` uses at
batch size 1 (:mod:`.llava_hf`, written for lmms-eval 0.7.x and refused on other versions). The
Qwen classes batch by themselves.

**Log-likelihood.** ``LlavaHf.loglikelihood`` calls the model with ``labels``; a compressed forward
returns logits only for the tokens that survived, so the loss is computed from the logits put
back at their original positions (:func:`tokencomp.loglik.causal_lm_loss`; text tokens are never
dropped, so every continuation token is scored exactly as without compression).

**Statistics.** Every prefill that contains vision tokens is recorded, per task: vision tokens
entering each decoder layer, their average over layers (the papers' "N tokens"), and the prefill
FLOPs of the text decoder relative to the uncompressed prefill (:mod:`tokencomp.flops`). At the
end of the run (lmms-eval calls ``clean()``) they are gathered over data-parallel ranks, logged,
written as JSON to ``stats_path`` if given, and added to lmms-eval's results JSON under
``throughput`` (``avg_tokencomp_vision_tokens`` etc.). ``lm.tokencomp_summary()`` returns them.

**Modules.** :mod:`.factory` registration and model classes; :mod:`.mixin` the mixin, a thin layer
that hands everything to :class:`~.session.Session` (the recipe's handle, the hooks, the current
task); :mod:`.stats` the per-run statistics; :mod:`.devices` device maps and CPU data parallel;
:mod:`.llava_hf` the ``LlavaHf`` re-implementation. Only :mod:`.factory` imports lmms-eval when it
is imported, and this package imports its modules on first use of a name: :mod:`.session` and
:mod:`.stats` work without lmms-eval.
"""

from __future__ import annotations

import importlib

__all__ = ["MODEL_ID", "BASES", "MODEL_TYPES", "manifests", "model_class", "base_for", "Tokencomp", "TokencompModel", "Session"]

# name -> the module that defines it (imported on first use: lmms-eval is only needed by some)
_HOMES = {
    "MODEL_ID": "factory",
    "BASES": "factory",
    "MODEL_TYPES": "factory",
    "manifests": "factory",
    "model_class": "factory",
    "base_for": "factory",
    "Tokencomp": "factory",
    "TokencompModel": "mixin",
    "Session": "session",
}


def __getattr__(name: str):
    """The public names, and ``TokencompLlavaHf`` etc. (the classes of ``model_class``, importable and
    picklable by name)."""
    home = _HOMES.get(name)
    if home is not None:
        return getattr(importlib.import_module(f"{__name__}.{home}"), name)
    if name.startswith("Tokencomp"):
        cls = importlib.import_module(f"{__name__}.factory").class_named(name)
        if cls is not None:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
