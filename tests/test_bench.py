"""Benchmark plumbing: the FLOP model against hand counts, well-formed bench output."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

import tokencomp
from tokencomp.bench import MARKDOWN_HEADER, bench, format_markdown_row, format_report
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


SMALL = "llava-1.5-7b:layers=6,hidden=64,heads=4,kv_heads=2,intermediate=128"
V2DROP = {"scorer": "v2drop", "schedule": {"stages": [{"layer": 2, "keep": 0.5}, {"layer": 4, "keep": 0.0}]}}
FASTV = {"scorer": "fastv", "schedule": {"stages": [{"layer": 2, "keep": 0.5}]}}
V2DROP_4 = {"scorer": "v2drop", "schedule": {"stages": [{"layer": 2, "keep": 0.5}]}}


def test_bench_output_is_well_formed():
    model = build_synthetic(SMALL)
    rep = bench(model, V2DROP, vision_tokens=40, text_tokens=10, new_tokens=2, repeat=2, progress=False)
    json.dumps(rep)  # serialisable
    assert rep["vision_tokens_per_layer"] == [40, 40, 20, 20, 0, 0]
    assert math.isclose(rep["average_vision_tokens"], 120 / 6)
    m = rep["metrics"]
    for key in ("prefill_s", "decode_tokens_per_s", "generate_s", "kv_cache_bytes", "prefill_flops", "decode_flops"):
        assert m[key]["baseline"] > 0 and m[key]["compressed"] > 0, key
    for key in ("kv_cache_bytes", "prefill_flops", "decode_flops", "peak_memory_bytes"):
        assert math.isclose(m[key]["ratio"], m[key]["compressed"] / m[key]["baseline"])
    for key in ("prefill_s", "decode_tokens_per_s", "generate_s"):  # timed: paired-round ratio and its interval
        row = m[key]
        assert row["ci"][0] <= row["ratio"] <= row["ci"][1], key
        assert 0 < row["ci_level"] < 1 and row["min_based"] > 0
    shape = DecoderShape.from_config(model.config)
    assert m["prefill_flops"]["compressed"] == prefill_flops(shape, [50, 50, 30, 30, 10, 10])
    # The measured KV cache is exactly the analytic one (fp32 keys and values, kept tokens per layer).
    assert m["kv_cache_bytes"]["compressed"] == rep["kv_cache_bytes_analytic"]["compressed"]
    assert m["kv_cache_bytes"]["baseline"] == rep["kv_cache_bytes_analytic"]["baseline"]
    assert 0 <= rep["overhead_share"] < 1
    assert math.isclose(rep["prefill_efficiency"], m["prefill_s"]["ratio"] / rep["flop_ratio"])
    # Variants: v2drop has no attention scorer, so no peer; the limit is fed the recipe's tokens.
    assert set(rep["variants"]) == {"untouched", "hooks", "recipe", "limit"} and rep["peer"] is None
    for name, v in rep["variants"].items():
        assert v["prefill_s"]["n"] == 2 and v["prefill_s"]["min"] <= v["prefill_s"]["median"] <= v["prefill_s"]["max"], name
        assert v["peak_memory_bytes"] is not None and v["kv_cache_bytes"] > 0, name
    assert rep["variants"]["limit"]["kv_cache_bytes"] == m["kv_cache_bytes"]["compressed"]
    for key in ("recipe/untouched", "hooks/untouched", "limit/untouched", "recipe/limit"):
        assert {"prefill", "decode"} <= set(rep["ratios"][key]), key
    assert rep["limit"]["prefill_ratio"] == rep["ratios"]["limit/untouched"]["prefill"]["median"]
    _check_llm_latency(rep)
    assert any("only 2 measured round" in w for w in rep["warnings"])
    text = format_report(rep)
    assert "efficiency" in text and "prefill_s" in text and "physical limit" in text
    assert format_markdown_row(rep).count("|") == MARKDOWN_HEADER.splitlines()[0].count("|")


def _check_llm_latency(rep):
    """The LLM generation latency is, round by round, the prefill plus the decode timed after it,
    paired like every other ratio; a result file without it (written before it existed) gets the
    same numbers from its per-round times."""
    import copy

    from tokencomp.bench import add_llm_latency

    v = rep["variants"]
    per_round = lambda name: [p + d for p, d in zip(v[name]["prefill_s"]["values"], v[name]["decode_s"]["values"])]  # noqa: E731
    for key, entry in rep["ratios"].items():
        num, den = key.split("/")
        want = [a / b for a, b in zip(per_round(num), per_round(den))]
        assert entry["llm"]["rounds"] == pytest.approx(want), key
        assert entry["llm"]["ci"][0] <= entry["llm"]["median"] <= entry["llm"]["ci"][1], key
    row = rep["metrics"]["llm_generation_s"]
    assert row["ratio"] == rep["ratios"]["recipe/untouched"]["llm"]["median"]
    assert math.isclose(row["baseline"], statistics.median(per_round("untouched")))
    assert math.isclose(row["compressed"], statistics.median(per_round("recipe")))
    old = copy.deepcopy(rep)
    del old["metrics"]["llm_generation_s"]
    for entry in old["ratios"].values():
        del entry["llm"]
    assert add_llm_latency(json.loads(json.dumps(old))) == json.loads(json.dumps(rep))


def test_llm_latency_needs_decode_rounds():
    """Without decode steps there is no generation latency: none is reported or printed."""
    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128")
    rep = bench(model, FASTV, vision_tokens=12, text_tokens=4, new_tokens=0, repeat=2, progress=False, limit=False, peer=False)
    assert "llm_generation_s" not in rep["metrics"] and all("llm" not in e for e in rep["ratios"].values())
    assert "llm_generation_s" not in format_report(rep)
    assert format_markdown_row(rep).count("|") == MARKDOWN_HEADER.splitlines()[0].count("|")


def test_timed_rounds_run_no_memory_sampler(monkeypatch):
    """Time and memory in separate passes: the clock never runs while a sampler does, and every
    variant gets exactly one memory pass."""
    import tokencomp.bench as tb

    state = {"active": False, "passes": 0, "clock": 0}

    class FakeSampler:
        def __init__(self, device):
            self.peak = 1

        def __enter__(self):
            state["active"] = True
            state["passes"] += 1
            return self

        def __exit__(self, *exc):
            state["active"] = False

    real_now = tb._now

    def now():
        assert not state["active"], "timed while the memory sampler ran"
        state["clock"] += 1
        return real_now()

    monkeypatch.setattr(tb, "PeakMemory", FakeSampler)
    monkeypatch.setattr(tb, "_now", now)
    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128")
    rep = bench(model, FASTV, vision_tokens=12, text_tokens=4, new_tokens=1, repeat=2, progress=False)
    assert set(rep["variants"]) == {"untouched", "hooks", "recipe", "peer", "limit"}
    assert state["passes"] == 5  # one memory pass per variant, none in the timed rounds
    assert state["clock"] > 0
    assert all(v["peak_memory_bytes"] == 1 for v in rep["variants"].values())


def test_limit_is_fed_the_recipes_tokens():
    """The limit variant's layers see exactly the recipe's per-layer token counts, and compute the
    same thing: its last-token logits equal the compressed model's."""
    import tokencomp.bench as tb

    model = build_synthetic(SMALL)
    rep = bench(model, V2DROP, vision_tokens=20, text_tokens=6, new_tokens=1, repeat=1, progress=False)
    assert rep["limit"]["tokens_per_layer"] == rep["tokens_per_layer"] == [26, 26, 16, 16, 6, 6]
    assert rep["variants"]["limit"]["tokens_per_layer"] == rep["tokens_per_layer"]

    for recipe in (V2DROP, FASTV, "{schedule: {stages: [{phase: input, keep: 0.5, scorer: uniform}, {layer: 3, keep: 0.5}]}}"):
        embeds, mask, vision, _ = tb.make_bench_inputs(model, 20, 6, 2, model.config.image_token_id)
        s = tb._Setup(model, embeds, mask, vision, 2, embeds.device, 5)
        rotary, decode_rotary = tb._capture_rotary(s)
        with tokencomp.apply(model, recipe) as handle, torch.no_grad(), handle.vision_mask(vision):
            want = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1).logits
            stats = handle.stats
        plan = tb.limit_plan(s, stats, rotary, decode_rotary, "sdpa")
        seen = []
        with torch.no_grad():
            got, cache = tb.limit_prefill(model, embeds, plan, record=seen)
            tb.limit_decode(model, cache, plan, 2, 5, 2)
        n_text = 6
        assert seen == [n_text + c for c in stats.vision_tokens_per_layer[0]] == plan.tokens_per_layer
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert [l.keys.shape[2] for l in cache.layers] == [n + 2 for n in seen]


