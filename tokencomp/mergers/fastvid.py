"""FastVID's density-based token merging (DTM; LunarShen/FastVID @ a40a109,
``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`` L987-L1060):
every non-salient token of a segment goes to its most cosine-similar context token of each anchor
frame, and a kept context token becomes ``w·x + (1 − w)·mean(assigned)`` with
``w = max(β, 1 / (assigned + 1))`` (the context token is one of its own assigned tokens). The mean
counts every assigned token, also those that stay on their own (another anchor frame's context tokens,
tokens a larger budget keeps), as the official code averages all non-salient tokens. Segments,
salient and context tokens are those of the ``fastvid`` scorer: use the same parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger
from tokencomp.mergers.recycle import apply_merges, shared_plan
from tokencomp.scorers.fastvid import fastvid_plan


@dataclass(frozen=True)
class FastVIDMerger(Merger):
    """FastVID DTM: blend the segment's other tokens into each anchor frame's context tokens."""

    name = "fastvid"

    c: int = field(default=8, metadata={"min": 1})
    tau: float = field(default=0.9, metadata={"min": -1.0, "max": 1.0})
    d: float = field(default=0.4, metadata={"min": 0.0, "max": 1.0})
    p: int = field(default=4, metadata={"min": 1})
    beta: float = field(default=0.6, metadata={"min": 0.0, "max": 1.0})
    """Minimum weight of the context token itself."""

    def merge(self, view: LayerView, kept, dropped, summary):
        out = view.hidden.clone()
        for b, (_, merges) in enumerate(shared_plan(fastvid_plan, view, self.c, self.tau, self.d, self.p)):
            apply_merges(view.hidden, out, b, kept, merges, beta=self.beta, kept_members=True)
        return out, torch.zeros_like(kept)


@tokencomp.hookimpl
def register_mergers(register):
    register(FastVIDMerger)
