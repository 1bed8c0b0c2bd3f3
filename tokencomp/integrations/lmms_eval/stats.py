"""Statistics of one evaluation run: per task, the vision tokens each decoder layer received and the
text decoder's prefill FLOPs relative to the untouched model, and the generation throughput.

Imports neither lmms-eval nor accelerate (usable and tested without them). The numbers come from
each prefill's :class:`~tokencomp.stats.Stats`; FLOPs are counted by
:func:`tokencomp.flops.prefill_flops_compared`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Sequence

import torch

from ...flops import DecoderShape, prefill_flops_compared
from ...stats import Stats

__all__ = ["Totals", "RunStats", "summary", "describe", "new_tokens"]


def _add_into(acc: list[float], values: Sequence[float]) -> None:
    """``acc += values`` element-wise, growing ``acc`` to the longer length."""
    if len(acc) < len(values):
        acc += [0.0] * (len(values) - len(acc))
    for i, v in enumerate(values):
        acc[i] += v


class Totals:
    """Sums over the recorded prompts of one task (merged across data-parallel ranks)."""

    def __init__(self) -> None:
        self.samples = 0  # prompts with vision tokens
        self.vision_in = 0.0  # vision tokens entering layer 0
        self.vision_avg = 0.0  # their mean over layers
        self.per_layer: list[float] = []
        self.flops = 0.0
        self.flops_vanilla = 0.0
        self.gen_requests = 0  # generate_until requests answered
        self.gen_tokens = 0  # tokens of their answers (see new_tokens)
        self.gen_seconds = 0.0  # wall time spent in generate_until

    def add_prefill(self, shape: DecoderShape, stats: Stats) -> None:
        """Every prompt of one prefill: its vision tokens per layer, and the FLOPs with and without compression."""
        for row, vision, real in zip(stats.vision_tokens_per_layer, stats.input_vision_tokens, stats.real_tokens):
            vanilla, flops = prefill_flops_compared(shape, real, vision, row)
            self.samples += 1
            self.vision_in += row[0] if row else 0
            self.vision_avg += sum(row) / len(row) if row else 0
            _add_into(self.per_layer, row)
            self.flops += flops
            self.flops_vanilla += vanilla

    def add_generation(self, requests: int, tokens: int, seconds: float) -> None:
        """``requests`` answered with ``tokens`` generated tokens in ``seconds``."""
        self.gen_requests += requests
        self.gen_tokens += tokens
        self.gen_seconds += seconds

    def merge(self, other: "Totals") -> None:
        """Add another rank's sums."""
        self.samples += other.samples
        self.vision_in += other.vision_in
        self.vision_avg += other.vision_avg
        _add_into(self.per_layer, other.per_layer)
        self.flops += other.flops
        self.flops_vanilla += other.flops_vanilla
        self.add_generation(other.gen_requests, other.gen_tokens, other.gen_seconds)

    def summary(self) -> dict[str, Any]:
        """Means per prompt, the FLOPs ratio and the generation numbers (JSON-friendly)."""
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


class RunStats:
    """The :class:`Totals` of each task, in this process."""

    def __init__(self, shape: DecoderShape) -> None:
        self.shape = shape
        self.tasks: dict[str, Totals] = defaultdict(Totals)

    def record(self, task: str, stats: Stats) -> None:
        """One prefill of ``task``."""
        self.tasks[task].add_prefill(self.shape, stats)

    def gathered(self, world_size: int = 1) -> tuple[dict[str, Totals], list[int]]:
        """The totals of every rank merged (when ``torch.distributed`` runs ``world_size > 1``
        processes; every rank must call this), and the prompts each rank recorded."""
        tasks = dict(self.tasks)
        dist = torch.distributed
        if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return tasks, [sum(t.samples for t in tasks.values())]
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, tasks)
        merged: dict[str, Totals] = defaultdict(Totals)
        for part in parts:
            for task, t in part.items():
                merged[task].merge(t)
        return dict(merged), [sum(t.samples for t in part.values()) for part in parts]


def summary(tasks: dict[str, Totals], recipe: Optional[str], model: Optional[str], layers: int) -> dict[str, Any]:
    """The run's statistics: overall and per task (what ``stats_path`` receives)."""
    overall = Totals()
    for t in tasks.values():
        overall.merge(t)
    return {
        "model": model,
        "recipe": recipe,
        "decoder_layers": layers,
        "overall": overall.summary(),
        "tasks": {task: t.summary() for task, t in sorted(tasks.items())},
    }


def describe(summary: dict[str, Any]) -> str:
    """One log line for a :func:`summary`."""
    o = summary["overall"]
    return (
        f"tokencomp [{summary['recipe'] or 'vanilla'}]: {o['samples']} prefills, vision tokens "
        f"{o['vision_tokens_in']:.1f} in, {o['vision_tokens_avg']:.1f} average over layers, "
        f"prefill FLOPs x{o['prefill_flops_ratio']:.3f}"
    )


def new_tokens(output, input_ids: Optional[torch.Tensor], eos) -> int:
    """Tokens one ``generate`` call produced: per row, up to and including its first ``eos`` (the
    padding after it is not counted). 0 when ``output`` holds no (batch, length) sequences."""
    sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
    if not isinstance(sequences, torch.Tensor) or sequences.ndim != 2:
        return 0
    start = input_ids.shape[1] if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 else 0
    new = sequences[:, start:]
    if eos is None:
        return int(new.numel())
    is_eos = torch.isin(new, torch.as_tensor(eos, device=new.device).reshape(-1))
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1], dtype=torch.long))
    return int(first.sum())