@pytest.mark.parametrize("scorer", ["fastv", "pdrop", "sparsevlm"])
def test_peer_keeps_the_same_tokens_as_the_probes(scorer):
    """The peer variant (full eager attention matrix, as the original code) ranks exactly as
    tokencomp's q/k probes: same kept set; at the probed layer it really ran eager and returned
    the full (B, H, S, S) matrix."""
    import tokencomp.bench as tb

    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=8,kv_heads=4,intermediate=128")
    recipe = tokencomp.load_recipe({"scorer": scorer, "schedule": {"stages": [{"layer": 1, "keep": 0.5}, {"layer": 3, "keep": 0.25}]}})
    embeds, mask, vision, _ = tb.make_bench_inputs(model, 24, 8, 2, model.config.image_token_id)
    s = tb._Setup(model, embeds, mask, vision, 1, embeds.device, 5)
    ours = tb._HFRunner("recipe", recipe)
    ours.memory(s, tb.Variant("recipe"))
    full = tb._FullMatrix(set())
    shapes = {}
    real = full._wrap

    def spy(attn, original, p):
        inner = real(attn, original, p)

        def forward(*a, **kw):
            out = inner(*a, **kw)
            shapes[p] = tuple(out[1].shape) if out[1] is not None else None
            return out

        return forward

    full._wrap = spy
    peer = tb._HFRunner("peer", tb._peer_recipe(recipe, 4, full), before=full)
    peer.memory(s, tb.Variant("peer"))
    for layer in (1, 3):
        for b in range(2):
            assert torch.equal(peer.stats.kept_positions[layer][b], ours.stats.kept_positions[layer][b]), (layer, b)
    if scorer != "pdrop":  # attention at the previous layer: it ran eager, full matrix, all heads
        assert full.probe_layers == {0, 2}
        assert shapes[0] == (2, 8, 32, 32) and shapes[2][:2] == (2, 8) and shapes[2][2] == shapes[2][3] == 8 + 12
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert "forward" not in vars(tb._decoder_layers(model)[0].self_attn)  # wrappers removed


