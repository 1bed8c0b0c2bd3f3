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
import time
from contextlib import contextmanager
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
        self.gen_requests = 0  # generate_until requests answered
        self.gen_tokens = 0  # tokens of their answers (re-encoded, special tokens excluded)
        self.gen_seconds = 0.0  # wall time spent in generate_until

    def add_generation(self, requests: int, tokens: int, seconds: float) -> None:
        self.gen_requests += requests
        self.gen_tokens += tokens
        self.gen_seconds += seconds

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
        self.gen_requests += getattr(other, "gen_requests", 0)
        self.gen_tokens += getattr(other, "gen_tokens", 0)
        self.gen_seconds += getattr(other, "gen_seconds", 0.0)

    def summary(self) -> dict[str, Any]:
        n = max(self.samples, 1)
        return {
            "samples": self.samples,
            "vision_tokens_in": self.vision_in / n,
            "vision_tokens_avg": self.vision_avg / n,
            "vision_tokens_per_layer": [v / n for v in self.per_layer],
            "prefill_flops_ratio": self.flops / self.flops_vanilla if self.flops_vanilla else 1.0,
            "generate_requests": self.gen_requests,
            "generated_tokens": self.gen_tokens,
            "generate_seconds": self.gen_seconds,
        }


class _Pending:
    __slots__ = ("vision_in", "valid", "labels")

    def __init__(self, vision_in, valid, labels=None):
        self.vision_in = vision_in
        self.valid = valid
        self.labels = labels


# ------------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------------


def _is_cuda(device) -> bool:
    return str(device).split(":")[0] == "cuda"


def _map_device(base: Optional[str], kwargs: dict) -> tuple[dict, bool]:
    """``device`` / ``device_map`` for lmms-eval's class ``base``; and whether this is CPU data parallel.

    lmms-eval's classes default to ``device="cuda"`` and ``device_map`` ``"cuda"`` (Qwen2-VL),
    ``"auto"`` (Qwen2.5-VL, Qwen3-VL) or ``""`` (LlavaHf, which transformers 5 rejects in a single
    process). Here, for every base: no ``device`` on a machine without CUDA means ``cpu``; a
    non-CUDA device that the user did not pair with a ``device_map`` gets ``device_map=device``;
    LlavaHf's ``""`` becomes the device in a single process. Several processes (``accelerate launch``)
    on a non-CUDA device are CPU data parallel (see :func:`_one_process_accelerator`).
    """
    from accelerate import PartialState

    kwargs = dict(kwargs)
    processes = PartialState().num_processes
    device = kwargs.get("device")
    if device is None and not torch.cuda.is_available():
        device = kwargs["device"] = "cpu"
    on_cuda = device is None or _is_cuda(device)
    device_map = kwargs.get("device_map")
    if not on_cuda and device_map in (None, ""):
        kwargs["device_map"] = str(device)
    elif base == "llava_hf" and device_map in (None, "") and processes <= 1:
        kwargs["device_map"] = str(device or "cuda")
    return kwargs, processes > 1 and not on_cuda


