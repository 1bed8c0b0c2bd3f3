"""One evaluation run on a loaded model: the :class:`Session` that ``--model tokencomp`` delegates to.

Imports neither lmms-eval nor accelerate: a session works on any Hugging Face model an adapter
supports (tested without lmms-eval). Which forward is a prefill comes from the engine: under a
recipe, :meth:`Handle.on_prefill <tokencomp.engine.Handle.on_prefill>` hands over each compressed
prefill's :class:`~tokencomp.stats.Stats`; untouched, :func:`~tokencomp.engine.prompt_vision_mask`
(the engine's own test) picks the forwards it would have compressed.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import torch

from ...engine import apply, prompt_vision_mask
from ...flops import DecoderShape
from ...loglik import causal_lm_loss
from ...plugins import registry
from ...recipe import Recipe
from ...stats import Stats
from .stats import RunStats, new_tokens, summary

__all__ = ["Session"]


class _Call:
    """One model forward in progress: its prefill's statistics (None if it was no prefill with vision
    tokens) and the ``labels`` taken from it (scored on the compacted logits afterwards)."""

    __slots__ = ("stats", "labels")

    def __init__(self) -> None:
        self.stats: Optional[Stats] = None
        self.labels: Optional[torch.Tensor] = None


def _untouched_stats(is_vision: torch.Tensor, attention_mask: Optional[torch.Tensor], layers: int) -> Stats:
    """An untouched prefill described as the engine describes a compressed one: every vision token
    enters every layer."""
    vision = is_vision.sum(1).tolist()
    if attention_mask is not None and attention_mask.ndim == 2:
        real = attention_mask.to(torch.bool).sum(1).tolist()
    else:
        real = [is_vision.shape[1]] * len(vision)
    return Stats(vision_tokens_per_layer=[[n] * layers for n in vision], input_vision_tokens=vision, real_tokens=real)


class Session:
    """A recipe applied to ``model`` (or none: the untouched model, the vanilla row of a table) and the
    statistics of every prefill with vision tokens, per task.

    ``name``: the recipe as the user gave it (reported; None when untouched); ``stats_path``: where
    the run's statistics go at the end; ``pretrained``: the checkpoint, reported. ``labels`` given
    to a compressed forward are taken from it and scored here on the logits put back at their
    positions (:func:`tokencomp.loglik.causal_lm_loss`): the engine refuses them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        recipe: Optional[Recipe] = None,
        *,
        name: Optional[str] = None,
        stats_path: Optional[str] = None,
        pretrained: Optional[str] = None,
    ) -> None:
        self.model = model
        self.name = (name or recipe.name) if recipe is not None else None
        self.stats_path = stats_path
        self.pretrained = pretrained
        self.shape = DecoderShape.from_config(model.config)
        self.run = RunStats(self.shape)
        self.task = "unknown"
        """The task whose requests run now (set by :meth:`by_task`); prefills are counted under it."""
        self.final: Optional[dict[str, Any]] = None
        """The run's gathered statistics, once :meth:`finish` ran."""
        self.handle = apply(model, recipe) if recipe is not None else None
        self._tls = threading.local()
        self._generated = 0
        self._undo: list[Callable[[], None]] = []
        if self.handle is not None:
            self._undo.append(self.handle.remove)
            self._undo.append(self.handle.on_prefill(self._on_prefill))
            self._vision_ids = None
        else:
            self._vision_ids = torch.tensor(registry().adapter_for(model).vision_token_ids(), dtype=torch.long)
        # Ours run first (prepend) so that `labels` never reach the engine, and last (registered
        # after apply) so that the engine has handed over the prefill's Stats.
        self._undo.append(model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True).remove)
        self._undo.append(model.register_forward_hook(self._post, with_kwargs=True, always_call=True).remove)
        self._wrap_generate()

    def remove(self) -> None:
        """Remove the hooks, the ``generate`` wrapper and the recipe: the model is as it was given.
        The statistics stay readable."""
        while self._undo:
            self._undo.pop()()
        self.handle = None

    # ------------------------------------------------------------------ hooks

    def _calls(self) -> list[_Call]:
        calls = getattr(self._tls, "calls", None)
        if calls is None:
            calls = self._tls.calls = []
        return calls

    def _pre(self, module, args, kwargs):
        call = _Call()
        self._calls().append(call)
        if self.handle is None:
            is_vision = prompt_vision_mask(args, kwargs, self._vision_ids)
            if is_vision is not None:
                call.stats = _untouched_stats(is_vision, kwargs.get("attention_mask"), self.shape.layers)
            return None
        if kwargs.get("labels") is None:
            return None
        kwargs = dict(kwargs)
        call.labels = kwargs.pop("labels")
        return args, kwargs

    def _on_prefill(self, stats: Stats) -> None:
        calls = self._calls()
        if calls:
            calls[-1].stats = stats
        else:  # a forward that bypassed the module's hooks (``model.forward(...)``): still counted
            self.run.record(self.task, stats)

    def _post(self, module, args, kwargs, output):
        calls = self._calls()
        call = calls.pop() if calls else None
        if call is None or output is None:  # output is None when the forward raised
            return None
        if call.stats is not None:
            self.run.record(self.task, call.stats)
        if call.labels is None:
            return None
        positions = call.stats.output_positions if call.stats is not None else None
        loss, logits = causal_lm_loss(output.logits, call.labels, positions)
        output["logits"] = logits
        output["loss"] = loss
        return output

    def _wrap_generate(self) -> None:
        """Count the tokens every ``model.generate`` call produces (see :func:`~.stats.new_tokens`)."""
        model = self.model
        had, previous, original = "generate" in vars(model), vars(model).get("generate"), model.generate

        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            eos = kwargs.get("eos_token_id", getattr(getattr(model, "generation_config", None), "eos_token_id", None))
            self._generated += new_tokens(out, kwargs.get("input_ids", args[0] if args else None), eos)
            return out

        def restore() -> None:
            if vars(model).get("generate") is generate:
                if had:
                    model.generate = previous
                else:
                    del model.generate

        model.generate = generate
        self._undo.append(restore)

    # ------------------------------------------------------------------ requests and results

    def by_task(self, method: Callable[[list], list], requests: list, timed: bool = False) -> list:
        """``method`` run on the requests of each task in turn (``request.task_name``), so that the
        statistics are attributed; results in request order. ``timed``: also record the wall time and
        the generated tokens per task (lmms-eval's throughput numbers)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(getattr(req, "task_name", None) or "unknown", []).append(i)
        out: list = [None] * len(requests)
        for task, idx in groups.items():
            self.task = task
            start, generated = time.perf_counter(), self._generated
            try:
                res = method([requests[i] for i in idx])
            finally:
                self.task = "unknown"
            if timed:
                self.run.tasks[task].add_generation(len(idx), self._generated - generated, time.perf_counter() - start)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def summary(self) -> dict[str, Any]:
        """The statistics of this process so far: overall and per task."""
        return summary(self.run.tasks, self.name, self.pretrained, self.shape.layers)

    def finish(self, world_size: int = 1) -> dict[str, Any]:
        """The run's statistics gathered over ``world_size`` data-parallel ranks (every rank calls this;
        the first call gathers, later ones return the same), with ``samples_per_rank``."""
        if self.final is None:
            tasks, per_rank = self.run.gathered(world_size)
            self.final = summary(tasks, self.name, self.pretrained, self.shape.layers)
            self.final["samples_per_rank"] = per_rank
        return self.final