def test_input_stage_is_counted_from_layer_0():
    """An input stage (before layer 0): every layer, layer 0 included, runs on the kept tokens, in the
    FLOP count and in what the layers (and the limit) see."""
    model = build_synthetic(SMALL)
    rep = bench(model, "{schedule: {stages: [{phase: input, keep: 0.25, scorer: uniform}]}}",
                vision_tokens=40, text_tokens=10, new_tokens=1, repeat=1, progress=False)
    assert rep["vision_tokens_per_layer"] == [10] * 6
    assert rep["limit"]["tokens_per_layer"] == [20] * 6
    shape = DecoderShape.from_config(model.config)
    assert rep["metrics"]["prefill_flops"]["compressed"] == prefill_flops(shape, [20] * 6)
    assert rep["flop_ratio"] == prefill_flops(shape, [20] * 6) / prefill_flops(shape, [50] * 6)


def test_median_interval_and_paired_ratio():
    from tokencomp.bench import median_interval, paired_ratio

    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)
    lo, hi, level = median_interval(list(range(1, 11)))
    assert (lo, hi) == (2, 9) and level >= 0.9
    r = paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 2.0])
    assert r["median"] == 2.0 and r["ci"] == [1.5, 2.0] and r["min_based"] == 2.0 and r["n"] == 3


def test_progress_is_quiet_without_a_tty(capsys):
    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128")
    rep = bench(model, V2DROP | {"schedule": {"stages": [{"layer": 2, "keep": 0.5}]}}, vision_tokens=8, text_tokens=2,
                new_tokens=0, repeat=1, progress=True, limit=False)
    assert capsys.readouterr().err == ""
    # Nothing decoded: the report says so instead of printing nan rows.
    text = format_report(rep)
    assert "nan" not in text and "nothing decoded" in text and "kv_cache_bytes_after_decode" not in text


