"""Side-by-side measurement of an untouched model and the same model with a recipe applied.

Variants, timed in one process, interleaved round by round (round 0 is a discarded warm-up):

* ``untouched``: the model as loaded;
* ``hooks``: the recipe's stages with keep = 1 (the cost of the hooks and scoring alone);
* ``recipe``: the recipe, as tokencomp runs it;
* ``limit``: the *physical limit* of any in-LLM method with the recipe's token schedule: the decoder
  layers called directly, no hooks, each fed exactly the tokens the recipe kept before it (one
  gather per stage, nothing else; see :func:`limit_prefill`);
* ``peer`` (attention scorers only): the recipe's scorer fed the way the original implementations
  do it — eager attention materialising the full ``(B, H, S, S)`` attention matrix at the probed
  layer (``output_attentions``-style) — instead of tokencomp's q/k probes.

Time and memory are measured in **separate passes**: the timed rounds run nothing but the model
(no memory sampler), and one extra untimed pass per variant measures peak memory (on CPU a sampler
thread polls the heap, which slows what it watches, so it never runs while a clock does). Times are
reported as medians with a distribution-free interval of the paired per-round ratios, a min-based
estimate and a noise figure; ratios whose interval is wide are flagged in ``warnings``. Within a
round, a short prefill is repeated and its fastest run kept (:data:`INNER_TARGET_S`), and a decode
run's time is its median step times the steps (:func:`_decode_time`).

Only the language model is timed: inputs are embeddings with an explicit vision mask, so the vision
tower (identical in every variant) does not dilute the ratios. FLOP ratios come from
:mod:`tokencomp.flops` for the token schedule actually measured.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .errors import UsageError
from .flops import DecoderShape, decode_flops, kv_cache_bytes, prefill_flops
from .progress import progress as progress_bar

NOISE_LIMIT = 0.10
"""A ratio whose interval is wider than this fraction of it is flagged in ``warnings``."""

TIME_SERIES = ("prefill_s", "decode_s", "generate_s")

INNER_TARGET_S = 0.5
"""Each timed round repeats a variant's prefill until about this long has been spent and keeps the
fastest run (at most :data:`INNER_MAX` runs): a 50 ms prefill timed once is mostly scheduler noise
on a shared machine, the best of ten is not. Long prefills run once per round."""
INNER_MAX = 10


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


def _now() -> float:
    """The benchmark's clock (a function of its own so tests can watch when timing happens)."""
    return time.perf_counter()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- statistics


def summarize(values: list) -> dict[str, float]:
    """Median, min, max and noise ((max − min) ÷ median) of repeated measurements."""
    if not values:
        nan = float("nan")
        return {"n": 0, "median": nan, "min": nan, "max": nan, "noise": nan}
    med = statistics.median(values)
    return {
        "n": len(values),
        "median": med,
        "min": min(values),
        "max": max(values),
        "noise": (max(values) - min(values)) / med if med else float("nan"),
        "values": list(values),  # every round, so tables can recompute any estimate from the file
    }


def median_interval(values: list) -> tuple[float, float, float]:
    """Distribution-free interval for the median of ``values``: ``(low, high, confidence)``.

    The order statistics ``x_(k) .. x_(n+1-k)`` cover the true median with probability
    ``1 − 2·P(Binomial(n, ½) < k)``; ``k`` is the largest with confidence ≥ 90%, or 1 (the full
    range) when ``n`` is too small for that (n = 3: 75%, n = 4: 87.5%, n = 5: 93.8%).
    """
    x = sorted(values)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), 0.0
    if n == 1:
        return x[0], x[0], 0.0

    def level(k):
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and level(k + 1) >= 0.90:
        k += 1
    return x[k - 1], x[n - k], level(k)


RERUN_TARGET = 0.99
"""Wanted probability that a rerun's median lands in the stated rerun interval (:func:`rerun_interval`)."""


def rerun_coverage(n: int, k: int, future: Optional[int] = None) -> float:
    """Probability that the median of ``future`` (default ``n``) new rounds falls inside
    ``[x_(k), x_(n+1-k)]`` of ``n`` rounds, when all ``n + future`` rounds are exchangeable.

    Every interleaving of the two samples' ranks is then equally likely, so the number ``y`` of new
    rounds below ``x_(k)`` has ``P(y) = C(k−1+y, y)·C(n−k+future−y, future−y) / C(n+future, n)``; the
    new median is below ``x_(k)`` when ``y ≥ ⌈future/2⌉`` (for an even ``future`` this bounds it from
    above: the stated coverage is conservative). Both tails are equal by symmetry.

    This is not the confidence of the median's interval (:func:`median_interval`): with 5 rounds the
    full range covers the true median 94% of the time but a rerun's median only 83% of the time."""
    f = n if future is None else future
    if n < 2 or f < 1 or not 1 <= k <= (n + 1) // 2:
        return 0.0
    need = (f + 1) // 2
    below = sum(math.comb(k - 1 + y, y) * math.comb(n - k + f - y, f - y) for y in range(need, f + 1))
    return max(0.0, 1 - 2 * below / math.comb(n + f, n))


def rerun_interval(values: list, target: float = RERUN_TARGET) -> tuple[float, float, float]:
    """Interval a rerun's median (same number of rounds) should fall in: ``(low, high, coverage)``.

    The narrowest pair of order statistics whose :func:`rerun_coverage` is at least ``target``, or
    the full range with its lower coverage when there are too few rounds (5 rounds: 83%, 11: 98.8%,
    15: 99.8%)."""
    x = sorted(values)
    n = len(x)
    if n < 2:
        return (x[0], x[0], 0.0) if x else (float("nan"), float("nan"), 0.0)
    k = 1
    while k + 1 <= (n + 1) // 2 and rerun_coverage(n, k + 1) >= target:
        k += 1
    return x[k - 1], x[n - k], rerun_coverage(n, k)


def drift(values: list) -> float:
    """How far a run's rounds moved while it ran: the difference between the medians of its first and
    second halves (rounds in the order they were measured). A rerun minutes later can sit as far off
    as the run itself drifted, which rounds assumed exchangeable across runs do not allow for."""
    if len(values) < 2:
        return 0.0
    half = len(values) // 2
    return abs(statistics.median(values[:half]) - statistics.median(values[half:]))


