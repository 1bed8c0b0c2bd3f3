"""Side-by-side measurement of an untouched model and the same model with a recipe applied.

Everything is timed in one process, interleaved and repeated: the untouched model, the recipe's
stages with keep = 1 (hook overhead alone), and the recipe. Reported as ratios to the untouched
model, next to the analytic FLOP ratio of the measured token schedule (see :mod:`tokencomp.flops`).
Only the language model is timed: inputs are embeddings with an explicit vision mask, so the vision
tower (identical in both) does not dilute the ratios.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import UsageError
from .flops import DecoderShape, decode_flops, kv_cache_bytes, prefill_flops


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`bench`. Still a ``KeyboardInterrupt``; ``report`` holds the rounds
    measured completely before it (``"partial": True``), or is ``None`` if none was."""

    def __init__(self, report: Optional[dict]):
        super().__init__("benchmark interrupted")
        self.report = report


def _malloc_in_use() -> int:
    """Bytes currently allocated through malloc (glibc ``mallinfo2``): what the CPU tensors hold.

    Process RSS cannot tell two variants apart in one process (freed pages are reused, not
    returned), so on CPU the peak of live heap bytes is sampled instead.
    """
    info = _mallinfo()
    if info is None:
        return 0
    m = info()
    return m.uordblks + m.hblkhd


def _mallinfo():
    global _MALLINFO
    if _MALLINFO is None:
        import ctypes
        import ctypes.util

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        try:
            fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
            fn.restype = Info
            _MALLINFO = fn
        except (OSError, AttributeError):  # not glibc >= 2.33: memory is reported as 0
            _MALLINFO = False
    return _MALLINFO or None


_MALLINFO = None