def test_no_generate_times_prefill_and_decode_only():
    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128")
    rep = bench(model, V2DROP_4, vision_tokens=8, text_tokens=2, new_tokens=2, repeat=2, progress=False, generate=False)
    assert rep["variants"]["untouched"]["generate_s"]["n"] == 0 and rep["variants"]["recipe"]["generate_s"]["n"] == 0
    assert rep["variants"]["recipe"]["decode_s"]["n"] == 2 and len(rep["variants"]["recipe"]["prefill_s"]["values"]) == 2
    text = format_report(rep)
    assert "generate not timed" in text and "nan" not in text


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

    real, calls = tb._HFRunner.timed, []

    def run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 * 3 + 2:  # second variant of round 3: its first variant must be dropped too
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tb._HFRunner, "timed", run)
    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128")
    recipe = {"scorer": "v2drop", "schedule": {"stages": [{"layer": 2, "keep": 0.5}]}}
    with pytest.raises(KeyboardInterrupt) as info:
        bench(model, recipe, vision_tokens=8, text_tokens=2, new_tokens=1, repeat=3, progress=False, limit=False)
    assert isinstance(info.value, tb.BenchInterrupted)
    rep = info.value.report
    json.dumps(rep)
    assert rep["partial"] is True and rep["repeat"] == 2 and rep["repeat_requested"] == 3
    assert rep["vision_tokens_per_layer"] == [8, 8, 4, 4]
    assert "PARTIAL: interrupted after 2 of 3 rounds" in format_report(rep)
    tokencomp.apply(model, recipe).remove()  # the interrupted round's hooks were removed: applies again


def _tables():
    """``benchmarks/tables.py`` (a script folder, not a package) as a module."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import tables
    finally:
        sys.path.pop(0)
    return tables


def test_gpu_script_dry_run_and_tables(tmp_path):
    """benchmarks/gpu.sh: --dry-run prints the FA2 tests, both benches and the table update without a
    GPU; without one and without --dry-run it refuses. The GPU table renders bench results."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "gpu.sh"
    dry = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    cmds = [l for l in dry.stdout.splitlines() if l.startswith("+ ")]
    assert len(cmds) == 4
    assert "tests/test_flash_path.py" in cmds[0]
    assert "v2drop/llava-1.5-7b-128" in cmds[1] and "--no-peer" in cmds[1]
    assert "fastv" in cmds[2] and "--no-peer" not in cmds[2]
    for c in cmds[1:3]:
        assert "heads=32" in c and "float16" in c and "cuda" in c and "576" in c
    assert "--gpu" in cmds[3] and "BENCHMARKS.md" in cmds[3]
    video = subprocess.run(["bash", str(script), "--dry-run", "--video"], capture_output=True, text=True, timeout=60)
    assert video.returncode == 0, video.stderr
    vcmds = [l for l in video.stdout.splitlines() if l.startswith("+ ")]
    assert len(vcmds) == 8 and "--tag gpu-video" in vcmds[-1]
    for c in vcmds[:-1]:
        assert "hidden=3584" in c and "--frames 32" in c and "6272" in c and "cuda" in c
        name = c.split(" bench ")[1].split()[0]
        tokencomp.load_recipe(name)  # every recipe the script names exists
    if not torch.cuda.is_available():
        real = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
        assert real.returncode == 3 and "no CUDA GPU" in real.stderr

    tables = _tables()
    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128")
    for name, recipe in (("v2drop", {"scorer": "v2drop", "schedule": {"stages": [{"layer": 2, "keep": 0.5}]}}), ("fastv", FASTV)):
        rep = bench(model, recipe, vision_tokens=8, text_tokens=2, new_tokens=1, repeat=1, progress=False)
        (tmp_path / f"{name}.json").write_text(json.dumps([rep]))
    text = tables.gpu_table(tmp_path)
    assert text.count("\n| ") == 1 + 1 + 2 + 3  # header, untouched, v2drop + limit, fastv original / probes / limit
    assert "original code (full attention matrix)" in text and "q/k probes" in text
    rows = [l for l in text.splitlines() if l.startswith("| ")]
    assert len({l.count("|") for l in rows}) == 1  # every row has the header's cells (LLM latency included)
    assert rows[1].split("|")[7].strip() == "1"  # the untouched row's own LLM generation latency ratio
    assert "| recipe |" in tables.table(tmp_path)
    doc = tmp_path / "B.md"
    doc.write_text("x\n<!-- table:gpu -->\nold\n<!-- /table:gpu -->\ny\n")
    tables.update(doc, "gpu", text)
    assert "old" not in doc.read_text() and "q/k probes" in doc.read_text()


