"""[CLS] attention of the vision encoder: how much the encoder's [CLS] query attends to each patch at
the layer the projector reads (head-averaged). FasterVLM (arXiv 2412.01818v1, ``Theia-4869/FasterVLM``
``llava_arch.py``) keeps the top tokens by it before the LLM; VisionZip (CVPR 2025) picks its
*dominant* tokens by it (summed over heads: the same order). Computed from that layer's own q/k
projections for the [CLS] row only, so the tower keeps its SDPA kernel.

The Qwen towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) have no [CLS] and give the no-[CLS] variant
(VisionZip's and VisPruner's choice for such towers): the attention each patch *receives* at the last
vision block, averaged over heads and over the queries of its attention segment (image, video frame,
or window where that block is windowed), summed over the 2x2 patches merged into one LLM token
(:mod:`tokencomp.models.qwen_vl`). LLaVA-OneVision's SigLIP tower has no [CLS] either; its adapter
reads the first token's row (:mod:`tokencomp.models.llava`). The adapter computes the signal
(:meth:`~tokencomp.interfaces.ModelAdapter.signal_names`); this scorer only reads it."""

from __future__ import annotations

from dataclasses import dataclass

import tokencomp
from tokencomp.interfaces import LayerView, Scorer


@dataclass(frozen=True)
class ClsAttentionScorer(Scorer):
    """Vision-encoder [CLS]→patch attention (FasterVLM; VisionZip's dominant tokens)."""

    name = "cls_attention"
    signals = ("cls_attention",)

    def score(self, view: LayerView):
        return view.signals["cls_attention"]


@tokencomp.hookimpl
def register_scorers(register):
    register(ClsAttentionScorer)
