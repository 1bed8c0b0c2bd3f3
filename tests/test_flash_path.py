"""The FlashAttention code path, emulated on CPU.

FlashAttention-2 cannot run here (no GPU), but what tokencomp does for it can: the text decoder
gets 2-D ``(B, KV)`` padding masks (or None) and, after a drop, no position ids. A CPU attention
function registered under a name containing "flash" receives exactly what the real kernel would
and computes varlen-style causal attention from the 2-D mask, so the engine's flash branch
(mask gathers, filler slots, decode remap) is checked against the untouched sdpa model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import tokencomp
from tokencomp.testing import build_tiny, make_inputs, suppress_ids, take_sample

NAME = "tokencomp_test_flash"
seen = {"masks": [], "position_ids": []}


def cpu_flash(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Reference 'flash' attention: causal, bottom-right aligned, keys masked by a 2-D mask."""
    seen["masks"].append(None if attention_mask is None else tuple(attention_mask.shape))
    seen["position_ids"].append(kwargs.get("position_ids"))
    B, H, S, d = query.shape
    KV = key.shape[2]
    rep = H // key.shape[1]
    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1)
    logits = query @ k.transpose(-1, -2) * (scaling if scaling is not None else d**-0.5)
    causal = torch.arange(KV)[None, :] <= torch.arange(KV - S, KV)[:, None]
    allowed = causal[None, None].expand(B, 1, S, KV)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    # Flash un-pads: a query that is itself masked out produces zeros, never NaN.
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def flash_name():
    AttentionInterface.register(NAME, cpu_flash)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    yield NAME
    AttentionInterface._global_mapping.pop(NAME, None)
    AttentionMaskInterface._global_mapping.pop(NAME, None)


def _model(family, name):
    model = build_tiny(family, attn="sdpa")
    model.config.get_text_config()._attn_implementation_internal = name
    assert model.config.get_text_config()._attn_implementation == name
    return model


RECIPE = {"scorer": "v2drop", "schedule": {"stages": [{"layer": 1, "keep": 0.5}, {"layer": 3, "keep": 0.5}, {"layer": 5, "keep": 0.0}]}}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_flash_path_matches_sdpa_and_solo(family, flash_name):
    """Emulated flash, padded + ragged batch: equal to the sdpa model, to solo runs, and cache-free
    recomputation; layers after a drop get no position ids and 2-D masks only."""
    flash = _model(family, flash_name)
    sdpa = build_tiny(family, attn="sdpa")
    sizes = {"llava": None}.get(family, [(112, 224), (56, 112)])
    inputs = make_inputs(sdpa, batch=2, image_sizes=sizes)
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=suppress_ids(sdpa) + [2], output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), tokencomp.apply(sdpa, RECIPE):
        ref = sdpa.generate(**inputs, **kw)
    seen["masks"].clear()
    seen["position_ids"].clear()
    with torch.no_grad(), tokencomp.apply(flash, RECIPE) as h:
        got = flash.generate(**inputs, **kw)
        assert any(p is None for p in seen["position_ids"])  # layers after a drop
        assert all(m is None or len(m) == 2 for m in seen["masks"])
        with h.replay(h.stats.kept_positions):
            fresh = flash.generate(**inputs, use_cache=False, **kw)
        solo = [flash.generate(**take_sample(inputs, b), **kw) for b in range(2)]
    assert torch.equal(ref.sequences, got.sequences)
    assert torch.equal(got.sequences, fresh.sequences)
    n = got.sequences.shape[1] - inputs["input_ids"].shape[1]
    for b in range(2):
        assert torch.equal(solo[b].sequences[0, -n:], got.sequences[b, -n:])
    for x, y in zip(ref.scores, got.scores):
        finite = torch.isfinite(x)
        assert (x - y)[finite].abs().max() < 1e-4