def test_video_mode_gives_the_recipe_frames(tmp_path, monkeypatch):
    """bench --frames: the vision tokens come as equal frames (the remainder in the last), and every
    compressed forward hands them to the engine, so video methods and quotas see frames."""
    import tokencomp.bench as tb
    import tokencomp.engine as engine
    from tokencomp.cli import main
    from tokencomp.testing import build_synthetic

    model = build_synthetic("llava-1.5-7b:layers=2,hidden=64,heads=2,kv_heads=2,intermediate=128")
    _, _, vision, groups = tb.make_bench_inputs(model, 66, 4, 2, model.config.image_token_id, frames=8)
    counts = [int((groups[0] == g).sum()) for g in range(8)]
    assert counts == [8] * 7 + [10] and bool(((groups >= 0) == vision).all())
    seen = []
    real = engine.Handle.vision_mask
    monkeypatch.setattr(engine.Handle, "vision_mask", lambda self, mask, groups=None: seen.append(groups) or real(self, mask, groups))
    out = tmp_path / "r.json"
    code = main(["bench", "{scorer: random, selector: quota, schedule: {stages: [{layer: 1, keep: 0.25}]}}", "--synthetic",
                 "llava-1.5-7b:layers=2,hidden=64,heads=2,kv_heads=2,intermediate=128", "--vision-tokens", "64", "--frames", "8",
                 "--text-tokens", "4", "--repeat", "1", "--new-tokens", "1", "--json", str(out), "--quiet", "--no-limit"])
    assert code == 0
    rep = json.loads(out.read_text())
    rep = rep[0] if isinstance(rep, list) else rep
    assert rep["frames"] == 8 and seen and all(g is not None and int(g.max()) == 7 for g in seen)


def test_each_round_keeps_the_fastest_of_its_prefills(monkeypatch):
    """Short prefills are repeated within a round (count chosen from the warm-up) and the fastest
    run is what the round reports; a negative control with one prefill per round sees the slow runs."""
    import tokencomp.bench as tb

    clock = {"t": 0.0}
    durations = iter([5.0, 1.0, 3.0] * 1000)  # scripted prefill times, cycling
    real_prefill = tb._hf_prefill

    def prefill(s, handle):
        clock["t"] += next(durations)
        return real_prefill(s, handle)

    def now():
        clock["t"] += 1e-3  # everything else takes a millisecond
        return clock["t"]

    monkeypatch.setattr(tb, "_now", now)
    monkeypatch.setattr(tb, "_hf_prefill", prefill)
    monkeypatch.setattr(tb, "INNER_MAX", 3)
    monkeypatch.setattr(tb, "INNER_TARGET_S", 100.0)  # every variant: the cap, 3 prefills per round
    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128")
    rep = bench(model, V2DROP_4, vision_tokens=8, text_tokens=2, new_tokens=1, repeat=2, progress=False, limit=False)
    for name in ("untouched", "hooks", "recipe"):
        v = rep["variants"][name]
        assert v["prefills_per_round"] == 3, name
        assert v["prefill_s"]["max"] < 1.1, name  # each round saw 5, 1 and 3 (in some order): kept 1

    monkeypatch.setattr(tb, "INNER_TARGET_S", 1e-9)  # negative control: one prefill per round
    rep = bench(model, V2DROP_4, vision_tokens=8, text_tokens=2, new_tokens=1, repeat=3, progress=False, limit=False)
    assert all(v["prefills_per_round"] == 1 for v in rep["variants"].values())
    assert max(v["prefill_s"]["max"] for v in rep["variants"].values()) > 2.9


