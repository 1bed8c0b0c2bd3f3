"""``lmms-eval --model tokencomp``: evaluate a recipe with the current, unmodified lmms-eval (>= 0.7).

    lmms-eval --model tokencomp \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,recipe=v2drop/llava-1.5-7b-192 \\
        --tasks gqa,mme,pope --batch_size 8

**Registration.** ``pyproject.toml`` declares an entry point in lmms-eval's ``lmms_eval.models``
group that names :func:`manifests`. lmms-eval's ``ModelRegistryV2`` loads every manifest of that
group when ``lmms_eval.models`` is imported, so ``--model tokencomp`` (``lmms_eval.models.get_model``)
resolves to :class:`Tokencomp`.

**Model classes.** :class:`Tokencomp` is a factory. It reads the checkpoint's ``config.model_type``
(or the ``base=`` argument, an lmms-eval model name) and builds lmms-eval's *own* class for it,
extended by :class:`TokencompModel`:

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
batch size 1. The Qwen classes batch by themselves.

**Log-likelihood.** ``LlavaHf.loglikelihood`` calls the model with ``labels``; a compressed forward
returns logits only for the tokens that survived, so the loss is computed here from the logits
put back at their original positions (text tokens are never dropped, so every continuation
token is scored exactly as without compression).

**Statistics.** Every prefill that contains vision tokens is recorded, per task: vision tokens
entering each decoder layer, their average over layers (the papers' "N tokens"), and the prefill
FLOPs of the text decoder relative to the uncompressed prefill (:mod:`tokencomp.flops`). At the
end of the run (lmms-eval calls ``clean()``) they are gathered over data-parallel ranks, logged,
written as JSON to ``stats_path`` if given, and added to lmms-eval's results JSON under
``throughput`` (``avg_tokencomp_vision_tokens`` etc.). ``lm.tokencomp_summary()`` returns them.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
from lmms_eval.api.model import lmms

from ..errors import UnsupportedModelError, UsageError

__all__ = ["MODEL_ID", "manifests", "Tokencomp", "TokencompModel", "model_class", "BASES", "MODEL_TYPES"]

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



def _is_vanilla(recipe) -> bool:
    return recipe is None or (isinstance(recipe, str) and recipe.strip().lower() in ("", "none", "vanilla"))


def manifests():
    """The entry-point payload read by lmms-eval's ``ModelRegistryV2.load_entrypoint_manifests``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.Tokencomp")]


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


class _Totals:
    """Sums over recorded samples (mergeable across ranks)."""

    def __init__(self) -> None:
        self.samples = 0
        self.vision_in = 0.0
        self.vision_avg = 0.0
        self.per_layer: list[float] = []
        self.flops = 0.0
        self.flops_vanilla = 0.0

    def add(self, per_layer: list[int], flops: float, flops_vanilla: float) -> None:
        self.samples += 1
        self.vision_in += per_layer[0] if per_layer else 0
        self.vision_avg += sum(per_layer) / len(per_layer) if per_layer else 0
        if len(self.per_layer) < len(per_layer):
            self.per_layer += [0.0] * (len(per_layer) - len(self.per_layer))
        for i, v in enumerate(per_layer):
            self.per_layer[i] += v
        self.flops += flops
        self.flops_vanilla += flops_vanilla

    def merge(self, other: "_Totals") -> None:
        self.samples += other.samples
        self.vision_in += other.vision_in
        self.vision_avg += other.vision_avg
        if len(self.per_layer) < len(other.per_layer):
            self.per_layer += [0.0] * (len(other.per_layer) - len(self.per_layer))
        for i, v in enumerate(other.per_layer):
            self.per_layer[i] += v
        self.flops += other.flops
        self.flops_vanilla += other.flops_vanilla

    def summary(self) -> dict[str, Any]:
        n = max(self.samples, 1)
        return {
            "samples": self.samples,
            "vision_tokens_in": self.vision_in / n,
            "vision_tokens_avg": self.vision_avg / n,
            "vision_tokens_per_layer": [v / n for v in self.per_layer],
            "prefill_flops_ratio": self.flops / self.flops_vanilla if self.flops_vanilla else 1.0,
        }