class _OneProcessView:
    """An ``Accelerator`` seen as a single process (lmms-eval's ``__init__`` then loads on ``device``)."""

    def __init__(self, accelerator):
        object.__setattr__(self, "_real", accelerator)

    num_processes = 1
    process_index = 0
    local_process_index = 0
    is_main_process = True
    is_local_main_process = True

    @property
    def distributed_type(self):
        from accelerate import DistributedType

        return DistributedType.NO

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextmanager
def _one_process_accelerator(cls):
    """While lmms-eval's class of ``cls`` runs ``__init__``, its ``Accelerator()`` says one process.

    Yields a list that receives the real accelerator; the caller then sets ``rank`` / ``world_size``
    from it, so lmms-eval's evaluator still shards the documents over all processes and
    ``clean()`` gathers tokencomp's statistics over them.
    """
    module = importlib.import_module(BASES[cls._tc_base][0])
    real = getattr(module, "Accelerator")
    made: list = []

    def factory(*args, **kwargs):
        accelerator = real(*args, **kwargs)
        made.append(accelerator)
        return _OneProcessView(accelerator)

    module.Accelerator = factory
    try:
        yield made
    finally:
        module.Accelerator = real
    if not made:  # the parent never asked: make one for rank / world size
        made.append(real())


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
        kwargs, cpu_data_parallel = _map_device(getattr(type(self), "_tc_base", None), kwargs)
        if cpu_data_parallel:
            # lmms-eval's classes hard-code cuda:<rank> (and DDP on GPUs) whenever accelerate runs several
            # processes; on CPUs each rank loads the model on its device and takes its share of the docs.
            with _one_process_accelerator(type(self)) as made:
                super().__init__(*args, **kwargs)
            accelerator = made[0]
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        else:
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
        self._tc_generated = 0
        self._tc_wrap_generate(model)
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
        wrapped = getattr(self, "_tc_generate_wrapped", None)
        if wrapped is not None:
            wrapped.__dict__.pop("generate", None)
            self._tc_generate_wrapped = None
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
        from tokencomp.flops import prefill_flops_compared

        totals = self._tc_totals[self._tc_task]
        for row, n_vis, valid in zip(table, pending.vision_in, pending.valid):
            vanilla, flops = prefill_flops_compared(self._tc_shape, valid, n_vis, row)
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

    def _tc_by_task(self, method, requests, timed: bool = False):
        """Run ``method`` per task (so statistics are attributed), results in request order.

        ``timed``: also record the wall time and the number of generated tokens per task (the
        answers re-encoded without special tokens), reported as lmms-eval's throughput numbers.
        """
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(getattr(req, "task_name", None) or "unknown", []).append(i)
        out: list = [None] * len(requests)
        for task, idx in groups.items():
            self._tc_task = task
            start, generated = time.perf_counter(), self._tc_generated
            try:
                res = method([requests[i] for i in idx])
            finally:
                self._tc_task = "unknown"
            if timed:
                seconds = time.perf_counter() - start
                self._tc_totals[task].add_generation(len(idx), self._tc_generated - generated, seconds)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _tc_wrap_generate(self, model) -> None:
        """Count the tokens each ``model.generate`` call produces (up to and including the first EOS of
        every row; the padding after it is not counted)."""
        original = model.generate

        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            try:
                self._tc_generated += _new_tokens(model, out, args, kwargs)
            except Exception:  # counting must never break generation
                pass
            return out

        model.generate = generate
        self._tc_generate_wrapped = model

    def generate_until(self, requests):
        return self._tc_by_task(super().generate_until, requests, timed=True)

    def loglikelihood(self, requests):
        return self._tc_by_task(super().loglikelihood, requests)

    # ------------------------------------------------------------------ reporting

    def tokencomp_summary(self) -> dict[str, Any]:
        """Statistics of this process so far: overall and per task."""
        return _summary(self._tc_totals, self._tc_recipe_arg, getattr(self, "pretrained", None), self._tc_shape.layers)

    def _tc_gathered(self) -> dict[str, _Totals]:
        totals = dict(self._tc_totals)
        self._tc_rank_samples = [sum(t.samples for t in totals.values())]
        dist = torch.distributed
        if int(getattr(self, "world_size", 1) or 1) > 1 and dist.is_available() and dist.is_initialized():
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, totals)
            self._tc_rank_samples = [sum(t.samples for t in part.values()) for part in parts]
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
            summary["samples_per_rank"] = self._tc_rank_samples  # data parallel: each rank's share
            self._tc_final = summary
            if int(getattr(self, "rank", 0) or 0) == 0:
                _report(summary, self._tc_stats_path)
        self.tokencomp_remove()
        return super().clean()