def test_inner_repeat_count_follows_the_warm_up():
    from tokencomp.bench import INNER_MAX, INNER_TARGET_S, Variant

    v = Variant("x")
    v.calibrate(INNER_TARGET_S * 2)
    assert v.inner == 1
    v.calibrate(INNER_TARGET_S / 4.5)
    assert v.inner == 5
    v.calibrate(0.0)
    assert v.inner == INNER_MAX


def test_reproduction_table_checks_rerun_medians_against_first_intervals(tmp_path):
    tables = _tables()

    def rep(median, lo, hi):
        # A median interval narrower than the rerun interval: the check must use the latter.
        r = {"median": median, "ci": [median, median], "ci_level": 0.9, "rerun": [lo, hi], "rerun_level": 0.99}
        return [{"ratios": {"recipe/untouched": {"prefill": r, "decode": r}}}]

    first, rerun = tmp_path / "a", tmp_path / "b"
    first.mkdir(), rerun.mkdir()
    (first / "x.json").write_text(json.dumps(rep(0.50, 0.45, 0.55)))
    (rerun / "x.json").write_text(json.dumps(rep(0.54, 0.50, 0.60)))  # inside
    (first / "y.json").write_text(json.dumps(rep(0.50, 0.49, 0.51)))
    (rerun / "y.json").write_text(json.dumps(rep(0.60, 0.58, 0.62)))  # outside: must say so
    (first / "only-first.json").write_text(json.dumps(rep(0.5, 0.4, 0.6)))
    text = tables.reproduction(first, rerun)
    assert "2 of 4 rerun ratios fall inside" in text
    assert text.count("| **no** |") == 2 and "only-first" not in text
    assert "expect 0.04 misses" in text  # four ratios stated at 99%
    # Result files from before the rerun interval: their median interval is what they stated.
    old = {"median": 0.5, "ci": [0.45, 0.55], "ci_level": 0.9375}
    (first / "x.json").write_text(json.dumps([{"ratios": {"recipe/untouched": {"prefill": old}}}]))
    (first / "y.json").unlink()
    assert "1 of 1 rerun ratios fall inside" in tables.reproduction(first, rerun)


def _coverage_by_enumeration(n: int, k: int, f: int) -> float:
    """Reference for rerun_coverage: every interleaving of n first-run and f rerun ranks (equally
    likely for exchangeable rounds), counting those where the rerun's median lies in [x_(k), x_(n+1-k)]."""
    import itertools
    import statistics

    hits = total = 0
    for first in itertools.combinations(range(n + f), n):
        chosen = set(first)
        rerun = [r for r in range(n + f) if r not in chosen]
        med = statistics.median(rerun)
        total += 1
        hits += first[k - 1] <= med <= first[n - k]
    return hits / total