class _Pending:
    __slots__ = ("vision_in", "valid", "labels")

    def __init__(self, vision_in, valid, labels=None):
        self.vision_in = vision_in
        self.valid = valid
        self.labels = labels


# ------------------------------------------------------------------------------------------------
# the mixin
# ------------------------------------------------------------------------------------------------


class TokencompModel:
    """Mixin over an lmms-eval model class: applies a recipe after the parent loaded the model,
    records statistics per task, and reports them at the end of the run.

    Extra arguments: ``recipe`` (path, shipped name, YAML text; ``none`` = untouched),
    ``stats_path`` (write the statistics as JSON there at the end) and ``base`` (ignored here:
    consumed by :class:`Tokencomp`).
    """

    def __init__(self, *args, recipe: Optional[str] = None, stats_path: Optional[str] = None, base: Optional[str] = None, **kwargs):
        import tokencomp  # recipes are checked before the (slow) model load

        self._tc_recipe = None if _is_vanilla(recipe) else tokencomp.load_recipe(recipe)
        super().__init__(*args, **kwargs)
        self._tc_recipe_arg = None if self._tc_recipe is None else (recipe if isinstance(recipe, str) else self._tc_recipe.name)
        self._tc_stats_path = stats_path
        self._tc_setup()

    # ------------------------------------------------------------------ set-up / tear-down

    def _tc_setup(self) -> None:
        import tokencomp
        from tokencomp.flops import DecoderShape
        from tokencomp.plugins import registry

        model = self.model
        self._tc_model = model
        self._tc_shape = DecoderShape.from_config(model.config)
        self._tc_totals: dict[str, _Totals] = defaultdict(_Totals)
        self._tc_task: str = "unknown"
        self._tc_tls = threading.local()
        self._tc_handle = tokencomp.apply(model, self._tc_recipe) if self._tc_recipe is not None else None
        ids = registry().adapter_for(model).vision_token_ids(model)
        self._tc_vision_ids = torch.tensor(ids, dtype=torch.long)
        self._tc_last_stats = self._tc_handle.stats if self._tc_handle is not None else None
        # Ours run first (prepend) so `labels` never reach tokencomp's hook, and last (registered
        # after apply) so tokencomp's statistics of this forward are complete.
        self._tc_hooks = [
            model.register_forward_pre_hook(self._tc_pre, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._tc_post, with_kwargs=True, always_call=True),
        ]
        if int(self.batch_size) > 1:  # batched generation needs left padding (some checkpoints say right)
            for tok in (getattr(getattr(self, "processor", None), "tokenizer", None), getattr(self, "_tokenizer", None)):
                if tok is not None:
                    tok.padding_side = "left"

    def tokencomp_remove(self) -> None:
        """Remove the recipe and the statistics hooks (the model is left as the parent loaded it)."""
        for h in getattr(self, "_tc_hooks", []):
            h.remove()
        self._tc_hooks = []
        if getattr(self, "_tc_handle", None) is not None:
            self._tc_handle.remove()
            self._tc_handle = None
        self._tc_model = None

    @property
    def tokencomp_handle(self):
        """The :class:`tokencomp.Handle` of the applied recipe (None when running untouched)."""
        return self._tc_handle

    # ------------------------------------------------------------------ hooks

    def _tc_stack(self) -> list:
        stack = getattr(self._tc_tls, "stack", None)
        if stack is None:
            stack = self._tc_tls.stack = []
        return stack

    def _tc_pre(self, module, args, kwargs):
        stack = self._tc_stack()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        if input_ids is None or input_ids.ndim != 2 or (cache is not None and cache.get_seq_length() > 0):
            stack.append(None)
            return None
        is_vision = torch.isin(input_ids, self._tc_vision_ids.to(input_ids.device))
        if not bool(is_vision.any()):
            stack.append(None)
            return None
        mask = kwargs.get("attention_mask")
        valid = mask.sum(1) if mask is not None and mask.ndim == 2 else torch.full_like(is_vision[:, 0], is_vision.shape[1], dtype=torch.long)
        pending = _Pending(is_vision.sum(1).tolist(), valid.tolist())
        stack.append(pending)
        if self._tc_handle is not None and kwargs.get("labels") is not None:
            kwargs = dict(kwargs)
            pending.labels = kwargs.pop("labels")
            return args, kwargs
        return None

    def _tc_post(self, module, args, kwargs, output):
        stack = self._tc_stack()
        pending = stack.pop() if stack else None
        if pending is None or output is None:
            return None
        handle = self._tc_handle
        compressed = handle is not None and handle.stats is not self._tc_last_stats
        if compressed:
            self._tc_last_stats = handle.stats
            table = handle.stats.vision_tokens_per_layer
        else:
            table = [[v] * self._tc_shape.layers for v in pending.vision_in]
        self._tc_record(table, pending)
        if pending.labels is not None:
            positions = handle.stats.output_positions if compressed else None
            return self._tc_with_loss(output, pending.labels, positions)
        return None

    def _tc_record(self, table, pending: _Pending) -> None:
        from tokencomp.flops import prefill_flops

        totals = self._tc_totals[self._tc_task]
        for row, n_vis, valid in zip(table, pending.vision_in, pending.valid):
            text = valid - n_vis
            flops = prefill_flops(self._tc_shape, [text + v for v in row])
            vanilla = prefill_flops(self._tc_shape, [valid] * len(row))
            totals.add(list(row), flops, vanilla)

    @staticmethod
    def _tc_with_loss(output, labels: torch.Tensor, positions: Optional[torch.Tensor]):
        """Scatter the logits of the surviving tokens back to their positions; causal-LM loss."""
        logits = output.logits
        B, L = labels.shape
        if positions is not None and logits.shape[1] != L:
            V = logits.shape[-1]
            positions = positions.to(logits.device)
            full = logits.new_zeros(B, L, V)
            full.scatter_(1, positions[..., None].expand(-1, -1, V), logits)
            present = torch.zeros(B, L, dtype=torch.bool, device=logits.device)
            present.scatter_(1, positions, True)
            logits = full
        else:
            present = torch.ones(B, L, dtype=torch.bool, device=logits.device)
        target = labels[:, 1:].to(logits.device).clone()
        target[~present[:, :-1]] = -100  # no prediction from a dropped (vision) position
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100
        )
        output["logits"] = logits
        output["loss"] = loss
        return output

    # ------------------------------------------------------------------ request entry points

    def _tc_by_task(self, method, requests):
        """Run ``method`` per task (so statistics are attributed), results in request order."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(getattr(req, "task_name", None) or "unknown", []).append(i)
        out: list = [None] * len(requests)
        for task, idx in groups.items():
            self._tc_task = task
            try:
                res = method([requests[i] for i in idx])
            finally:
                self._tc_task = "unknown"
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def generate_until(self, requests):
        return self._tc_by_task(super().generate_until, requests)

    def loglikelihood(self, requests):
        return self._tc_by_task(super().loglikelihood, requests)

    # ------------------------------------------------------------------ reporting

    def tokencomp_summary(self) -> dict[str, Any]:
        """Statistics of this process so far: overall and per task."""
        return _summary(self._tc_totals, self._tc_recipe_arg, getattr(self, "pretrained", None), self._tc_shape.layers)

    def _tc_gathered(self) -> dict[str, _Totals]:
        totals = dict(self._tc_totals)
        dist = torch.distributed
        if int(getattr(self, "world_size", 1) or 1) > 1 and dist.is_available() and dist.is_initialized():
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, totals)
            merged: dict[str, _Totals] = defaultdict(_Totals)
            for part in parts:
                for task, t in part.items():
                    merged[task].merge(t)
            totals = dict(merged)
        return totals

    def clean(self):
        if getattr(self, "_tc_totals", None) is not None and not getattr(self, "_tc_reported", False):
            self._tc_reported = True
            summary = _summary(self._tc_gathered(), self._tc_recipe_arg, getattr(self, "pretrained", None), self._tc_shape.layers)
            self._tc_final = summary
            if int(getattr(self, "rank", 0) or 0) == 0:
                _report(summary, self._tc_stats_path)
        self.tokencomp_remove()
        return super().clean()


def _summary(totals: dict, recipe: Optional[str], model: Optional[str], layers: int) -> dict[str, Any]:
    overall = _Totals()
    for t in totals.values():
        overall.merge(t)
    return {
        "model": model,
        "recipe": recipe,
        "decoder_layers": layers,
        "overall": overall.summary(),
        "tasks": {task: t.summary() for task, t in sorted(totals.items())},
    }


def _report(summary: dict, stats_path: Optional[str]) -> None:
    from loguru import logger

    o = summary["overall"]
    logger.info(
        f"tokencomp [{summary['recipe'] or 'vanilla'}]: {o['samples']} prefills, vision tokens "
        f"{o['vision_tokens_in']:.1f} in, {o['vision_tokens_avg']:.1f} average over layers, "
        f"prefill FLOPs x{o['prefill_flops_ratio']:.3f}"
    )
    if stats_path:
        path = Path(stats_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
    try:  # lands in the results JSON under "throughput" as avg_tokencomp_*
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        log_metrics(
            total_elapsed_time=0.0,
            total_gen_tokens=0,
            avg_speed=0.0,
            additional_metrics={
                "tokencomp_vision_tokens": o["vision_tokens_avg"],
                "tokencomp_vision_tokens_in": o["vision_tokens_in"],
                "tokencomp_prefill_flops_ratio": o["prefill_flops_ratio"],
                "tokencomp_samples": o["samples"],
            },
        )
    except Exception:  # pragma: no cover - older lmms-eval without gen_metrics
        pass


# ------------------------------------------------------------------------------------------------
# batched generation for LlavaHf
# ------------------------------------------------------------------------------------------------


class _LlavaHfBatching:
    """``generate_until`` for ``LlavaHf`` at ``batch_size > 1`` (lmms-eval's asserts batch size 1).

    Prompts, chat template and generation settings are those of ``LlavaHf.generate_until``
    (which, like here, does not cut the answer at ``until``); video requests and batch size 1
    go to ``LlavaHf`` itself.

    Also: ``LlavaHf``'s default ``device_map=""`` is rejected by transformers 5 in a single process;
    there it becomes ``device``.
    """

    def __init__(self, *args, device: str = "cuda", device_map: str = "", **kwargs):
        if device_map == "":
            from accelerate import PartialState

            if PartialState().num_processes <= 1:
                device_map = str(device)
        super().__init__(*args, device=device, device_map=device_map, **kwargs)

    def _llava_prompt(self, context: str, n_images: int, continuation: Optional[str] = None) -> str:
        from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE

        if n_images and (continuation is not None or DEFAULT_IMAGE_TOKEN not in context):
            context = " ".join([DEFAULT_IMAGE_TOKEN] * n_images) + "\n" + context
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        elif self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        messages = [{"role": "user", "content": context}]
        if continuation is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": continuation})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def loglikelihood(self, requests):
        """``LlavaHf.loglikelihood``'s prompts and result convention (mean continuation loss, greedy
        match), which lmms-eval 0.7.3 cannot run on transformers 5 (it calls the processor on
        ``<image>`` text without images to measure the context length)."""
        from tqdm import tqdm

        res = []
        for req in tqdm(requests, disable=(self.rank != 0), desc="Model Responding"):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self.flatten([doc_to_visual(doc)])
            images = visuals or None
            ctx_len = self._image_processor(images=images, text=[self._llava_prompt(context, len(visuals))], return_tensors="pt")["input_ids"].shape[1]
            inputs = self._image_processor(images=images, text=[self._llava_prompt(context, len(visuals), continuation)], return_tensors="pt")
            inputs = inputs.to(self._device, self.model.dtype)
            ids = inputs["input_ids"]
            labels = ids.clone()
            labels[:, :ctx_len] = -100
            with torch.inference_mode():
                out = self.model(**inputs, labels=labels)
            greedy = out["logits"][:, ctx_len - 1 : -1].argmax(dim=-1)
            res.append((float(out["loss"].item()), bool((greedy == ids[:, ctx_len:]).all())))
        return res

    def generate_until(self, requests):
        if int(self.batch_size) <= 1:
            return super().generate_until(requests)
        import PIL.Image
        from lmms_eval import utils
        from tqdm import tqdm

        visuals_of = {}
        video_idx, image_idx = [], []
        for i, req in enumerate(requests):
            _, _, doc_to_visual, doc_id, task, split = req.args
            vis = self.flatten([doc_to_visual(self.task_dict[task][split][doc_id])])
            visuals_of[i] = vis
            (video_idx if any(not isinstance(v, PIL.Image.Image) for v in vis) else image_idx).append(i)
        out: list = [None] * len(requests)
        if video_idx:  # the parent's video path, one request at a time
            saved = self.batch_size_per_gpu
            self.batch_size_per_gpu = 1
            try:
                for i, r in zip(video_idx, super().generate_until([requests[i] for i in video_idx])):
                    out[i] = r
            finally:
                self.batch_size_per_gpu = saved
        if not image_idx:
            return out

        items = [requests[i].args + (i,) for i in image_idx]
        collator = utils.Collator(items, lambda x: (-len(self.tok_encode(x[0])), x[0]), grouping=True)
        results = []
        pbar = tqdm(total=len(items), disable=(self.rank != 0), desc="Model Responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, _, _, _, _, order = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])
            gen_kwargs.pop("until", None)
            texts, images = [], []
            for ctx, i in zip(contexts, order):
                vis = visuals_of[i]
                texts.append(self._llava_prompt(ctx, len(vis)))
                images.extend(vis)
            inputs = self._image_processor(images=images or None, text=texts, padding=True, return_tensors="pt")
            inputs = inputs.to(self._device, self.model.dtype)
            temperature = gen_kwargs.get("temperature", 0) or 0
            do_sample = temperature > 0
            cont = self.model.generate(
                **inputs,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=gen_kwargs.get("top_p"),
                num_beams=gen_kwargs.get("num_beams", 1),
                max_new_tokens=gen_kwargs.get("max_new_tokens", 1024),
                use_cache=self.use_cache,
                pad_token_id=self.eot_token_id,
                eos_token_id=self.eot_token_id,
            )
            answers = self.tokenizer.batch_decode(cont[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for ctx, ans, gk in zip(contexts, answers, all_gen_kwargs):
                results.append(ans)
                self.cache_hook.add_partial("generate_until", (ctx, gk), ans)
            pbar.update(len(chunk))
        pbar.close()
        for i, ans in zip(image_idx, collator.get_original(results)):
            out[i] = ans
        return out


# ------------------------------------------------------------------------------------------------
# classes and the factory
# ------------------------------------------------------------------------------------------------

_classes: dict[str, type] = {}
_EXTRA = {"llava_hf": (_LlavaHfBatching,)}
_NAMES = {"llava_hf": "TokencompLlavaHf", "qwen2_vl": "TokencompQwen2_VL", "qwen2_5_vl": "TokencompQwen2_5_VL", "qwen3_vl": "TokencompQwen3_VL"}


def model_class(base: str) -> type:
    """lmms-eval's class for ``base`` (an lmms-eval model name, see :data:`BASES`) with tokencomp mixed in."""
    if base not in BASES:
        raise UsageError(f"tokencomp: base {base!r} is not supported; expected one of {sorted(BASES)}")
    cls = _classes.get(base)
    if cls is None:
        module, name = BASES[base]
        parent = getattr(importlib.import_module(module), name)
        cls = type(_NAMES[base], (TokencompModel, *_EXTRA.get(base, ()), parent), {"__module__": __name__, "is_simple": True})
        _classes[base] = cls
    return cls


def __getattr__(name):  # TokencompLlavaHf etc. are importable (and picklable) by name
    for base, cname in _NAMES.items():
        if name == cname:
            return model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