def rerun_bounds(values: list) -> tuple[float, float, float, float]:
    """The interval a rerun's median should fall in: ``(low, high, coverage, drift)``.

    :func:`rerun_interval` (whose ``coverage`` holds when the rounds of both runs are exchangeable)
    widened on each side by the run's own :func:`drift`: on a shared host whole runs shift (measured
    here: single ratios of a rerun outside the exchangeable interval by 0.5-2%, in 2 of 56 and 1 of
    84, where 0.1-0.2 were expected), and how much the host moves within a run is the measure of how
    much it may move between runs that a run itself has."""
    lo, hi, cov = rerun_interval(values)
    d = drift(values)
    return lo - d, hi + d, cov, d


def paired_ratio(num: list, den: list) -> dict[str, Any]:
    """Ratio ``num ÷ den`` of two variants' times measured in the same rounds.

    ``median``: median of the per-round ratios (each round times both variants back to back, so
    slow phases of a shared machine cancel); ``ci``: its distribution-free interval
    (:func:`median_interval`); ``rerun``: where a rerun's median should fall (:func:`rerun_bounds`:
    the exchangeable interval ``rerun_exchangeable`` of coverage ``rerun_level``, widened by the run's
    ``drift``); ``min_based``: ``min(num) ÷ min(den)``, the estimate least disturbed
    by other load; ``of_medians``: ratio of the two medians; ``rounds``: the per-round ratios.
    """
    n = min(len(num), len(den))
    rounds = [a / b for a, b in zip(num[:n], den[:n]) if b]
    if not rounds:
        nan = float("nan")
        return {"median": nan, "ci": [nan, nan], "ci_level": 0.0, "rerun": [nan, nan], "rerun_level": 0.0,
                "rerun_exchangeable": [nan, nan], "drift": 0.0, "min_based": nan, "of_medians": nan, "n": 0, "rounds": []}
    lo, hi, conf = median_interval(rounds)
    rlo, rhi, rconf, rdrift = rerun_bounds(rounds)
    return {
        "median": statistics.median(rounds),
        "ci": [lo, hi],
        "ci_level": conf,
        "rerun": [rlo, rhi],
        "rerun_level": rconf,
        "rerun_exchangeable": list(rerun_interval(rounds)[:2]),
        "drift": rdrift,
        "rounds": rounds,
        "min_based": min(num[:n]) / min(den[:n]),
        "of_medians": statistics.median(num[:n]) / statistics.median(den[:n]),
        "n": len(rounds),
    }


def _invert(r: dict) -> dict:
    """A time ratio as a rate ratio (tokens per second): every estimate inverted."""
    inv = lambda x: 1 / x if x else float("nan")  # noqa: E731
    out = dict(r)
    for key in ("median", "min_based", "of_medians"):
        out[key] = inv(r[key])
    for key in ("ci", "rerun", "rerun_exchangeable"):  # an interval flips: its high end becomes the low one
        if key in r:
            out[key] = [inv(r[key][1]), inv(r[key][0])]
    if "rerun" in r:
        out["rounds"] = [inv(x) for x in r["rounds"]]
    return out


# ---------------------------------------------------------------------- one variant


@dataclass
class Variant:
    """Measurements of one variant over the repeats (timed pass) and its memory pass."""

    name: str
    prefill_s: list = field(default_factory=list)
    generate_s: list = field(default_factory=list)
    decode_s: list = field(default_factory=list)
    overhead_s: list = field(default_factory=list)
    peak_bytes: Optional[int] = None
    kv_bytes: int = 0
    kv_bytes_decoded: int = 0  # after the decode steps (decode stages in evict mode free rows)
    tokens_per_layer: list = field(default_factory=list)
    inner: int = 1  # prefills per timed round, the fastest kept (set from the warm-up: see INNER_TARGET_S)

    def calibrate(self, warm_prefill_s: float) -> None:
        """Choose :attr:`inner` so that one round's prefills last about :data:`INNER_TARGET_S`."""
        self.inner = max(1, min(INNER_MAX, math.ceil(INNER_TARGET_S / max(warm_prefill_s, 1e-6))))

    def median(self, name: str) -> float:
        values = getattr(self, name)
        return statistics.median(values) if values else float("nan")

    def spread(self, name: str) -> float:
        """(max − min) / median: how noisy the repeats were."""
        return summarize(getattr(self, name))["noise"]

    def truncate(self, rounds: int) -> None:
        for name in TIME_SERIES + ("overhead_s",):
            setattr(self, name, getattr(self, name)[:rounds])