def test_rerun_coverage_matches_enumeration_of_rank_orders():
    from tokencomp.bench import rerun_coverage

    for n in (3, 5, 7):
        for k in range(1, (n + 1) // 2 + 1):
            assert rerun_coverage(n, k) == pytest.approx(_coverage_by_enumeration(n, k, n), abs=1e-12)
    # An even-sized rerun: the stated coverage is a lower bound (conservative), never above the truth.
    for n, k, f in ((5, 1, 4), (6, 2, 6), (7, 2, 8)):
        assert rerun_coverage(n, k, f) <= _coverage_by_enumeration(n, k, f) + 1e-12
    # The numbers the docs quote: the full range of 5 rounds covers a rerun's median 83% of the
    # time (not the 94% it covers the true median with), 15 rounds 99.8%.
    assert rerun_coverage(5, 1) == pytest.approx(0.8333, abs=1e-4)
    assert rerun_coverage(15, 1) == pytest.approx(0.9978, abs=1e-4)


def test_rerun_interval_is_the_narrowest_pair_reaching_the_target():
    from tokencomp.bench import paired_ratio, rerun_coverage, rerun_interval

    x = [float(v) for v in range(1, 22)]  # 21 rounds: dropping one round at each end keeps >= 99%
    lo, hi, cov = rerun_interval(x, target=0.99)
    assert (lo, hi) == (3.0, 19.0) and cov == rerun_coverage(21, 3) >= 0.99 > rerun_coverage(21, 4)
    lo, hi, cov = rerun_interval(x[:5])  # too few rounds: the full range, with its honest coverage
    assert (lo, hi) == (1.0, 5.0) and cov == pytest.approx(0.8333, abs=1e-4)
    r = paired_ratio([2.0, 4.0, 3.0, 5.0, 6.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert r["rounds"] == [2.0, 4.0, 3.0, 5.0, 6.0] and r["rerun_exchangeable"] == [2.0, 6.0]
    assert r["drift"] == 2.0 and r["rerun"] == [0.0, 8.0]  # halves' medians 3 and 5
    assert r["rerun"][0] <= r["ci"][0] and r["ci"][1] <= r["rerun"][1]
    from tokencomp.bench import _invert  # a time ratio read as a rate: the interval flips

    inv = _invert(r)
    assert inv["rerun_exchangeable"] == [1 / 6.0, 1 / 2.0] and inv["rounds"] == [1 / v for v in r["rounds"]]
    assert inv["rerun"][0] == 1 / 8.0


def test_rerun_interval_allows_for_the_drift_of_the_run():
    """A run whose second half sits higher than its first states a wider rerun interval, by the
    difference of the halves' medians on each side; a steady run states the exchangeable one."""
    from tokencomp.bench import drift, paired_ratio, rerun_bounds, rerun_interval

    steady = [1.0, 1.2, 0.9, 1.1, 1.0, 1.2, 0.9, 1.1]
    assert drift(steady) == 0.0 and rerun_bounds(steady)[:3] == rerun_interval(steady)
    moving = [1.0, 1.1, 0.9, 1.0, 1.3, 1.4, 1.2, 1.3]  # halves' medians 1.0 and 1.3
    assert drift(moving) == pytest.approx(0.3)
    lo, hi, cov, d = rerun_bounds(moving)
    xlo, xhi, xcov = rerun_interval(moving)
    assert (lo, hi, cov) == pytest.approx((xlo - 0.3, xhi + 0.3, xcov))
    r = paired_ratio(moving, [1.0] * 8)
    assert r["rerun"] == pytest.approx([lo, hi]) and r["rerun_exchangeable"] == [xlo, xhi] and r["drift"] == pytest.approx(0.3)
    assert drift([]) == drift([2.0]) == 0.0


def test_reproduction_uses_the_drift_allowance_from_the_rounds(tmp_path):
    tables = _tables()
    rounds = [0.50, 0.52, 0.49, 0.51, 0.56, 0.58, 0.57, 0.55]  # drifts up by 0.055 (halves 0.505 / 0.560)

    def rep(median, rounds=None):
        r = {"median": median, "ci": [median, median], "ci_level": 0.9, "rerun": [0.0, 0.0], "rerun_level": 0.99}
        if rounds:
            r["rounds"] = rounds
        return [{"ratios": {"recipe/untouched": {"prefill": r}}}]

    first, rerun = tmp_path / "a", tmp_path / "b"
    first.mkdir(), rerun.mkdir()
    (first / "x.json").write_text(json.dumps(rep(0.535, rounds)))
    (rerun / "x.json").write_text(json.dumps(rep(0.60)))  # above the range 0.49-0.58, inside 0.58 + 0.055
    assert "1 of 1 rerun ratios fall inside" in tables.reproduction(first, rerun)
    (rerun / "x.json").write_text(json.dumps(rep(0.65)))  # beyond the allowance too
    assert "0 of 1 rerun ratios fall inside" in tables.reproduction(first, rerun)


def test_decode_time_is_the_median_step_times_the_steps(monkeypatch):
    """One slow decode step (a scheduler hiccup) does not move the decode time; every timed decode
    run of every variant goes through it."""
    import tokencomp.bench as tb

    assert tb._decode_time([1.0, 1.0, 1.0, 100.0]) == 4.0
    assert tb._decode_time([1.0, 2.0, 3.0]) == 6.0  # linear growth: the median step is the mean one
    seen = []
    real = tb._decode_time

    def spy(steps):
        seen.append(len(steps))
        return real(steps)

    monkeypatch.setattr(tb, "_decode_time", spy)
    model = build_synthetic("llava-1.5-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128")
    bench(model, V2DROP_4, vision_tokens=8, text_tokens=2, new_tokens=3, repeat=2, progress=False)
    # untouched, hooks, recipe, limit: warm-up + 2 rounds each, 3 steps per run
    assert seen == [3] * (4 * 3)