class PeakMemory:
    """Peak memory above the starting point during a ``with`` block: CUDA max allocated on GPU,
    sampled live malloc bytes on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = _malloc_in_use()
            self._max = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _malloc_in_use())
            self._stop.wait(0.0002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _malloc_in_use()) - self._start


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Variant:
    """Measurements of one variant (untouched, hooks only, or the recipe) over the repeats."""

    name: str
    prefill_s: list = field(default_factory=list)
    generate_s: list = field(default_factory=list)
    decode_s: list = field(default_factory=list)
    peak_bytes: list = field(default_factory=list)
    overhead_s: list = field(default_factory=list)
    kv_bytes: int = 0
    tokens_per_layer: list = field(default_factory=list)

    def median(self, name: str) -> float:
        values = getattr(self, name)
        return statistics.median(values) if values else float("nan")

    def spread(self, name: str) -> float:
        """(max − min) / median: how noisy the repeats were."""
        values = getattr(self, name)
        med = self.median(name)
        return (max(values) - min(values)) / med if values and med else float("nan")


def make_bench_inputs(model, vision_tokens: int, text_tokens: int, batch: int, vision_id: int, seed: int = 0):
    """Embeddings of ``batch`` prompts ``[text prefix, vision_tokens placeholders, text suffix]``."""
    gen = torch.Generator().manual_seed(seed)
    prefix = text_tokens // 2
    suffix = text_tokens - prefix
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(10, vocab, (batch, prefix + vision_tokens + suffix), generator=gen)
    ids[:, prefix : prefix + vision_tokens] = vision_id
    device = model.get_input_embeddings().weight.device
    ids = ids.to(device)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    return embeds, torch.ones_like(ids), ids == vision_id


def _run(model, handle, embeds, mask, vision, new_tokens, v: Variant, device, decode_id: int):
    ctx = handle.vision_mask(vision) if handle is not None else _null()
    with torch.no_grad(), ctx:
        if handle is not None:
            handle.overhead_s = 0.0
        _sync(device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
            _sync(device)
            v.prefill_s.append(time.perf_counter() - t0)
        v.peak_bytes.append(mem.peak)
        if handle is not None:
            v.overhead_s.append(handle.overhead_s)
        cache = getattr(out, "cache", None) or out.past_key_values
        v.kv_bytes = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if getattr(l, "keys", None) is not None)
        if new_tokens > 0:
            # Decode measured on its own: single-token steps on the prefill's cache. The token fed is
            # fixed (a text id): which token it is does not change the cost, and a random model's
            # argmax could be a vision placeholder.
            ids = torch.full((mask.shape[0], 1), decode_id, dtype=torch.long, device=mask.device)
            am = mask
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                # Explicit positions: Qwen models otherwise derive them from state a previous
                # generate() left on the model (rope_deltas).
                pos = torch.full_like(ids, am.shape[1])
                am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
                model(input_ids=ids, attention_mask=am, position_ids=pos, cache=cache, use_cache=True)
            _sync(device)
            v.decode_s.append(time.perf_counter() - t0)
        del out, cache
        if new_tokens > 0:
            _sync(device)
            t0 = time.perf_counter()
            model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
            _sync(device)
            v.generate_s.append(time.perf_counter() - t0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def identity_recipe(recipe, num_layers: int):
    """The same stage layers and scorers with keep = 1: measures the hooks alone."""
    from .interfaces import Stage
    from .recipe import Recipe
    from .schedules.explicit import ExplicitSchedule

    stages = tuple(Stage(s.layer, 1.0, s.scorer, s.selector) for s in recipe.stages(num_layers))
    return dataclasses.replace(recipe, schedule=ExplicitSchedule(stages_=stages), name="keep=1 (hooks only)")


def bench(
    model,
    recipe,
    *,
    vision_tokens: int = 576,
    text_tokens: int = 60,
    batch: int = 1,
    new_tokens: int = 8,
    repeat: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure untouched vs hooks-only vs recipe on one input shape; return a JSON-friendly dict.

    Raises :class:`UsageError` for sizes out of range and :class:`BenchInterrupted` on Ctrl-C.
    """
    import tokencomp

    for name, value, minimum in (("vision_tokens", vision_tokens, 1), ("text_tokens", text_tokens, 0),
                                 ("batch", batch, 1), ("new_tokens", new_tokens, 0), ("repeat", repeat, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UsageError(f"bench: {name} must be an integer >= {minimum}, got {value!r}")
    recipe = tokencomp.load_recipe(recipe)
    adapter_ids = None
    handle_probe = tokencomp.apply(model, recipe)  # validates before any timing
    adapter_ids = handle_probe.adapter.vision_token_ids(model)
    num_layers = handle_probe.num_layers
    handle_probe.remove()
    device = model.get_input_embeddings().weight.device
    embeds, mask, vision = make_bench_inputs(model, vision_tokens, text_tokens, batch, adapter_ids[0])
    shape = DecoderShape.from_config(model.config)
    vocab = model.get_input_embeddings().num_embeddings
    decode_id = next(i for i in range(vocab - 1, 0, -1) if i not in adapter_ids)
    variants = {"untouched": Variant("untouched"), "hooks": Variant("hooks (keep=1)"), "recipe": Variant("recipe")}
    recipes = {"hooks": identity_recipe(recipe, num_layers), "recipe": recipe}
    order = list(variants)
    total = (repeat + 1) * len(order)
    done = 0
    measured = 0  # rounds completed for every variant (warm-up excluded)
    try:
        for r in range(repeat + 1):  # round 0 is warm-up, discarded
            rot = order[r % len(order) :] + order[: r % len(order)]
            for name in rot:
                v = variants[name] if r > 0 else Variant(name)
                handle = tokencomp.apply(model, recipes[name]) if name in recipes else None
                if handle is not None:
                    handle.profile = True
                try:
                    _run(model, handle, embeds, mask, vision, new_tokens, v, device, decode_id)
                    if handle is not None and r > 0:
                        L = embeds.shape[1]
                        counts = handle.stats.vision_tokens_per_layer[0]
                        v.tokens_per_layer = [L - vision_tokens + c for c in counts]
                finally:
                    if handle is not None:
                        handle.remove()
                done += 1
                if progress:
                    _progress(done, total, f"{name} round {r}")
            measured = r
    except KeyboardInterrupt:
        if progress:
            print(file=sys.stderr)  # end the progress line
        report = None
        if measured:
            # Drop the values of the round cut short, so every variant has the same rounds.
            for v in variants.values():
                for name in ("prefill_s", "generate_s", "decode_s", "peak_bytes", "overhead_s"):
                    setattr(v, name, getattr(v, name)[:measured])
            variants["untouched"].tokens_per_layer = [embeds.shape[1]] * shape.layers
            report = _report(model, recipe, variants, shape, vision_tokens, text_tokens, batch, new_tokens, measured, embeds.dtype, device)
            report["partial"] = True
            report["repeat_requested"] = repeat
        raise BenchInterrupted(report) from None
    if progress:
        print(file=sys.stderr)
    L = embeds.shape[1]
    variants["untouched"].tokens_per_layer = [L] * shape.layers
    rep = _report(model, recipe, variants, shape, vision_tokens, text_tokens, batch, new_tokens, repeat, embeds.dtype, device)
    rep["partial"] = False
    rep["repeat_requested"] = repeat
    return rep


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<24}", end="", file=sys.stderr, flush=True)


def _report(model, recipe, variants, shape, vision_tokens, text_tokens, batch, new_tokens, repeat, dtype, device):
    base, hooks, comp = variants["untouched"], variants["hooks"], variants["recipe"]
    f_base = prefill_flops(shape, base.tokens_per_layer) * batch
    f_comp = prefill_flops(shape, comp.tokens_per_layer) * batch
    d_base = decode_flops(shape, base.tokens_per_layer, new_tokens) * batch
    d_comp = decode_flops(shape, comp.tokens_per_layer, new_tokens) * batch
    esize = torch.finfo(dtype).bits // 8
    kv_base = kv_cache_bytes(shape, base.tokens_per_layer, esize) * batch
    kv_comp = kv_cache_bytes(shape, comp.tokens_per_layer, esize) * batch

    flop_ratio = f_comp / f_base
    prefill_ratio = comp.median("prefill_s") / base.median("prefill_s")
    rows = {
        "prefill_s": (base.median("prefill_s"), comp.median("prefill_s")),
        "decode_tokens_per_s": (batch * new_tokens / base.median("decode_s"), batch * new_tokens / comp.median("decode_s")),
        "generate_s": (base.median("generate_s"), comp.median("generate_s")),
        "peak_memory_bytes": (statistics.median(base.peak_bytes), statistics.median(comp.peak_bytes)),
        "kv_cache_bytes": (base.kv_bytes, comp.kv_bytes),
        "prefill_flops": (f_base, f_comp),
        "decode_flops": (d_base, d_comp),
    }
    return {
        "recipe": recipe.name or recipe.source,
        "model": type(model).__name__,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "attn": model.config.get_text_config()._attn_implementation,
        "shape": dataclasses.asdict(shape),
        "vision_tokens": vision_tokens,
        "text_tokens": text_tokens,
        "batch": batch,
        "new_tokens": new_tokens,
        "repeat": repeat,
        "threads": torch.get_num_threads(),
        "vision_tokens_per_layer": [n - (base.tokens_per_layer[0] - vision_tokens) for n in comp.tokens_per_layer],
        "average_vision_tokens": sum(comp.tokens_per_layer) / len(comp.tokens_per_layer) - (base.tokens_per_layer[0] - vision_tokens),
        "metrics": {
            k: {"baseline": b, "compressed": c, "ratio": (c / b if b else float("nan"))} for k, (b, c) in rows.items()
        },
        "spread": {
            name: {"prefill": v.spread("prefill_s"), "decode": v.spread("decode_s"), "generate": v.spread("generate_s")}
            for name, v in variants.items()
        },
        "kv_cache_bytes_analytic": {"baseline": kv_base, "compressed": kv_comp},
        "flop_ratio": flop_ratio,
        "prefill_efficiency": prefill_ratio / flop_ratio,
        "overhead_share": comp.median("overhead_s") / comp.median("prefill_s"),
        "hooks_prefill_ratio": hooks.median("prefill_s") / base.median("prefill_s"),
        "hooks_overhead_share": hooks.median("overhead_s") / hooks.median("prefill_s"),
    }


def format_report(rep: dict[str, Any]) -> str:
    """Human-readable table of a :func:`bench` result."""
    m = rep["metrics"]
    lines = [
        f"recipe {rep['recipe']} on {rep['model']} ({rep['shape']['layers']} layers, hidden {rep['shape']['hidden']}), "
        f"{rep['device']} {rep['dtype']} {rep['attn']}, {rep['threads']} threads",
        f"vision tokens {rep['vision_tokens']} + text {rep['text_tokens']}, batch {rep['batch']}, "
        f"{rep['new_tokens']} new tokens, median of {rep['repeat']} (after a warm-up round)"
        + (f" -- PARTIAL: interrupted after {rep['repeat']} of {rep['repeat_requested']} rounds" if rep.get("partial") else ""),
        f"average vision tokens per layer: {rep['average_vision_tokens']:.1f}",
        "",
        f"{'metric':<22}{'baseline':>14}{'compressed':>14}{'ratio':>9}",
    ]

    def fmt(key, value):
        if key.endswith("_bytes"):
            return f"{value / 2**20:.1f} MiB"
        if key.endswith("_flops"):
            return f"{value / 1e9:.2f} G"
        if key.endswith("_per_s"):
            return f"{value:.1f}"
        if key.endswith("_s"):
            return f"{value * 1000:.1f} ms"
        return f"{value:.1f}"

    for key, row in m.items():
        lines.append(f"{key:<22}{fmt(key, row['baseline']):>14}{fmt(key, row['compressed']):>14}{row['ratio']:>9.3f}")
    lines += [
        "",
        f"prefill time ratio / FLOP ratio (efficiency, 1.00 = ideal): {rep['prefill_efficiency']:.3f}",
        f"scoring + selection + gathers: {100 * rep['overhead_share']:.2f}% of the compressed prefill",
        f"hooks at keep=1: prefill ratio {rep['hooks_prefill_ratio']:.3f} (overhead inside hooks {100 * rep['hooks_overhead_share']:.2f}%)",
        f"noise (max-min)/median of prefill: untouched {rep['spread']['untouched']['prefill']:.2f}, "
        f"recipe {rep['spread']['recipe']['prefill']:.2f}",
    ]
    return "\n".join(lines)


MARKDOWN_HEADER = (
    "| recipe | vision tokens | avg kept / layer | FLOP ratio | prefill ratio | efficiency | decode tok/s ratio "
    "| KV-cache ratio | peak-mem ratio | scoring share | keep=1 hooks ratio | prefill noise |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_markdown_row(rep: dict[str, Any]) -> str:
    """One Markdown table row (see ``MARKDOWN_HEADER``) of a :func:`bench` result."""
    m = rep["metrics"]
    return (
        f"| {rep['recipe']} | {rep['vision_tokens']} | {rep['average_vision_tokens']:.1f} | {rep['flop_ratio']:.3f} "
        f"| {m['prefill_s']['ratio']:.3f} | {rep['prefill_efficiency']:.3f} | {m['decode_tokens_per_s']['ratio']:.3f} "
        f"| {m['kv_cache_bytes']['ratio']:.3f} | {m['peak_memory_bytes']['ratio']:.3f} | {100 * rep['overhead_share']:.2f}% "
        f"| {rep['hooks_prefill_ratio']:.3f} | {rep['spread']['recipe']['prefill']:.2f} |"
    )