def make_bench_inputs(model, vision_tokens: int, text_tokens: int, batch: int, vision_id: int, seed: int = 0, frames: int = 1):
    """Embeddings of ``batch`` prompts ``[text prefix, vision_tokens placeholders, text suffix]``, their
    attention mask and vision mask, and the frame number of each vision token (``frames`` equal
    groups, the remainder in the last; ``-1`` on text) as a video's frames would be."""
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
    vision = ids == vision_id
    per_frame = max(1, vision_tokens // frames)
    frame = torch.clamp((torch.cumsum(vision.long(), 1) - 1) // per_frame, max=frames - 1)
    return embeds, torch.ones_like(ids), vision, torch.where(vision, frame, torch.full_like(frame, -1))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _cache_bytes(cache) -> int:
    return sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if getattr(l, "keys", None) is not None)


@dataclass
class _Setup:
    """What every variant's run needs (the inputs and the fixed decode token)."""

    model: Any
    embeds: torch.Tensor
    mask: torch.Tensor
    vision: torch.Tensor
    new_tokens: int
    device: torch.device
    decode_id: int
    groups: Optional[torch.Tensor] = None  # (B, L) frame of each vision token (video mode)


def _hf_prefill(s: _Setup, handle):
    ctx = handle.vision_mask(s.vision, s.groups) if handle is not None else _null()
    with ctx:
        out = s.model(inputs_embeds=s.embeds, attention_mask=s.mask, use_cache=True, logits_to_keep=1)
    return getattr(out, "cache", None) or out.past_key_values


def _clocked(device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """``fn()`` timed between two device synchronisations: (seconds, its result)."""
    _sync(device)
    t0 = _now()
    out = fn()
    _sync(device)
    return _now() - t0, out


def _step(device, fn: Callable[[], Any], step_times: Optional[list]) -> None:
    """Run one decode step; with ``step_times`` given, time it (:func:`_clocked`) and append the time."""
    if step_times is None:
        fn()
    else:
        step_times.append(_clocked(device, fn)[0])


def _decode_time(step_times: list) -> float:
    """Time of a decode run from its per-step times: the median step times the steps. One slow step
    (a scheduler hiccup on a shared machine) would move a plain sum; the cost of a step grows only
    linearly with the cache, so the median step is the mean one."""
    return statistics.median(step_times) * len(step_times)


def _hf_decode(s: _Setup, cache, step_times: Optional[list] = None) -> None:
    # Single-token steps on the prefill's cache. The token fed is fixed (a text id): which token it
    # is does not change the cost, and a random model's argmax could be a vision placeholder.
    ids = torch.full((s.mask.shape[0], 1), s.decode_id, dtype=torch.long, device=s.mask.device)
    am = s.mask
    for _ in range(s.new_tokens):
        # Explicit positions: Qwen models otherwise derive them from state a previous generate()
        # left on the model (rope_deltas).
        pos = torch.full_like(ids, am.shape[1])
        am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
        _step(s.device, lambda: s.model(input_ids=ids, attention_mask=am, position_ids=pos, cache=cache, use_cache=True), step_times)


class _HFRunner:
    """A variant that runs the model's own forward (untouched, or with a recipe applied)."""

    def __init__(self, name: str, recipe=None, generate: bool = True, before: Optional[Callable] = None):
        self.name, self.recipe, self.generate, self.before = name, recipe, generate, before
        self.stats = None

    def _apply(self, s: _Setup):
        import tokencomp

        undo = self.before(s.model) if self.before is not None else None
        try:
            handle = tokencomp.apply(s.model, self.recipe) if self.recipe is not None else None
        except BaseException:
            if undo is not None:
                undo()
            raise
        if handle is not None:
            handle.profile = True
            handle.overhead_s = 0.0
            if self.before is not None:
                self.before.handle = handle
        return handle, undo

    def timed(self, s: _Setup, v: Variant) -> None:
        handle, undo = self._apply(s)
        try:
            with torch.no_grad():
                best = None
                for _ in range(v.inner):  # best of `inner` prefills: short ones are noisy alone
                    cache = None  # free the previous run's cache before the next prefill
                    if handle is not None:
                        handle.overhead_s = 0.0
                    dt, cache = _clocked(s.device, lambda: _hf_prefill(s, handle))
                    if best is None or dt < best[0]:
                        best = (dt, handle.overhead_s if handle is not None else 0.0)
                v.prefill_s.append(best[0])
                if handle is not None:
                    v.overhead_s.append(best[1])
                if s.new_tokens > 0:
                    steps: list = []
                    _hf_decode(s, cache, steps)
                    v.decode_s.append(_decode_time(steps))
                del cache
                if s.new_tokens > 0 and self.generate:
                    ctx = handle.vision_mask(s.vision, s.groups) if handle is not None else _null()
                    with ctx:
                        v.generate_s.append(_clocked(s.device, lambda: s.model.generate(
                            inputs_embeds=s.embeds, attention_mask=s.mask, max_new_tokens=s.new_tokens,
                            min_new_tokens=s.new_tokens, do_sample=False))[0])
        finally:
            if handle is not None:
                handle.remove()
            if undo is not None:
                undo()

    def memory(self, s: _Setup, v: Variant) -> None:
        handle, undo = self._apply(s)
        try:
            with torch.no_grad():
                with PeakMemory(s.device) as mem:
                    cache = _hf_prefill(s, handle)
                v.peak_bytes = mem.peak
                v.kv_bytes = _cache_bytes(cache)
                if s.new_tokens > 0 and self.name in ("untouched", "recipe"):  # the two compared in the report
                    _hf_decode(s, cache)
                    v.kv_bytes_decoded = _cache_bytes(cache)
                L, n_vis = s.embeds.shape[1], int(s.vision[0].sum())
                if handle is not None:
                    self.stats = handle.stats
                    v.tokens_per_layer = [L - n_vis + c for c in handle.stats.vision_tokens_per_layer[0]]
                else:
                    v.tokens_per_layer = [L] * len(_decoder_layers(s.model))
                del cache
        finally:
            if handle is not None:
                handle.remove()
            if undo is not None:
                undo()


# ---------------------------------------------------------------------- the physical limit


def _decoder(model):
    from .plugins import registry

    return registry().adapter_for(model).language_model(model)


def _decoder_layers(model) -> list:
    return list(_decoder(model).layers)


@dataclass
class LimitPlan:
    """The recipe's token schedule, ready to feed to the bare decoder layers.

    ``gathers[l]``: ``(B, n)`` indices, into the tokens entering layer ``l − 1``, of the tokens that
    enter layer ``l`` (only at the recipe's stage layers); ``rotary[l]``: the rotary tables of those
    tokens (their original positions); ``tokens_per_layer``: tokens entering each layer (sample 0).
    """

    gathers: dict
    rotary: dict
    masks: dict
    tokens_per_layer: list
    decode_rotary: list


def _capture_rotary(s: _Setup) -> tuple:
    """The rotary tables the untouched model hands layer 0 in the prefill and each decode step.

    Computed once, outside every timing (they cost O(L·d), identical for all variants): a
    temporary hook on layer 0 records them while the untouched model runs."""
    layer0 = _decoder_layers(s.model)[0]
    seen = []
    hook = layer0.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("position_embeddings")), with_kwargs=True)
    try:
        with torch.no_grad():
            cache = _hf_prefill(s, None)
            _hf_decode(s, cache)
    finally:
        hook.remove()
    return seen[0], seen[1:]


def _causal_additive(n: int, dtype, device) -> torch.Tensor:
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return m[None, None]


def limit_plan(s: _Setup, stats, rotary: tuple, decode_rotary: list, attn_impl: str) -> LimitPlan:
    """Turn a compressed prefill's ``stats`` (which vision tokens each stage kept) into a :class:`LimitPlan`.

    Text tokens always stay; at each stage layer the kept vision tokens (summary slots of a merger
    included) join them, in their original order. A batch whose samples kept different numbers of
    tokens cannot be fed without padding and is refused (``UsageError``)."""
    from . import masks as M

    B, L = s.vision.shape
    num_layers = len(_decoder_layers(s.model))
    pos = torch.arange(L, device=s.vision.device)
    prev = pos.expand(B, L)
    cos, sin = rotary
    gathers, rot, masks = {}, {}, {}
    eager = (attn_impl or "eager") == "eager"
    if eager:
        masks[0] = _causal_additive(L, s.embeds.dtype, s.embeds.device)
    counts = {0: L}
    for layer in sorted(stats.kept_positions_per_stage[0]):
        rows = []
        for b in range(B):
            keep = ~s.vision[b] | torch.isin(pos, stats.kept_positions_per_stage[b][layer].to(pos.device))
            rows.append(pos[keep])
        if len({len(r) for r in rows}) != 1:
            raise UsageError(f"limit: the samples kept {[len(r) for r in rows]} tokens at layer {layer}; the bare layers need equal counts")
        cur = torch.stack(rows)
        gathers[layer] = torch.stack([torch.searchsorted(prev[b], cur[b]) for b in range(B)])
        rot[layer] = (M.gather_seq(cos, cur, 1), M.gather_seq(sin, cur, 1))
        if eager:
            masks[layer] = _causal_additive(cur.shape[1], s.embeds.dtype, s.embeds.device)
        counts[layer] = cur.shape[1]
        prev = cur
    per_layer, n = [], L
    for i in range(num_layers):
        n = counts.get(i, n)
        per_layer.append(n)
    rot.setdefault(0, rotary)
    return LimitPlan(gathers, rot, masks, per_layer, list(decode_rotary))


