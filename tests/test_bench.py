"""Benchmark plumbing: the FLOP model against hand counts, well-formed bench output."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tokencomp
from tokencomp.bench import bench, format_markdown_row, format_report
from tokencomp.flops import DecoderShape, decode_flops, kv_cache_bytes, layer_flops, prefill_flops
from tokencomp.testing import build_synthetic, build_tiny


def _hand_count(D, H, Hkv, d, I, new, cached):
    """Count multiply-adds of one layer by walking its matrix products one by one."""
    macs = 0
    macs += new * D * (H * d)  # q_proj
    macs += 2 * new * D * (Hkv * d)  # k_proj, v_proj
    macs += new * (H * d) * D  # o_proj
    macs += 3 * new * D * I  # gate, up, down
    for i in range(1, new + 1):  # query i sees the cache and the first i new tokens
        keys = cached + i
        macs += H * d * keys  # q . k
        macs += H * d * keys  # p . v
    return 2 * macs


@pytest.mark.parametrize("new, cached", [(1, 0), (5, 0), (1, 7), (3, 4)])
def test_layer_flops_match_hand_count(new, cached):
    shape = DecoderShape(hidden=12, heads=4, kv_heads=2, head_dim=3, intermediate=20, layers=2)
    assert layer_flops(shape, new, cached) == _hand_count(12, 4, 2, 3, 20, new, cached)


def test_schedule_flops_and_kv_bytes():
    shape = DecoderShape(hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, layers=3)
    tokens = [10, 6, 6]
    assert prefill_flops(shape, tokens) == sum(_hand_count(8, 2, 1, 4, 16, n, 0) for n in tokens)
    assert decode_flops(shape, tokens, 2) == sum(_hand_count(8, 2, 1, 4, 16, 1, c + t) for c in tokens for t in range(2))
    assert kv_cache_bytes(shape, tokens, 2) == sum(2 * 1 * 4 * n * 2 for n in tokens)
    model = build_tiny("qwen2_vl")
    s = DecoderShape.from_config(model.config)
    assert (s.hidden, s.heads, s.kv_heads, s.head_dim, s.layers) == (64, 4, 2, 16, 6)


def test_bench_output_is_well_formed():
    model = build_synthetic("llava-1.5-7b:layers=6,hidden=64,heads=4,kv_heads=2,intermediate=128")
    recipe = {"scorer": "v2drop", "schedule": {"stages": [{"layer": 2, "keep": 0.5}, {"layer": 4, "keep": 0.0}]}}
    rep = bench(model, recipe, vision_tokens=40, text_tokens=10, new_tokens=2, repeat=2, progress=False)
    json.dumps(rep)  # serialisable
    assert rep["vision_tokens_per_layer"] == [40, 40, 20, 20, 0, 0]
    assert math.isclose(rep["average_vision_tokens"], 120 / 6)
    m = rep["metrics"]
    for key in ("prefill_s", "decode_tokens_per_s", "generate_s", "kv_cache_bytes", "prefill_flops", "decode_flops"):
        assert m[key]["baseline"] > 0 and m[key]["compressed"] > 0, key
        assert math.isclose(m[key]["ratio"], m[key]["compressed"] / m[key]["baseline"])
    shape = DecoderShape.from_config(model.config)
    assert m["prefill_flops"]["compressed"] == prefill_flops(shape, [50, 50, 30, 30, 10, 10])
    # The measured KV cache is exactly the analytic one (fp32 keys and values, kept tokens per layer).
    assert m["kv_cache_bytes"]["compressed"] == rep["kv_cache_bytes_analytic"]["compressed"]
    assert m["kv_cache_bytes"]["baseline"] == rep["kv_cache_bytes_analytic"]["baseline"]
    assert 0 <= rep["overhead_share"] < 1
    assert math.isclose(rep["prefill_efficiency"], m["prefill_s"]["ratio"] / rep["flop_ratio"])
    text = format_report(rep)
    assert "efficiency" in text and "prefill_s" in text
    assert format_markdown_row(rep).count("|") == 13


def test_bench_cli_json(tmp_path, capsys):
    from tokencomp.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("scorer: fastv\nschedule:\n  stages:\n    - {layer: 2, keep: 0.5}\n")
    out = tmp_path / "b.json"
    code = main([
        "bench", str(recipe), "--synthetic", "qwen2-vl-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128",
        "--vision-tokens", "16", "32", "--text-tokens", "8", "--new-tokens", "1", "--repeat", "1",
        "--json", str(out), "--markdown",
    ])
    assert code == 0
    data = json.loads(out.read_text())
    assert [d["vision_tokens"] for d in data] == [16, 32]
    assert data[1]["vision_tokens_per_layer"] == [32, 32, 16, 16]
    assert "| recipe |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs",
    [{"vision_tokens": 0}, {"text_tokens": -1}, {"batch": 0}, {"new_tokens": -1}, {"repeat": 0}, {"repeat": 1.5}, {"batch": True}],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bench_rejects_sizes_out_of_range(kwargs):
    """Before any model work (no model is even needed), with the name and the value."""
    from tokencomp.errors import UsageError

    ((name, value),) = kwargs.items()
    with pytest.raises(UsageError, match=f"{name} must be an integer >= ., got {value!r}"):
        bench(None, {}, **kwargs)


def test_bench_interrupted_carries_the_complete_rounds(monkeypatch):
    """Ctrl-C in round 3 of 3: a KeyboardInterrupt whose report holds rounds 1-2 only."""
    import tokencomp.bench as tb

    real, calls = tb._run, []

    def run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 * 3 + 2:  # second variant of round 3: its first variant must be dropped too
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tb, "_run", run)
    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128")
    recipe = {"scorer": "v2drop", "schedule": {"stages": [{"layer": 2, "keep": 0.5}]}}
    with pytest.raises(KeyboardInterrupt) as info:
        bench(model, recipe, vision_tokens=8, text_tokens=2, new_tokens=1, repeat=3, progress=False)
    assert isinstance(info.value, tb.BenchInterrupted)
    rep = info.value.report
    json.dumps(rep)
    assert rep["partial"] is True and rep["repeat"] == 2 and rep["repeat_requested"] == 3
    assert rep["vision_tokens_per_layer"] == [8, 8, 4, 4]
    assert "PARTIAL: interrupted after 2 of 3 rounds" in format_report(rep)
    tokencomp.apply(model, recipe).remove()  # the interrupted round's hooks were removed: applies again