def _new_tokens(model, out, args, kwargs) -> int:
    """Tokens generated by one ``generate`` call: per row, up to and including its first EOS."""
    sequences = out if isinstance(out, torch.Tensor) else out["sequences"]
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    start = input_ids.shape[1] if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 else 0
    new = sequences[:, start:]
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    if eos is None:
        return int(new.numel())
    eos = torch.as_tensor(eos, device=new.device).reshape(-1)
    is_eos = torch.isin(new, eos)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1], dtype=torch.long))
    return int(first.sum())


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
    ours = {
        "tokencomp_vision_tokens": o["vision_tokens_avg"],
        "tokencomp_vision_tokens_in": o["vision_tokens_in"],
        "tokencomp_prefill_flops_ratio": o["prefill_flops_ratio"],
        "tokencomp_samples": o["samples"],
    }
    try:  # lands in the results JSON under "throughput" (avg_tokencomp_*, and the real generation numbers)
        from lmms_eval.models.model_utils import gen_metrics
    except Exception:  # pragma: no cover - older lmms-eval without gen_metrics
        return
    if o["generate_requests"] and o["generate_seconds"] > 0:
        # measured over all ranks: answers' tokens, wall time inside generate_until
        gen_metrics.log_metrics(
            total_elapsed_time=o["generate_seconds"],
            total_gen_tokens=o["generated_tokens"],
            avg_speed=o["generated_tokens"] / o["generate_seconds"],
            additional_metrics={**ours, "total_requests": o["generate_requests"]},
        )
        return
    # no generation (log-likelihood only): record nothing for tokens / speed rather than zeros
    history = getattr(gen_metrics, "_THROUGHPUT_METRICS_HISTORY", None)
    if isinstance(history, list):
        history.append(dict(ours))


# ------------------------------------------------------------------------------------------------
# batched generation for LlavaHf
# ------------------------------------------------------------------------------------------------