def _layer_call(layer, hidden, mask, rotary, cache):
    out = layer(hidden, attention_mask=mask, position_ids=None, cache=cache, use_cache=True, position_embeddings=rotary)
    return out[0] if isinstance(out, tuple) else out


def limit_prefill(model, embeds: torch.Tensor, plan: LimitPlan, record: Optional[list] = None):
    """The prefill of the limit variant: the decoder layers called one by one, each fed the tokens
    the plan says (a gather at each stage layer; no hooks, no scoring, no mask rebuilding: with
    SDPA / FlashAttention and no padding the causal mask is implicit). Returns ``(logits of the
    last token, cache)``; ``record`` gets the token count entering each layer."""
    from transformers.cache_utils import DynamicCache

    from . import masks as M

    dec = _decoder(model)
    cache = DynamicCache(config=dec.config)
    hidden, rotary, mask = embeds, plan.rotary[0], plan.masks.get(0)
    for i, layer in enumerate(dec.layers):
        g = plan.gathers.get(i)
        if g is not None:
            hidden = M.gather_seq(hidden, g, 1)
            rotary, mask = plan.rotary[i], plan.masks.get(i)
        if record is not None:
            record.append(hidden.shape[1])
        hidden = _layer_call(layer, hidden, mask, rotary, cache)
    logits = model.get_output_embeddings()(dec.norm(hidden[:, -1:]))
    return logits, cache


def limit_decode(model, cache, plan: LimitPlan, batch: int, decode_id: int, steps: int,
                 step_times: Optional[list] = None) -> None:
    """Single-token decode steps of the limit variant on its cache (a lone query needs no mask);
    each step's time is appended to ``step_times`` when given."""
    dec = _decoder(model)
    device = model.get_input_embeddings().weight.device
    ids = torch.full((batch, 1), decode_id, dtype=torch.long, device=device)

    def step(t: int) -> None:
        hidden = model.get_input_embeddings()(ids)
        for layer in dec.layers:
            hidden = _layer_call(layer, hidden, None, plan.decode_rotary[t], cache)
        model.get_output_embeddings()(dec.norm(hidden))

    for t in range(steps):
        _step(device, lambda: step(t), step_times)


class _LimitRunner:
    name = "limit"

    def __init__(self, plan: LimitPlan):
        self.plan = plan
        self.recorded: list = []

    def timed(self, s: _Setup, v: Variant) -> None:
        with torch.no_grad():
            times = []
            for _ in range(v.inner):
                cache = None  # free the previous run's cache before the next prefill
                dt, (_, cache) = _clocked(s.device, lambda: limit_prefill(s.model, s.embeds, self.plan))
                times.append(dt)
            v.prefill_s.append(min(times))
            if s.new_tokens > 0:
                steps: list = []
                limit_decode(s.model, cache, self.plan, s.embeds.shape[0], s.decode_id, s.new_tokens, steps)
                v.decode_s.append(_decode_time(steps))

    def memory(self, s: _Setup, v: Variant) -> None:
        self.recorded = []
        with torch.no_grad():
            with PeakMemory(s.device) as mem:
                _, cache = limit_prefill(s.model, s.embeds, self.plan, record=self.recorded)
            v.peak_bytes = mem.peak
            v.kv_bytes = _cache_bytes(cache)
        v.tokens_per_layer = list(self.recorded)


# ---------------------------------------------------------------------- peers: the full attention matrix


