"""The mixin over lmms-eval's model classes: load as the parent does, then hand everything to a
:class:`~.session.Session` (the one attribute it adds to lmms-eval's instance is ``_tokencomp``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .devices import map_device, one_process_accelerator
from .session import Session
from .stats import describe

__all__ = ["TokencompModel", "report"]


def _is_vanilla(recipe) -> bool:
    return recipe is None or (isinstance(recipe, str) and recipe.strip().lower() in ("", "none", "vanilla"))


class TokencompModel:
    """Mixin over an lmms-eval model class: applies a recipe after the parent loaded the model,
    records statistics per task, and reports them at the end of the run.

    Extra arguments: ``recipe`` (path, shipped name, YAML text; ``none`` = untouched),
    ``stats_path`` (write the statistics as JSON there at the end) and ``base`` (ignored here:
    consumed by :class:`~.factory.Tokencomp`).
    """

    _tokencomp: Optional[Session] = None
    _tokencomp_base: Optional[str] = None  # the lmms-eval model name, set on the classes model_class() builds

    def __init__(self, *args, recipe: Optional[str] = None, stats_path: Optional[str] = None, base: Optional[str] = None, **kwargs):
        import tokencomp  # recipes are checked before the (slow) model load

        loaded = None if _is_vanilla(recipe) else tokencomp.load_recipe(recipe)
        kwargs, cpu_data_parallel = map_device(self._tokencomp_base, kwargs)
        if cpu_data_parallel:
            from .factory import BASES

            # lmms-eval's classes hard-code cuda:<rank> (and DDP on GPUs) whenever accelerate runs several
            # processes; on CPUs each rank loads the model on its device and takes its share of the docs.
            with one_process_accelerator(BASES[self._tokencomp_base][0]) as made:
                super().__init__(*args, **kwargs)
            accelerator = made[0]
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        else:
            super().__init__(*args, **kwargs)
        self._tokencomp_start(loaded, recipe if isinstance(recipe, str) else None, stats_path)

    def _tokencomp_start(self, recipe, name: Optional[str], stats_path: Optional[str]) -> None:
        """Apply ``recipe`` (a loaded :class:`~tokencomp.Recipe`, or None) to the parent's model."""
        self._tokencomp = Session(self.model, recipe, name=name, stats_path=stats_path, pretrained=getattr(self, "pretrained", None))
        if int(self.batch_size) > 1:  # batched generation needs left padding (some checkpoints say right)
            for tok in (getattr(getattr(self, "processor", None), "tokenizer", None), getattr(self, "_tokenizer", None)):
                if tok is not None:
                    tok.padding_side = "left"

    @property
    def tokencomp_session(self) -> Optional[Session]:
        """The :class:`~.session.Session` of this run (its handle, current task and statistics)."""
        return self._tokencomp

    @property
    def tokencomp_handle(self):
        """The :class:`tokencomp.Handle` of the applied recipe (None when running untouched or removed)."""
        return self._tokencomp.handle if self._tokencomp is not None else None

    def tokencomp_remove(self) -> None:
        """Remove the recipe and the statistics hooks (the model is left as the parent loaded it)."""
        if self._tokencomp is not None:
            self._tokencomp.remove()

    def tokencomp_summary(self) -> dict[str, Any]:
        """Statistics of this process so far: overall and per task."""
        return self._tokencomp.summary()

    def generate_until(self, requests):
        return self._tokencomp.by_task(super().generate_until, requests, timed=True)

    def loglikelihood(self, requests):
        return self._tokencomp.by_task(super().loglikelihood, requests)

    def clean(self):
        # lmms-eval calls clean() once at the end of the run, on every rank
        session = self._tokencomp
        if session is not None and session.final is None:
            summary = session.finish(int(getattr(self, "world_size", 1) or 1))
            if int(getattr(self, "rank", 0) or 0) == 0:
                report(summary, session.stats_path)
        self.tokencomp_remove()
        return super().clean()


def report(summary: dict, stats_path: Optional[str]) -> None:
    """Log the run's statistics, write them as JSON to ``stats_path`` (if given) and add them to
    lmms-eval's results JSON under ``throughput`` (``avg_tokencomp_*``, with the generation numbers)."""
    from loguru import logger  # lmms-eval's logger

    logger.info(describe(summary))
    if stats_path:
        path = Path(stats_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
    o = summary["overall"]
    ours = {
        "tokencomp_vision_tokens": o["vision_tokens_avg"],
        "tokencomp_vision_tokens_in": o["vision_tokens_in"],
        "tokencomp_prefill_flops_ratio": o["prefill_flops_ratio"],
        "tokencomp_samples": o["samples"],
    }
    try:
        from lmms_eval.models.model_utils import gen_metrics
    except ImportError:  # an lmms-eval without gen_metrics: the statistics are in the log and stats_path only
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