class _LlavaHfBatching:
    """Prompts and generation for ``LlavaHf`` (LLaVA-1.5 / NeXT / OneVision), at every batch size.

    **Prompts.** ``LlavaHf`` renders ``[{"role": "user", "content": "<image>\\n" + context}]`` with
    ``tokenizer.apply_chat_template``. Checkpoints saved by transformers 5 (``chat_template.jinja``)
    and the legacy ``chat_template.json`` ones both put the *processor's* template on the tokenizer
    too; that template expects ``content`` as a list of ``{"type": "image"}`` / ``{"type": "text"}``
    parts, so string content renders ``USER: ASSISTANT:`` and the image token is lost (the
    processor then fails with "Found total 0 <image> tokens and 1 images"). Here the template
    (``chat_template=`` argument, else the processor's, else the tokenizer's, else lmms-eval's
    Vicuna default) is probed once: a template that renders list content gets the visuals as
    ``image`` / ``video`` parts and the context (without ``<image>`` markers) as a text part,
    rendered by the processor; a string-content template (lmms-eval's Vicuna default, a custom
    one) gets ``LlavaHf``'s own string prompt.

    **Generation.** Image and text-only requests are batched (left padding; lmms-eval's
    ``LlavaHf`` asserts batch size 1), batch size 1 included, so that both go through the same
    prompts; video requests run one at a time like ``LlavaHf``'s. Generation settings are
    ``LlavaHf.generate_until``'s (which, like here, does not cut the answer at ``until``).
    """

    def _llava_template(self) -> tuple[str, bool]:
        """(template, takes list content)."""
        from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE

        template = (
            self.chat_template
            or getattr(self._image_processor, "chat_template", None)
            or getattr(self.tokenizer, "chat_template", None)
            or VICUNA_CHAT_TEMPLATE
        )
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default") or next(iter(template.values()))
        cache = getattr(self, "_tc_template_kind", None)
        if cache is None or cache[0] != template:
            probe = "tokencomp-probe-7f3a"
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe}]}],
                    chat_template=template, tokenize=False, add_generation_prompt=True,
                )
                takes_list = isinstance(text, str) and probe in text and "'type'" not in text
            except Exception:
                takes_list = False
            cache = self._tc_template_kind = (template, takes_list)
        return cache

    def _llava_prompt(self, context: str, n_images: int, continuation: Optional[str] = None, video: bool = False) -> str:
        from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN

        template, takes_list = self._llava_template()
        marker = DEFAULT_VIDEO_TOKEN if video else DEFAULT_IMAGE_TOKEN
        if takes_list:
            text = context
            if n_images:
                text = "\n".join(line.strip() for line in context.replace(marker, "\n").split("\n")).strip("\n")
            parts = [{"type": "video" if video else "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
            messages = [{"role": "user", "content": parts}]
            if continuation is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": continuation}]})
        else:
            if n_images and (continuation is not None or marker not in context):
                context = " ".join([marker] * n_images) + "\n" + context
            messages = [{"role": "user", "content": context}]
            if continuation is not None:
                messages.append({"role": "assistant", "content": continuation})
        render = self._image_processor if takes_list else self.tokenizer
        return render.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=continuation is None
        )

    def loglikelihood(self, requests):
        """``LlavaHf.loglikelihood``'s result convention (mean continuation loss, greedy match) with
        the prompts above; lmms-eval 0.7.3's own cannot run on transformers 5 (it calls the processor
        on ``<image>`` text without images to measure the context length).

        Note: lmms-eval 0.7.3 (the newest release on PyPI) cannot score *any* model's
        ``loglikelihood`` / ``multiple_choice`` task through its evaluator: ``evaluator.py`` passes
        every response through ``api.instance.unwrap_generation_output``, which turns the
        ``(loglikelihood, is_greedy)`` tuple into its ``str()``, and the task's ``process_results``
        then fails on the string. No released lmms-eval fixes it yet; this method is tested directly.
        """
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
            with torch.no_grad():  # not inference_mode: tokencomp's engine tracks tensor versions
                out = self.model(**inputs, labels=labels)
            greedy = out["logits"][:, ctx_len - 1 : -1].argmax(dim=-1)
            res.append((float(out["loss"].item()), bool((greedy == ids[:, ctx_len:]).all())))
        return res

    def _llava_generate(self, inputs, gen_kwargs: dict) -> list[str]:
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
        return self.tokenizer.batch_decode(cont[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def generate_until(self, requests):
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
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        for i in video_idx:  # one at a time, like LlavaHf
            context, gen_kwargs = requests[i].args[:2]
            gen_kwargs = dict(gen_kwargs)
            gen_kwargs.pop("until", None)
            try:
                videos = [self.load_video(visuals_of[i], self.max_frames_num)]
            except Exception as exc:  # LlavaHf's convention: an empty answer
                from loguru import logger

                logger.info(f"Error {exc} when loading video : {visuals_of[i]}")
                out[i] = ""
            else:
                text = self._llava_prompt(context, len(videos), video=True)
                out[i] = self._llava_generate(self._image_processor(videos=videos, text=text, return_tensors="pt"), gen_kwargs)[0]
            self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), out[i])
            pbar.update(1)
        if image_idx:
            items = [requests[i].args + (i,) for i in image_idx]
            collator = utils.Collator(items, lambda x: (-len(self.tok_encode(x[0])), x[0]), grouping=True)
            results = []
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
                answers = self._llava_generate(inputs, gen_kwargs)
                for ctx, ans, gk in zip(contexts, answers, all_gen_kwargs):
                    results.append(ans)
                    self.cache_hook.add_partial("generate_until", (ctx, gk), ans)
                pbar.update(len(chunk))
            for i, ans in zip(image_idx, collator.get_original(results)):
                out[i] = ans
        pbar.close()
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
        attrs = {"__module__": __name__, "is_simple": True, "_tc_base": base}
        cls = type(_NAMES[base], (TokencompModel, *_EXTRA.get(base, ()), parent), attrs)
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