class _FullMatrix:
    """Installs, for the peer variant, eager attention returning the full matrix at the probed layers.

    Called with the model before the recipe is applied; returns the undo. The wrapped ``self_attn``
    of a probed layer switches the (shared) config to eager for its own prefill call only, with an
    explicit additive causal mask, and keeps the ``(B, H, S, S)`` weights for the scorer."""

    def __init__(self, probe_layers: set):
        self.probe_layers = probe_layers
        self.weights: dict = {}
        self.handle = None

    def __call__(self, model):
        layers = _decoder_layers(model)
        undo = []
        for p in sorted(self.probe_layers):
            attn = layers[p].self_attn
            attn.forward = self._wrap(attn, attn.forward, p)
            undo.append(attn)

        def restore():
            for attn in undo:
                del attn.forward
            self.weights.clear()

        return restore

    def _wrap(self, attn, original, p: int):
        def forward(*args, **kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is None or hidden.shape[1] == 1:  # decode steps: untouched
                return original(*args, **kwargs)
            kwargs["attention_mask"] = _as_additive(kwargs.get("attention_mask"), hidden)
            cfg = attn.config
            old = cfg._attn_implementation
            cfg._attn_implementation = "eager"
            try:
                out, weights = original(*args, **kwargs)
            finally:
                cfg._attn_implementation = old
            self.weights[p] = weights
            return out, weights

        return forward


def _as_additive(mask, hidden) -> torch.Tensor:
    """Any prefill mask the model or the engine hands a layer, as eager attention's additive (B|1, 1, S, S)."""
    B, S = hidden.shape[:2]
    low = torch.finfo(hidden.dtype).min
    if mask is not None and mask.ndim == 4:
        if mask.dtype == torch.bool:
            return torch.where(mask, 0.0, low).to(hidden.dtype)
        return mask
    allowed = torch.ones(S, S, dtype=torch.bool, device=hidden.device).tril()[None, None]
    if mask is not None and mask.ndim == 2:  # FlashAttention's (B, S) padding mask
        allowed = allowed & mask.bool()[:, None, None, :]
    return torch.where(allowed, 0.0, low).to(hidden.dtype)


def _peer_recipe(recipe, num_layers: int, full: _FullMatrix):
    """The recipe with each attention scorer replaced by one that reads the full attention matrix."""
    from .schedules.explicit import ExplicitSchedule

    stages = []
    for s in recipe.stages(num_layers):
        inner = s.scorer
        if inner is None or inner.attention is None:
            stages.append(s)
            continue
        if inner.attention == "previous":
            full.probe_layers.add(s.layer - 1)
        cls = type(
            f"FullMatrix{type(inner).__name__}",
            (_FullMatrixScorer,),
            {"name": f"{inner.name}-full-matrix", "needs_embeddings": inner.needs_embeddings,
             "needs_prev_hidden": inner.needs_prev_hidden, "signals": inner.signals},
        )
        stages.append(dataclasses.replace(s, scorer=cls(inner=inner, source=inner.attention, full=full)))
    return dataclasses.replace(recipe, schedule=ExplicitSchedule(stages_=tuple(stages)), name=f"{recipe.name or 'recipe'} (full attention matrix)")


def has_attention_scorer(recipe, num_layers: int) -> bool:
    return any(s.scorer is not None and s.scorer.attention is not None for s in recipe.stages(num_layers))


from .interfaces import Scorer as _Scorer  # noqa: E402


@dataclass(frozen=True, eq=False)
class _FullMatrixScorer(_Scorer):
    """Wraps an attention scorer: its rows come from the full attention matrix, as in the original code.

    ``previous``: the probed layer ran eager attention and left its ``(B, H, S, S)`` weights;
    ``current``: the whole ``S × S`` matrix of the drop layer's own q/k on its input is computed."""

    inner: Any = None
    source: str = "previous"
    full: Any = None
    attention = None

    def score(self, view):
        from . import masks as M
        from .probes import attention_rows

        queries = self.inner.queries(view)  # (B, Q)
        B, S = view.vision_mask.shape
        if self.source == "previous":
            w = self.full.weights.pop(view.layer - 1)  # (B, H, S, S)
            H = w.shape[1]
            rows = w.gather(2, queries.clamp(min=0)[:, None, :, None].expand(B, H, -1, S)).float().mean(1)
        else:
            state = self.full.handle._current()
            module = self.full.handle._layers[view.layer]
            cos, sin = (state.cur or state.full)["position_embeddings"]
            idx = state._index(view.hidden)
            key_valid = state.valid.gather(1, idx)
            if state.alive is not None:
                key_valid = key_valid & state.alive
            normed = module.input_layernorm(view.hidden)
            every = torch.arange(S, device=idx.device).expand(B, S)
            matrix = attention_rows(module.self_attn, module.self_attn.q_proj(normed), module.self_attn.k_proj(normed),
                                    cos, sin, every, key_valid)  # (B, S, S), all H heads in fp32
            rows = M.gather_seq(matrix, queries.clamp(min=0), 1)
        rows = torch.where((queries >= 0)[..., None], rows, torch.zeros_like(rows))
        return self.inner.score(dataclasses.replace(view, attention=rows))


# ---------------------------------------------------------------------- the benchmark


def identity_recipe(recipe, num_layers: int):
    """The same stage layers and scorers with keep = 1: measures the hooks alone."""
    from .interfaces import Stage
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
    limit: bool = True,
    peer: bool = True,
    frames: int = 1,
    generate: bool = True,
) -> dict[str, Any]:
    """Measure the variants (module docstring) on one input shape; return a JSON-friendly dict.

    ``limit`` / ``peer``: include the physical-limit variant / the full-attention-matrix peer (the
    latter only exists for recipes with an attention scorer); ``generate``: also time an end-to-end
    ``generate`` per round (untouched and recipe; prefill and decode are timed either way). Raises :class:`UsageError` for sizes
    out of range and :class:`BenchInterrupted` on Ctrl-C.
    """
    import tokencomp

    for name, value, minimum in (("vision_tokens", vision_tokens, 1), ("text_tokens", text_tokens, 0),
                                 ("batch", batch, 1), ("new_tokens", new_tokens, 0), ("repeat", repeat, 1),
                                 ("frames", frames, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UsageError(f"bench: {name} must be an integer >= {minimum}, got {value!r}")
    recipe = tokencomp.load_recipe(recipe)
    handle_probe = tokencomp.apply(model, recipe)  # validates before any timing
    adapter_ids = handle_probe.adapter.vision_token_ids()
    num_layers = handle_probe._num_layers
    handle_probe.remove()
    device = model.get_input_embeddings().weight.device
    if frames > vision_tokens:
        raise UsageError(f"bench: frames ({frames}) cannot exceed vision_tokens ({vision_tokens})")
    embeds, mask, vision, groups = make_bench_inputs(model, vision_tokens, text_tokens, batch, adapter_ids[0], frames=frames)
    shape = DecoderShape.from_config(model.config)
    vocab = model.get_input_embeddings().num_embeddings
    decode_id = next(i for i in range(vocab - 1, 0, -1) if i not in adapter_ids)
    s = _Setup(model, embeds, mask, vision, new_tokens, device, decode_id, groups if frames > 1 else None)
    attn_impl = model.config.get_text_config()._attn_implementation

    runners: dict[str, Any] = {
        "untouched": _HFRunner("untouched", generate=generate),
        "hooks": _HFRunner("hooks", identity_recipe(recipe, num_layers), generate=False),
        "recipe": _HFRunner("recipe", recipe, generate=generate),
    }
    if peer and has_attention_scorer(recipe, num_layers):
        full = _FullMatrix(set())
        runners["peer"] = _HFRunner("peer", _peer_recipe(recipe, num_layers, full), generate=False, before=full)
    variants = {name: Variant(name) for name in runners}
    if limit:
        variants["limit"] = Variant("limit")
    order = list(variants)
    bar = progress_bar(total=(repeat + 2) * len(order), quiet=not progress, desc="bench", unit="run")
    measured = 0  # rounds completed for every variant (warm-up excluded)
    try:
        rotary = _capture_rotary(s) if limit else None
        # Round 0: warm-up, discarded. The recipe's run tells the limit which tokens to feed.
        for name in runners:
            warm = Variant(name)
            _timed(runners[name], s, warm)
            variants[name].calibrate(warm.prefill_s[0])
            bar.update(1)
        for name in runners:  # the memory pass: untimed, the only pass with a sampler
            runners[name].memory(s, variants[name])
            bar.set_postfix_str(f"memory {name}")
            bar.update(1)
        if limit:
            plan = limit_plan(s, runners["recipe"].stats, rotary[0], rotary[1], attn_impl)
            runners["limit"] = _LimitRunner(plan)
            warm = Variant("limit")
            runners["limit"].timed(s, warm)
            variants["limit"].calibrate(warm.prefill_s[0])
            runners["limit"].memory(s, variants["limit"])
            bar.update(2)
        for r in range(1, repeat + 1):
            rot = order[r % len(order):] + order[: r % len(order)]
            for name in rot:
                _timed(runners[name], s, variants[name])
                bar.set_postfix_str(f"{name} round {r}/{repeat}")
                bar.update(1)
            measured = r
    except KeyboardInterrupt:
        bar.close()
        report = None
        if measured and all(v.tokens_per_layer for v in variants.values()):
            for v in variants.values():
                v.truncate(measured)
            report = _report(model, recipe, variants, shape, vision_tokens, text_tokens, batch, new_tokens, measured, embeds.dtype, device)
            report["partial"] = True
            report["repeat_requested"] = repeat
            report["frames"] = frames
        raise BenchInterrupted(report) from None
    bar.close()
    rep = _report(model, recipe, variants, shape, vision_tokens, text_tokens, batch, new_tokens, repeat, embeds.dtype, device)
    rep["partial"] = False
    rep["repeat_requested"] = repeat
    rep["frames"] = frames
    return rep


CORE = ("untouched", "hooks", "recipe")


def _run(runner, s: _Setup, v: Variant) -> None:
    """One timed run of a core variant (untouched, hooks, recipe: the three every bench has). A seam
    of its own, so tests can interrupt the measurement loop at a given run."""
    runner.timed(s, v)


def _timed(runner, s: _Setup, v: Variant) -> None:
    if runner.name in CORE:
        _run(runner, s, v)
    else:
        runner.timed(s, v)


def _ratio_pair(variants, num: str, den: str, series: str) -> Optional[dict]:
    if num not in variants or den not in variants:
        return None
    a, b = getattr(variants[num], series), getattr(variants[den], series)
    return paired_ratio(a, b) if a and b else None


def _warnings(ratios: dict, rounds: int) -> list[str]:
    out = []
    if rounds < 3:
        out.append(f"only {rounds} measured round(s): no interval is meaningful; use --repeat 5 or more")
    for key, label in (("recipe/untouched", "prefill ratio"), ("limit/untouched", "limit prefill ratio"),
                       ("recipe/limit", "recipe ÷ limit"), ("peer/recipe", "peer ÷ recipe prefill")):
        r = (ratios.get(key) or {}).get("prefill")
        if r and r["n"] >= 2 and r["median"] == r["median"]:
            lo, hi = r["ci"]
            width = (hi - lo) / r["median"]
            if width > NOISE_LIMIT:
                out.append(f"{label} {r['median']:.3f}: rounds span {lo:.3f}-{hi:.3f} ({100 * width:.0f}% of it, "
                           f"{100 * r['ci_level']:.0f}% interval); differences smaller than that are noise")
    d = (ratios.get("recipe/untouched") or {}).get("decode")
    if d and d["n"] >= 2:
        lo, hi = d["ci"]
        if (hi - lo) / d["median"] > NOISE_LIMIT:
            out.append(f"decode time ratio {d['median']:.3f}: rounds span {lo:.3f}-{hi:.3f}; it is noise at that width")
    h = (ratios.get("hooks/untouched") or {}).get("prefill")
    if h and h["n"] >= 2 and h["ci"][0] <= 1 <= h["ci"][1] and abs(h["median"] - 1) > 0.01:
        out.append(f"keep=1 hooks ratio {h['median']:.3f} is noise: its interval {h['ci'][0]:.3f}-{h['ci'][1]:.3f} contains 1")
    return out


def _timed_row(b: float, c: float, r: Optional[dict]) -> dict:
    """A metric row: baseline and compressed medians, and the paired ratio ``r`` with its intervals."""
    row = {"baseline": b, "compressed": c, "ratio": r["median"] if r else float("nan")}
    if r:
        row.update({k: r[k] for k in ("ci", "ci_level", "rerun", "rerun_level", "min_based", "of_medians")})
    return row


def _report(model, recipe, variants, shape, vision_tokens, text_tokens, batch, new_tokens, repeat, dtype, device):
    base, hooks, comp = variants["untouched"], variants["hooks"], variants["recipe"]
    lim, peer = variants.get("limit"), variants.get("peer")
    f_base = prefill_flops(shape, base.tokens_per_layer) * batch
    f_comp = prefill_flops(shape, comp.tokens_per_layer) * batch
    d_base = decode_flops(shape, base.tokens_per_layer, new_tokens) * batch
    d_comp = decode_flops(shape, comp.tokens_per_layer, new_tokens) * batch
    esize = torch.finfo(dtype).bits // 8
    kv_base = kv_cache_bytes(shape, base.tokens_per_layer, esize) * batch
    kv_comp = kv_cache_bytes(shape, comp.tokens_per_layer, esize) * batch
    text = base.tokens_per_layer[0] - vision_tokens

    pairs = [("recipe", "untouched"), ("hooks", "untouched"), ("limit", "untouched"), ("recipe", "limit"),
             ("peer", "untouched"), ("peer", "recipe")]
    ratios = {}
    for num, den in pairs:
        got = {k: _ratio_pair(variants, num, den, series) for k, series in
               (("prefill", "prefill_s"), ("decode", "decode_s"), ("generate", "generate_s"))}
        if any(got.values()):
            ratios[f"{num}/{den}"] = {k: v for k, v in got.items() if v}
    nan = float("nan")
    pre = ratios["recipe/untouched"]["prefill"]
    dec = ratios["recipe/untouched"].get("decode")
    gen = ratios["recipe/untouched"].get("generate")

    def plain_row(b, c):
        return {"baseline": b, "compressed": c, "ratio": c / b if b else nan}

    metrics = {
        "prefill_s": _timed_row(base.median("prefill_s"), comp.median("prefill_s"), pre),
        "decode_tokens_per_s": _timed_row(batch * new_tokens / base.median("decode_s") if base.decode_s else nan,
                                         batch * new_tokens / comp.median("decode_s") if comp.decode_s else nan,
                                         _invert(dec) if dec else None),
        "generate_s": _timed_row(base.median("generate_s"), comp.median("generate_s"), gen),
        "peak_memory_bytes": plain_row(base.peak_bytes, comp.peak_bytes),
        "kv_cache_bytes": plain_row(base.kv_bytes, comp.kv_bytes),
        "kv_cache_bytes_after_decode": plain_row(base.kv_bytes_decoded, comp.kv_bytes_decoded),
        "prefill_flops": plain_row(f_base, f_comp),
        "decode_flops": plain_row(d_base, d_comp),
    }
    flop_ratio = f_comp / f_base
    limit_info = None
    if lim is not None:
        lr = ratios.get("limit/untouched", {}).get("prefill")
        rl = ratios.get("recipe/limit", {})
        limit_info = {
            "tokens_per_layer": lim.tokens_per_layer,
            "prefill_ratio": lr["median"] if lr else nan,
            "prefill_efficiency": (lr["median"] / flop_ratio) if lr else nan,
            "recipe_over_limit": rl.get("prefill", {}).get("median", nan),
            "recipe_over_limit_ci": rl.get("prefill", {}).get("ci", [nan, nan]),
            "decode_recipe_over_limit": rl.get("decode", {}).get("median", nan),
            "peak_memory_bytes": lim.peak_bytes,
            "kv_cache_bytes": lim.kv_bytes,
        }
    peer_info = None
    if peer is not None:
        pr = ratios.get("peer/recipe", {})
        peer_info = {
            "scorers": sorted({s.scorer.name for s in recipe.stages(shape.layers) if s.scorer is not None and s.scorer.attention}),
            "heads": shape.heads,
            "prefill_over_recipe": pr.get("prefill", {}).get("median", nan),
            "prefill_over_recipe_ci": pr.get("prefill", {}).get("ci", [nan, nan]),
            "decode_over_recipe": pr.get("decode", {}).get("median", nan),
            "peak_memory_bytes": peer.peak_bytes,
            "peak_memory_over_recipe": peer.peak_bytes / comp.peak_bytes if comp.peak_bytes else nan,
        }
    report = {
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
        "method": "timed rounds without a memory sampler (each round: the fastest of prefills_per_round prefills); "
                  "one separate untimed memory pass per variant",
        "tokens_per_layer": comp.tokens_per_layer,
        "vision_tokens_per_layer": [n - text for n in comp.tokens_per_layer],
        "average_vision_tokens": sum(comp.tokens_per_layer) / len(comp.tokens_per_layer) - text,
        "metrics": metrics,
        "variants": {
            name: {
                **{series: summarize(getattr(v, series)) for series in TIME_SERIES},
                "peak_memory_bytes": v.peak_bytes,
                "kv_cache_bytes": v.kv_bytes,
                "tokens_per_layer": v.tokens_per_layer,
                "prefills_per_round": v.inner,
            }
            for name, v in variants.items()
        },
        "ratios": ratios,
        "spread": {
            name: {"prefill": v.spread("prefill_s"), "decode": v.spread("decode_s"), "generate": v.spread("generate_s")}
            for name, v in variants.items()
        },
        "kv_cache_bytes_analytic": {"baseline": kv_base, "compressed": kv_comp},
        "flop_ratio": flop_ratio,
        "prefill_efficiency": pre["median"] / flop_ratio,
        "limit": limit_info,
        "peer": peer_info,
        "overhead_share": comp.median("overhead_s") / comp.median("prefill_s"),
        "hooks_prefill_ratio": ratios["hooks/untouched"]["prefill"]["median"],
        "hooks_prefill_ci": ratios["hooks/untouched"]["prefill"]["ci"],
        "hooks_overhead_share": hooks.median("overhead_s") / hooks.median("prefill_s"),
        "warnings": _warnings(ratios, repeat),
    }
    return add_llm_latency(report)


def add_llm_latency(rep: dict[str, Any]) -> dict[str, Any]:
    """Add the LLM generation latency to a :func:`bench` report (also to one read from a result file
    written before it existed: it is derived from the per-round times the file holds).

    Per round, a variant's prefill plus the decode run that followed it on that prefill's cache: the
    time the LLM takes to generate ``new_tokens`` tokens, which token-compression papers report as
    "LLM generation latency" (``generate()`` timed between CUDA events). Paired by round like every other
    ratio (``ratios[...]["llm"]``); ``metrics["llm_generation_s"]`` is the recipe's against the
    untouched model's. Absent when nothing was decoded."""
    series = {}
    for name, v in rep.get("variants", {}).items():
        pre, dec = v.get("prefill_s", {}).get("values", []), v.get("decode_s", {}).get("values", [])
        if dec and len(dec) == len(pre):
            series[name] = [p + d for p, d in zip(pre, dec)]
    for key, entry in rep.get("ratios", {}).items():
        num, den = key.split("/")
        if num in series and den in series:
            entry["llm"] = paired_ratio(series[num], series[den])
    gen = rep.get("ratios", {}).get("recipe/untouched", {}).get("llm")
    if gen:
        rep["metrics"]["llm_generation_s"] = _timed_row(
            statistics.median(series["untouched"]), statistics.median(series["recipe"]), gen)
    return rep


def _fmt_ci(r: Optional[dict], digits: int = 3) -> str:
    if not r:
        return "-"
    return f"{r['median']:.{digits}f} [{r['ci'][0]:.{digits}f}-{r['ci'][1]:.{digits}f}]"


def format_report(rep: dict[str, Any]) -> str:
    """Human-readable table of a :func:`bench` result."""
    m = rep["metrics"]
    lines = [
        f"recipe {rep['recipe']} on {rep['model']} ({rep['shape']['layers']} layers, hidden {rep['shape']['hidden']}, "
        f"{rep['shape']['heads']} heads), {rep['device']} {rep['dtype']} {rep['attn']}, {rep['threads']} threads",
        f"vision tokens {rep['vision_tokens']} + text {rep['text_tokens']}, batch {rep['batch']}, "
        f"{rep['new_tokens']} new tokens, {rep['repeat']} timed rounds after a warm-up; memory in a separate untimed pass"
        + (f" -- PARTIAL: interrupted after {rep['repeat']} of {rep['repeat_requested']} rounds" if rep.get("partial") else ""),
        f"average vision tokens per layer: {rep['average_vision_tokens']:.1f}",
        "",
        f"{'variant':<12}{'prefill ms (min-max)':>24}{'noise':>7}{'decode tok/s':>14}{'peak MiB':>10}{'KV MiB':>9}"
        f"{'best of':>9}",
    ]
    for name, v in rep["variants"].items():
        p, d = v["prefill_s"], v["decode_s"]
        tps = f"{rep['batch'] * rep['new_tokens'] / d['median']:.1f}" if d["n"] else "-"
        peak = v["peak_memory_bytes"]
        lines.append(
            f"{name:<12}{p['median'] * 1e3:>9.1f} ({p['min'] * 1e3:.1f}-{p['max'] * 1e3:.1f}){p['noise']:>7.2f}{tps:>14}"
            f"{(peak or 0) / 2**20:>10.1f}{v['kv_cache_bytes'] / 2**20:>9.1f}{v.get('prefills_per_round', 1):>9}"
        )
    lines += ["", f"{'metric':<22}{'baseline':>14}{'compressed':>14}{'ratio':>9}  interval (paired rounds)"]

    def fmt(key, value):
        if value is None or value != value:
            return "-"
        if "_bytes" in key:
            return f"{value / 2**20:.1f} MiB"
        if key.endswith("_flops"):
            return f"{value / 1e9:.2f} G"
        if key.endswith("_per_s"):
            return f"{value:.1f}"
        if key.endswith("_s"):
            return f"{value * 1000:.1f} ms"
        return f"{value:.1f}"

    # Measurements that were not made are said so, not printed as nan rows.
    if not rep["new_tokens"]:
        notes, skip = ["nothing decoded (new tokens 0)"], {"decode_tokens_per_s", "generate_s", "kv_cache_bytes_after_decode", "decode_flops", "llm_generation_s"}
    elif m["generate_s"]["baseline"] != m["generate_s"]["baseline"]:  # nan: --no-generate
        notes, skip = ["generate not timed"], {"generate_s"}
    else:
        notes, skip = [], set()
    for key, row in m.items():
        if key in skip:
            continue
        ci = (f"  {row['ci'][0]:.3f}-{row['ci'][1]:.3f} ({100 * row['ci_level']:.0f}%), min-based {row['min_based']:.3f}, "
              f"a rerun: {row['rerun'][0]:.3f}-{row['rerun'][1]:.3f} ({100 * row['rerun_level']:.1f}% for exchangeable rounds, "
              f"with the run's drift)") if "ci" in row else ""
        lines.append(f"{key:<22}{fmt(key, row['baseline']):>14}{fmt(key, row['compressed']):>14}{row['ratio']:>9.3f}{ci}")
    r = rep.get("ratios", {})
    lines += [f"({'; '.join(notes)})"] if notes else []
    lines += [
        "",
        f"prefill time ratio / FLOP ratio (efficiency, 1.00 = ideal): {rep['prefill_efficiency']:.3f}",
    ]
    if rep.get("limit"):
        lim = rep["limit"]
        lines.append(
            f"physical limit (bare layers fed the recipe's tokens): prefill ratio {_fmt_ci(r.get('limit/untouched', {}).get('prefill'))}"
            f" = {lim['prefill_efficiency']:.3f} x FLOP ratio; tokencomp / limit: prefill {_fmt_ci(r.get('recipe/limit', {}).get('prefill'))}"
            f", decode {_fmt_ci(r.get('recipe/limit', {}).get('decode'))}"
        )
    if rep.get("peer"):
        pe = rep["peer"]
        lines.append(
            f"peer ({', '.join(pe['scorers'])} with the full {pe['heads']}-head attention matrix, as the original code): "
            f"prefill / tokencomp {_fmt_ci(r.get('peer/recipe', {}).get('prefill'))}, peak memory / tokencomp {pe['peak_memory_over_recipe']:.2f}"
        )
    lines += [
        f"scoring + selection + gathers: {100 * rep['overhead_share']:.2f}% of the compressed prefill",
        f"hooks at keep=1: prefill ratio {_fmt_ci(r.get('hooks/untouched', {}).get('prefill'))} "
        f"(overhead inside hooks {100 * rep['hooks_overhead_share']:.2f}%)",
        f"noise (max-min)/median of prefill: " + ", ".join(f"{n} {v['prefill_s']['noise']:.2f}" for n, v in rep["variants"].items()),
    ]
    for w in rep.get("warnings", []):
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


MARKDOWN_HEADER = (
    "| recipe | vision tokens | batch | avg kept / layer | FLOP ratio | prefill ratio [interval] min-based | limit ratio "
    "| tokencomp ÷ limit [interval] min-based "
    "| time ÷ FLOPs | decode tok/s ratio [interval] | LLM generation latency ratio [interval] | KV-cache ratio | peak-mem ratio | peer ÷ tokencomp prefill "
    "| peer ÷ tokencomp peak mem | scoring share | keep=1 hooks ratio [interval] | prefill noise |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _num(x, digits=3) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def _cell(row: Optional[dict], min_based: bool = False) -> str:
    """``ratio [low-high]`` of a metric or ratio entry (old result files: the ratio alone);
    ``min_based``: followed by ``min X``, the min ÷ min estimate."""
    if not row:
        return "-"
    value = row.get("ratio", row.get("median"))
    if "ci" not in row:
        return _num(value)
    tail = f" min {_num(row['min_based'])}" if min_based and "min_based" in row else ""
    return f"{_num(value)} [{_num(row['ci'][0])}-{_num(row['ci'][1])}]{tail}"


def format_markdown_row(rep: dict[str, Any]) -> str:
    """One Markdown table row (see ``MARKDOWN_HEADER``) of a :func:`bench` result (also of result
    files written before the limit / peer variants existed: their cells are ``-``)."""
    m = rep["metrics"]
    r = rep.get("ratios", {})
    lim, peer = rep.get("limit") or {}, rep.get("peer") or {}
    hooks = r.get("hooks/untouched", {}).get("prefill") or {"ratio": rep["hooks_prefill_ratio"]}
    noise = rep["spread"]["recipe"]["prefill"]
    return (
        f"| {rep['recipe']} | {rep['vision_tokens']} | {rep.get('batch', 1)} | {rep['average_vision_tokens']:.1f} | {rep['flop_ratio']:.3f} "
        f"| {_cell(m['prefill_s'], True)} | {_num(lim.get('prefill_ratio'))} | {_cell(r.get('recipe/limit', {}).get('prefill'), True)} "
        f"| {rep['prefill_efficiency']:.3f} | {_cell(m['decode_tokens_per_s'])} | {_cell(m.get('llm_generation_s'))} "
        f"| {m['kv_cache_bytes']['ratio']:.3f} | {_num(m['peak_memory_bytes']['ratio'])} "
        f"| {_cell(r.get('peer/recipe', {}).get('prefill'))} | {_num(peer.get('peak_memory_over_recipe'), 2)} "
        f"| {100 * rep['overhead_share']:.2f}% | {_cell(hooks)} | {noise:.2f} |"
    )
