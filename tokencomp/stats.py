"""What a compressed prefill did: :class:`Stats`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Stats:
    """What the last compressed forward (the prefill of a ``generate``) did.

    One orientation: every per-sample field is indexed by the sample ``b`` first; its name says what
    each sample's entry holds.

    ``vision_tokens_per_layer[b][l]``: vision tokens of sample ``b`` entering decoder layer ``l``.
    ``kept_positions_per_stage[b][layer]``: original sequence positions of the vision tokens sample
    ``b`` kept at the stage before ``layer`` (summary tokens of a merger included, in their slots'
    positions); ``summary_positions_per_stage[b][layer]``: the slots given to summary tokens (stages
    with a merger only; a merger may lay its image's held states out in another order, see
    :class:`tokencomp.Merger`). ``output_positions``: (B, S) original position of every token the decoder
    returned (its output is shorter than the input after a drop).

    ``kept_positions[layer][b]`` and ``summary_positions[layer][b]`` are the same, stage first: read-only
    views kept for code written against earlier versions (and what :meth:`Handle.replay` takes).
    """

    vision_tokens_per_layer: list[list[int]] = field(default_factory=list)
    kept_positions_per_stage: list[dict[int, torch.Tensor]] = field(default_factory=list)
    summary_positions_per_stage: list[dict[int, torch.Tensor]] = field(default_factory=list)
    output_positions: Optional[torch.Tensor] = None
    sequence_length: int = 0
    input_vision_tokens: list[int] = field(default_factory=list)
    """Per sample, the vision tokens of the prompt (before any stage; an input stage already reduces
    ``vision_tokens_per_layer[b][0]``)."""
    real_tokens: list[int] = field(default_factory=list)
    """Per sample, the prompt's real (non-padding) tokens."""

    @property
    def kept_positions(self) -> dict[int, list[torch.Tensor]]:
        """``kept_positions_per_stage`` stage first: ``{layer: [positions of sample b, ...]}`` (read-only)."""
        return _stage_first(self.kept_positions_per_stage)

    @property
    def summary_positions(self) -> dict[int, list[torch.Tensor]]:
        """``summary_positions_per_stage`` stage first: ``{layer: [slots of sample b, ...]}`` (read-only)."""
        return _stage_first(self.summary_positions_per_stage)

    def average_vision_tokens(self) -> list[float]:
        """Per sample, the mean over layers of the vision tokens (the papers' token budget)."""
        return [sum(row) / len(row) for row in self.vision_tokens_per_layer if row]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (positions stage first, as in earlier versions)."""
        return {
            "vision_tokens_per_layer": self.vision_tokens_per_layer,
            "kept_positions": {str(k): [t.tolist() for t in v] for k, v in self.kept_positions.items()},
            "summary_positions": {str(k): [t.tolist() for t in v] for k, v in self.summary_positions.items()},
            "sequence_length": self.sequence_length,
            "input_vision_tokens": self.input_vision_tokens,
            "real_tokens": self.real_tokens,
            "average_vision_tokens": self.average_vision_tokens(),
        }


def _stage_first(per_sample: list[dict[int, torch.Tensor]]) -> dict[int, list[torch.Tensor]]:
    """``[{layer: t}]`` per sample as ``{layer: [t per sample]}`` (every sample has the same stages)."""
    layers = sorted({layer for sample in per_sample for layer in sample})
    return {layer: [sample[layer] for sample in per_sample] for layer in layers}
