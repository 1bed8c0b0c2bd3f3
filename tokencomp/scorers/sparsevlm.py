"""SparseVLM-style text raters (ICML 2025): text tokens most related to the image (by embedding
similarity) rate the vision tokens with their averaged attention rows at the previous layer.

Raters: ``M = softmax_text(V · Tᵀ)`` on the input embeddings, averaged over vision tokens; text
tokens whose score is above the mean are raters. As the official code
(``modelling_sparse_llama.py`` L199-L204, L253) they are chosen once, against all the prompt's vision
tokens, and every rater's row is averaged (``max_raters: 0``). Positions: kept tokens keep their
original positions (the official code renumbers the compacted sequence and overrides positions per
layer while decoding; tokencomp's engine keeps the positions the model gave). Recycling (pruned tokens clustered and added
back) is the ``recycle`` merger (tokencomp/mergers/recycle.py; recipes ``sparsevlm/*-recycle``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import tokencomp
from tokencomp.interfaces import LayerView, Scorer


@dataclass(frozen=True)
class SparseVLMScorer(Scorer):
    """Attention from relevant text "rater" tokens at the previous layer (SparseVLM)."""

    name = "sparsevlm"
    attention = "previous"
    needs_embeddings = True

    max_raters: int = 0
    """At most this many rater rows per sample (the most relevant ones); 0: every rater, as the official
    code averages them all."""

    def queries(self, view: LayerView) -> torch.Tensor:
        # The raters are chosen once, from the whole prompt: its text against *all* its vision tokens
        # (official: from the 576 image embeddings, reused at every stage), not against the vision
        # tokens an earlier stage left. Text is never dropped, so each rater is in the current sequence.
        whole = view.prompt_embeddings is not None
        emb = (view.prompt_embeddings if whole else view.embeddings).float()
        vis = view.prompt_vision_mask if whole else view.vision_mask
        pos = view.positions
        txt = torch.zeros_like(vis).scatter(1, pos, view.text_mask) if whole else view.text_mask
        last = pos.gather(1, view.last_index[:, None])[:, 0] if whole else view.last_index
        # Only text after the first vision token is the instruction (the prefix is the system prompt).
        first_vis = torch.where(vis.any(1), vis.float().argmax(1), torch.zeros_like(last))
        after = torch.arange(vis.shape[1], device=vis.device)[None] > first_vis[:, None]
        txt = txt & after
        # Similarities against each sample's text tokens only, gathered to the front and padded to the
        # longest: (B, L, T), never (B, L, L) (a video prompt has thousands of vision tokens).
        T = int(txt.sum(1).max())
        cols = torch.sort((~txt).to(torch.int8), dim=1, stable=True).indices[:, :T]  # (B, T)
        col_ok = txt.gather(1, cols)
        sim = torch.einsum("bvd,btd->bvt", emb, emb.gather(1, cols[..., None].expand(-1, -1, emb.shape[-1])))
        sim = sim.masked_fill(~col_ok[:, None, :], float("-inf"))
        probs = torch.softmax(sim, dim=-1).nan_to_num(0.0)
        m_t = (probs * vis[:, :, None]).sum(1) / vis.sum(1, keepdim=True).clamp(min=1)  # (B, T) over text
        mean = (m_t * col_ok).sum(1, keepdim=True) / col_ok.sum(1, keepdim=True).clamp(min=1)
        m = torch.zeros_like(txt, dtype=m_t.dtype).scatter(1, cols, m_t * col_ok)
        is_rater = torch.zeros_like(txt).scatter(1, cols, col_ok & (m_t > mean))
        # Fall back to the last token when nothing qualifies (e.g. a one-word question).
        none = ~is_rater.any(1)
        is_rater[none, last[none]] = True
        n = int(is_rater.sum(1).max())
        k = min(self.max_raters, n) if self.max_raters else n
        top = torch.topk(torch.where(is_rater, m, torch.full_like(m, -1.0)), k, dim=1)
        rows = top.indices
        if whole:  # prompt index -> index in the current sequence
            here = torch.full_like(vis, -1, dtype=torch.long).scatter(1, pos, torch.arange(pos.shape[1], device=pos.device).expand_as(pos))
            rows = here.gather(1, rows)
        return torch.where(top.values >= 0, rows, torch.full_like(rows, -1))

    def score(self, view: LayerView):
        att = view.attention  # (B, Q, S); padded rows are zero
        rows = (att.sum(-1) > 0).sum(1, keepdim=True).clamp(min=1)
        return att.sum(1) / rows

    def __post_init__(self):
        if self.max_raters < 0:
            raise ValueError("max_raters must be 0 (no limit) or more")


@tokencomp.hookimpl
def register_scorers(register):
    register(SparseVLMScorer)
