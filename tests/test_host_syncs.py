"""Host synchronisations made by tokencomp's own code: none in a decode step, and a prefill's count
does not grow with the batch size (each one stalls a GPU pipeline)."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

import tokencomp
from tokencomp.testing import make_inputs

from test_engine import tiny

_SYNCING = ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero")


@contextlib.contextmanager
def count_syncs():
    """Record (method, file:line) of every syncing tensor call made directly from tokencomp's package.
    (Boolean-mask indexing also synchronises; it is not counted here.)"""
    calls: list = []
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCING}

    def ours() -> str | None:
        frame = sys._getframe(2)
        path = frame.f_code.co_filename.replace("\\", "/")
        return f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno}" if "/tokencomp/" in path and "/tests/" not in path else None

    def wrap(name):
        original = saved[name]

        def method(self, *args, **kwargs):
            where = ours()
            if where:
                calls.append((name, where))
            return original(self, *args, **kwargs)

        return method

    try:
        for name in _SYNCING:
            setattr(torch.Tensor, name, wrap(name))
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


RECIPE = {"schedule": {"stages": [{"layer": 1, "keep": 0.5}, {"layer": 3, "keep": 0.5}, {"layer": 5, "keep": 0.0}]}}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_decode_step_makes_no_host_sync(family, batch):
    model = tiny(family)
    inputs = make_inputs(model, batch=batch)
    with torch.no_grad(), tokencomp.apply(model, RECIPE):
        out = model(**inputs, use_cache=True)
        step = {
            "input_ids": torch.full((batch, 1), 20),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(batch, 1, dtype=torch.long)], 1),
            # explicit positions, as tokencomp bench does (Qwen otherwise reads state generate() leaves)
            "position_ids": torch.full((batch, 1), inputs["input_ids"].shape[1]),
        }
        with count_syncs() as calls:
            model(**step, cache=out.past_key_values, use_cache=True)
    assert calls == []


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prefill_syncs_do_not_grow_with_the_batch(family):
    model = tiny(family)
    counts = {}
    for batch in (1, 4):
        inputs = make_inputs(model, batch=batch)
        with torch.no_grad(), tokencomp.apply(model, RECIPE), count_syncs() as calls:
            model(**inputs, use_cache=True)
        counts[batch] = len(calls)
    assert counts[1] == counts[4], counts
    assert counts[1] <= 2 + 8 * len(RECIPE["schedule"]["stages"]), counts


def test_negative_control_the_counter_sees_a_sync(monkeypatch):
    """Without the has_dead flag known at the prefill, each decode step would ask the device."""
    from tokencomp import masks as M

    real = M.remap_decode_mask
    monkeypatch.setattr(M, "remap_decode_mask", lambda *a, has_dead=None, **k: real(*a, **k))
    model = tiny("llava")
    inputs = make_inputs(model, batch=2)
    with torch.no_grad(), tokencomp.apply(model, RECIPE):
        out = model(**inputs, use_cache=True)
        step = {
            "input_ids": torch.full((2, 1), 20),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1),
            "position_ids": torch.full((2, 1), inputs["input_ids"].shape[1]),
        }
        with count_syncs() as calls:
            model(**step, cache=out.past_key_values, use_cache=True)
    assert calls and all(name == "__bool__" for name, _ in calls)
