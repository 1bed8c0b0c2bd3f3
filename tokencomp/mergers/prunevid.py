"""PruneVid stage-1 merging (Visual-AI/PruneVid @ b12600c, ``models/pllava/modeling_pllava.py``
``merge_frames_dynamic`` / ``compute_cluster_vectors``): each kept cluster centre becomes the mean of
its cluster; a static cluster's members are its positions' tokens in every frame of the window (the
mean of the window means). Windows and clusters are the ``prunevid`` scorer's: use the same
parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Merger
from tokencomp.mergers.recycle import apply_merges, shared_plan
from tokencomp.scorers.prunevid import prunevid_plan


@dataclass(frozen=True)
class PruneVidMerger(Merger):
    """PruneVid: each kept static / dynamic cluster centre becomes the mean of its cluster."""

    name = "prunevid"

    tau: float = field(default=0.8, metadata={"min": -1.0, "max": 1.0})
    temporal_ratio: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0})
    cluster_ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})

    def merge(self, view: LayerView, kept, dropped, summary):
        out = view.hidden.clone()
        for b, (_, merges) in enumerate(shared_plan(prunevid_plan, view, self.tau, self.temporal_ratio, self.cluster_ratio)):
            apply_merges(view.hidden, out, b, kept, merges)
        return out, torch.zeros_like(kept)


@tokencomp.hookimpl
def register_mergers(register):
    register(PruneVidMerger)
