"""The engine: all model surgery lives here, as removable PyTorch hooks on an unmodified model.

``apply(model, recipe)`` installs

1. a wrapper around the ``*ForConditionalGeneration`` model's ``forward`` (an instance attribute,
   deleted on removal), which decides per call whether this forward is a *prefill* to compress
   (vision tokens in the input, empty cache), a *decode* step after a compressed prefill (the cache
   carries our metadata), or neither, and always clears that call's state afterwards, also on
   ``KeyboardInterrupt`` (which forward hooks do not see);
2. a forward pre-hook on every decoder layer. In a prefill, at a stage layer it scores and drops
   vision tokens from the hidden states; at every layer after the first drop it replaces the
   attention mask, rotary tables and position ids with versions *gathered* from the full-length
   originals (kept tokens keep their original positions). In a decode step it picks the mask
   columns that match the layer's shorter KV cache;
3. forward hooks on ``q_proj``/``k_proj`` of the layers whose attention rows a scorer needs, and on
   the layer before a variation stage (its output, before anything the model adds between layers).

Per-forward state lives in a thread-local stack (so concurrent forwards on one model do not mix)
and, for decoding, on the cache object itself (so its lifetime follows the cache; the cache's class
is swapped for a subclass that keeps the metadata in step with beam search and refuses to decode
once its handle is gone). :meth:`Handle.remove` removes every hook and the ``forward`` wrapper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import masks as M
from .accounting import kept_count
from .errors import PluginError, UnsupportedModelError, UsageError
from .interfaces import LayerView, Schedule, Stage
from .plugins import registry
from .probes import attention_rows
from .ranking import best_mask
from .recipe import Recipe, load_recipe

_META_ATTR = "_tokencomp_meta"
_SIGNALS_ATTR = "_tokencomp_signals"
_active: "weakref.WeakKeyDictionary[torch.nn.Module, Handle]" = weakref.WeakKeyDictionary()
_active_lock = threading.Lock()


@dataclass
class Stats:
    """What the last compressed forward (the prefill of a ``generate``) did.

    ``vision_tokens_per_layer[b][l]``: vision tokens of sample ``b`` entering decoder layer ``l``.
    ``kept_positions[layer][b]``: original sequence positions of the vision tokens sample ``b`` kept
    at that stage (summary tokens of a merger included, in their slots' positions);
    ``summary_positions[layer][b]``: the slots that hold summary tokens (stages with a merger only).
    ``output_positions``: (B, S) original position of every token the decoder returned (its output
    is shorter than the input after a drop).
    """

    vision_tokens_per_layer: list[list[int]] = field(default_factory=list)
    kept_positions: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    summary_positions: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    output_positions: Optional[torch.Tensor] = None
    sequence_length: int = 0

    def average_vision_tokens(self) -> list[float]:
        """Per sample, the mean over layers of the vision tokens (the papers' token budget)."""
        return [sum(row) / len(row) for row in self.vision_tokens_per_layer if row]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        return {
            "vision_tokens_per_layer": self.vision_tokens_per_layer,
            "kept_positions": {str(k): [t.tolist() for t in v] for k, v in self.kept_positions.items()},
            "summary_positions": {str(k): [t.tolist() for t in v] for k, v in self.summary_positions.items()},
            "sequence_length": self.sequence_length,
            "average_vision_tokens": self.average_vision_tokens(),
        }


@dataclass
class _LayerMeta:
    """What a decode step needs to know about one compacted layer: kept original indices, live slots."""

    idx: torch.Tensor
    alive: torch.Tensor


@dataclass
class _CacheMeta:
    """Metadata stored on the cache object after a compressed prefill (reordered with beam search)."""

    owner: "weakref.ref"  # the Handle that compacted the cache (weak: the cache must not keep it alive)
    prefill_len: int
    layers: dict[int, _LayerMeta]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for meta in self.layers.values():
            meta.idx = meta.idx.index_select(0, beam_idx.to(meta.idx.device))
            meta.alive = meta.alive.index_select(0, beam_idx.to(meta.alive.device))


@dataclass
class _Forward:
    """State of one forward call (one prefill or one decode step) on one thread."""

    mode: str  # "prefill" or "decode"
    cache_meta: Optional[_CacheMeta] = None
    # prefill
    length: int = 0
    is_vision: Optional[torch.Tensor] = None  # (B, L)
    valid: Optional[torch.Tensor] = None  # (B, L)
    groups: Optional[torch.Tensor] = None  # (B, L)
    last: Optional[torch.Tensor] = None  # (B,) original index of the last real token
    idx: Optional[torch.Tensor] = None  # (B, S) original indices of the current tokens; None: all
    alive: Optional[torch.Tensor] = None  # (B, S)
    full: Optional[dict] = None  # full-length layer kwargs captured at layer 0
    cur: Optional[dict] = None  # gathered layer kwargs for the current idx
    prev_hidden: Optional[torch.Tensor] = None
    prev_output: Optional[torch.Tensor] = None  # output of the layer before a variation stage
    keeps: dict = field(default_factory=dict)  # stage layer -> (B,) keep ratios of an input-dependent schedule
    signals: dict = field(default_factory=dict)  # vision-tower signal -> values in placeholder order
    signal_full: dict = field(default_factory=dict)  # vision-tower signal -> (B, L) over the full sequence
    embeddings: Optional[torch.Tensor] = None
    capture: dict = field(default_factory=dict)  # layer -> {"q": ..., "k": ...}
    probe_queries: dict = field(default_factory=dict)  # drop layer -> (B, Q) query indices at layer - 1
    counts: dict = field(default_factory=dict)  # layer -> (B,) vision tokens from that layer on
    kept: dict = field(default_factory=dict)
    slots: dict = field(default_factory=dict)  # layer -> per-sample summary-token positions
    cache: Any = None
    stats: Optional[Stats] = None


class Handle:
    """An applied recipe. ``handle.stats`` describes the last compressed forward;
    ``handle.remove()`` (or leaving the ``with`` block) restores the model exactly."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe):
        self.model = model
        self.recipe = recipe
        reg = registry()
        self.adapter = reg.adapter_for(model)
        self.decoder = self.adapter.language_model(model)
        self.layers = list(self.decoder.layers)
        self.num_layers = len(self.layers)
        self.stages: list[Stage] = recipe.stages(self.num_layers)
        self.stage_at = {s.layer: s for s in self.stages}
        self.text_config = self.decoder.config
        self.vision_ids = torch.tensor(self.adapter.vision_token_ids(model), dtype=torch.long)
        if self.vision_ids.numel() == 0:
            raise UnsupportedModelError(f"{type(model).__name__}: the adapter found no image/video token id in the config")
        self._check_supported()
        self.kind = M.mask_kind(self.text_config._attn_implementation)
        # A schedule whose keep ratios depend on each input's vision-token count (e.g. `budget`).
        self._adaptive = type(recipe.schedule).keeps_for is not Schedule.keeps_for
        self._keep_cache: dict[int, list[float]] = {}
        self._warned_grad = False
        self._last_stats = Stats()
        self._tls = threading.local()
        self._hooks: list = []
        self._undo: list = []
        self._removed = False
        self.profile = False
        """Set True to accumulate the time spent scoring, selecting and gathering in ``overhead_s``."""
        self.overhead_s = 0.0

    # ------------------------------------------------------------------ set-up and removal

    def _check_supported(self) -> None:
        cfg, model = self.text_config, self.model
        impl = cfg._attn_implementation or "eager"
        M.mask_kind(impl)
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or (
            getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None)
        ):
            raise UnsupportedModelError("sliding-window / hybrid attention layers are not supported yet")
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(gen, "cache_implementation", None) not in (None, "dynamic"):
            raise UnsupportedModelError(
                f"cache_implementation={gen.cache_implementation!r} is not supported: per-layer KV lengths differ "
                "after a drop, which needs the dynamic cache"
            )
        if type(model).__name__ == "OptimizedModule" or hasattr(model, "_orig_mod"):
            raise UnsupportedModelError("torch.compile'd models are not supported: apply before compiling is not possible either")
        self._signals = sorted({n for s in self.stages for n in s.scorer.signals})
        missing = [n for n in self._signals if n not in self.adapter.signal_names(model)]
        if missing:
            users = sorted({s.scorer.name for s in self.stages if set(s.scorer.signals) & set(missing)})
            have = ", ".join(self.adapter.signal_names(model)) or "none"
            raise UnsupportedModelError(
                f"scorer {', '.join(map(repr, users))} needs the vision-tower signal {', '.join(missing)}, which the "
                f"{self.adapter.name!r} adapter does not compute for {type(model).__name__} (available: {have})"
            )
        for stage in self.stages:
            scorer = stage.scorer
            if scorer.attention is not None:
                attn = self.layers[stage.layer if scorer.attention == "current" else stage.layer - 1].self_attn
                for name in ("q_proj", "k_proj"):
                    if not isinstance(getattr(attn, name, None), torch.nn.Module):
                        raise UnsupportedModelError(
                            f"scorer {scorer.name!r} needs attention rows but layer attention has no {name}"
                        )

    def _install(self) -> None:
        with _active_lock:
            if self.model in _active:
                raise UsageError(
                    f"a tokencomp recipe is already applied to this {type(self.model).__name__}; remove() it first"
                )
            _active[self.model] = self
        try:
            model = self.model
            had = "forward" in vars(model)
            previous = vars(model).get("forward")
            guard = _GuardedForward(self, model.forward)
            model.forward = guard

            def restore():
                if vars(model).get("forward") is guard:
                    if had:
                        model.forward = previous
                    else:
                        del model.forward

            self._undo.append(restore)
            for i, layer in enumerate(self.layers):
                self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            for stage in self.stages:
                if stage.scorer.attention == "previous":
                    attn = self.layers[stage.layer - 1].self_attn
                    for name in ("q", "k"):
                        proj = getattr(attn, f"{name}_proj")
                        self._hooks.append(proj.register_forward_hook(self._capture_hook(stage.layer - 1, name)))
                if stage.scorer.needs_prev_hidden:
                    self._hooks.append(self.layers[stage.layer - 1].register_forward_hook(self._output_hook()))
            if self._signals:
                self._hooks.extend(self.adapter.install_signals(self.model, self._signals, self._emit_signal))
            undo = self.adapter.install(self.model, self)
            if undo is not None:
                self._undo.append(undo)
        except BaseException:
            self.remove()
            raise

    @property
    def stats(self) -> Stats:
        """What the last compressed forward *of this thread* did (or of any thread, if this one ran none)."""
        return getattr(self._tls, "stats", None) or self._last_stats

    def remove(self) -> None:
        """Remove every hook and patch; the model is exactly as before :func:`apply`.

        A KV cache filled while the recipe was applied holds compacted layers: finish generating
        with it before removing (decoding it afterwards would see mismatched lengths).
        """
        if self._removed:
            return
        self._removed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        with _active_lock:
            if _active.get(self.model) is self:
                del _active[self.model]

    def __repr__(self) -> str:
        stages = ", ".join(
            f"{s.layer}:{s.keep:g}/{s.scorer.name}" + (f"+{s.merger.name}" if s.merger is not None else "") for s in self.stages
        )
        state = "removed" if self._removed else "applied"
        return f"<tokencomp.Handle {state} to {type(self.model).__name__}: {stages}>"

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ per-thread options

    def _opt(self, name: str, default=None):
        return getattr(self._tls, name, default)

    @contextlib.contextmanager
    def _set_opt(self, name: str, value):
        old = getattr(self._tls, name, None)
        setattr(self._tls, name, value)
        try:
            yield self
        finally:
            setattr(self._tls, name, old)

    def replay(self, kept_positions: dict[int, list[torch.Tensor]], summary_positions: Optional[dict] = None):
        """Context manager: force the selection recorded in ``kept_positions`` (and, for stages with a
        merger, ``summary_positions``; both from ``stats``) in this thread's compressed forwards, e.g. to
        recompute a generation without a cache. Mergers then merge into the recorded tokens again."""
        return self._set_opt("replay", (kept_positions, summary_positions or {}))

    def vision_mask(self, mask: torch.Tensor):
        """Context manager: the (B, L) bool vision-token mask for ``inputs_embeds``-only calls.

        Its shape must be the (batch, sequence) shape of the prefill's inputs (checked at the call)."""
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise UsageError(f"handle.vision_mask needs a (batch, sequence) bool tensor; got {got}")
        return self._set_opt("explicit_mask", mask)

    def current(self) -> Optional[_Forward]:
        """The state of this thread's forward in progress (for adapters), or None."""
        stack = self._opt("stack")
        return stack[-1] if stack else None

    # ------------------------------------------------------------------ the model's forward

    def _run_forward(self, inner, args, kwargs):
        stack = self._opt("stack")
        if stack is None:
            stack = []
            self._tls.stack = stack
        state = self._start(args, kwargs)
        stack.append(state)
        try:
            out = inner(*args, **kwargs)
        finally:
            # Also on KeyboardInterrupt: no state (which holds the cache) outlives its call.
            stack.pop()
        if state is not None and state.mode == "prefill" and state.stats is not None:
            self._finish_stats(state)
        return out

    def _start(self, args, kwargs) -> Optional[_Forward]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        meta = getattr(cache, _META_ATTR, None) if cache is not None else None
        if isinstance(meta, _CacheMeta) and cache.get_seq_length() > 0:
            if meta.owner() is not self:
                raise UsageError(
                    "this KV cache was compacted by another tokencomp handle (since removed, or applied to another "
                    "model); its layers hold different token counts. Finish generating under the handle that filled "
                    "it, or start from a fresh cache"
                )
            return _Forward("decode", cache_meta=meta)
        if cache is not None and cache.get_seq_length() > 0:
            return None  # chunked/multi-turn prefill onto a cache we did not compress: untouched
        explicit = self._opt("explicit_mask")
        embeds = kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else input_ids
        if explicit is not None:
            if ref is None or tuple(explicit.shape) != tuple(ref.shape[:2]):
                got = "no input_ids or inputs_embeds" if ref is None else f"inputs of shape {tuple(ref.shape[:2])}"
                raise UsageError(
                    f"handle.vision_mask: the mask has shape {tuple(explicit.shape)} but the call has {got} "
                    "(both must be (batch, sequence))"
                )
            is_vision = explicit.to(device=ref.device, dtype=torch.bool)
        elif embeds is None and input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] > 0:
            is_vision = torch.isin(input_ids, self.vision_ids.to(input_ids.device))
        else:
            if embeds is not None:
                warnings.warn(
                    "tokencomp: inputs_embeds-only call without a vision mask; nothing is compressed. "
                    "Wrap the call in `with handle.vision_mask(mask):`",
                    stacklevel=6,
                )
            return None
        if not bool(is_vision.any()):
            return None  # text-only prompt: untouched
        if cache is not None and not _is_dynamic(cache):
            raise UnsupportedModelError(
                f"{type(cache).__name__} is not supported: layers hold different numbers of tokens after a "
                "drop; use the default DynamicCache"
            )
        if kwargs.get("labels") is not None:
            raise UnsupportedModelError("training with labels is not supported: outputs are shorter than labels")
        B, L = is_vision.shape
        mask2d = kwargs.get("attention_mask")
        valid = mask2d.to(torch.bool) if mask2d is not None and mask2d.ndim == 2 else torch.ones_like(is_vision)
        pos = torch.arange(L, device=is_vision.device).expand(B, L)
        last = torch.where(valid, pos, torch.full_like(pos, -1)).max(dim=1).values
        groups = self.adapter.vision_groups(is_vision, kwargs)
        if not self._warned_grad and (torch.is_grad_enabled() or self.model.training):
            self._warned_grad = True
            warnings.warn(
                "tokencomp: a compressed forward runs with gradients enabled or in training mode; its outputs cover "
                "only the kept tokens (shorter than the inputs) and gradients reach only those. For inference use "
                "torch.no_grad() (generate does) and model.eval()",
                stacklevel=6,
            )
        keeps = self._keeps_for(is_vision) if self._adaptive else {}
        signals = {}
        if self._signals:
            for encoded in (kwargs.get("mm_encoder_outputs") or {}).values():
                signals.update(getattr(encoded, _SIGNALS_ATTR, None) or {})
        return _Forward(
            "prefill", length=L, is_vision=is_vision, valid=valid, groups=groups, last=last, keeps=keeps, signals=signals,
            stats=Stats(),
        )

    def _keeps_for(self, is_vision: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-sample keep ratios of every stage from an input-dependent schedule (one solve per count)."""
        rows = []
        for n in is_vision.sum(1).tolist():
            if n not in self._keep_cache:
                got = [float(k) for k in self.recipe.schedule.keeps_for(self.num_layers, n)]
                if len(got) != len(self.stages) or not all(0.0 <= k <= 1.0 for k in got):
                    raise PluginError(
                        f"schedule {self.recipe.schedule.name!r}: keeps_for({self.num_layers}, {n}) gave {got}; expected "
                        f"{len(self.stages)} keep ratios in [0, 1], one per stage"
                    )
                self._keep_cache[n] = got
            rows.append(self._keep_cache[n])
        table = torch.tensor(rows, dtype=torch.float64, device=is_vision.device)
        return {s.layer: table[:, j] for j, s in enumerate(self.stages)}

    # ------------------------------------------------------------------ decoder-layer hooks

    def _layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            state = self.current()
            if state is None:
                return None
            if state.mode == "decode":
                return self._decode_layer(state, layer_idx, args, kwargs)
            assert state.mode == "prefill"
            return self._prefill_layer(state, layer_idx, module, args, kwargs)

        return hook

    def _capture_hook(self, layer_idx: int, name: str):
        def hook(module, args, output):
            state = self.current()
            if state is not None and state.mode == "prefill" and layer_idx in state.capture:
                state.capture[layer_idx][name] = output

        return hook

    def _emit_signal(self, name: str, values: torch.Tensor, carrier: Any = None) -> None:
        state = self.current()
        if state is not None and state.mode == "prefill":
            state.signals[name] = values
        if carrier is not None:
            # generate() may run the tower before the prefill and hand its output back to every
            # forward as `mm_encoder_outputs`: the signal travels with that object.
            carrier.__dict__.setdefault(_SIGNALS_ATTR, {})[name] = values

    def _signal_view(self, state: _Forward, idx: torch.Tensor, scorer) -> dict:
        """The scorer's signals as (B, S) tensors over the current tokens."""
        out = {}
        for name in scorer.signals:
            full = state.signal_full.get(name)
            if full is None:
                values = state.signals.get(name)
                if values is None:
                    raise UnsupportedModelError(
                        f"scorer {scorer.name!r}: the vision tower did not run in this forward, so signal {name!r} is "
                        "missing (an inputs_embeds-only call?)"
                    )
                full = torch.zeros(state.is_vision.shape, dtype=values.dtype, device=values.device)
                if values.numel() != int(state.is_vision.sum()):
                    raise UnsupportedModelError(
                        f"signal {name!r} has {values.numel()} values for {int(state.is_vision.sum())} vision tokens"
                    )
                full[state.is_vision.to(values.device)] = values
                state.signal_full[name] = full
            out[name] = full.to(idx.device).gather(1, idx)
        return out

    def _output_hook(self):
        def hook(module, args, output):
            state = self.current()
            if state is not None and state.mode == "prefill":
                # The layer's own output: a model may add to the residual stream between layers
                # (Qwen3-VL deepstack), which is not the layer's variation.
                state.prev_output = output[0] if isinstance(output, tuple) else output

        return hook

    def _prefill_layer(self, state: _Forward, i: int, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if i == 0:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            state.cache = cache
            state.full = {k: kwargs.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")}
            if any(s.scorer.needs_embeddings for s in self.stages):
                state.embeddings = hidden
        stage = self.stage_at.get(i)
        if stage is not None:
            if self.profile:
                t0 = _clock(hidden)
                hidden = self._drop(state, stage, module, hidden)
                self.overhead_s += _clock(hidden) - t0
            else:
                hidden = self._drop(state, stage, module, hidden)
        if state.idx is not None:
            kwargs = dict(kwargs)
            kwargs.update(state.cur)
            if state.cache_meta is not None:
                state.cache_meta.layers[i] = _LayerMeta(state.idx, state.alive)
        nxt = self.stage_at.get(i + 1)
        if nxt is not None:
            if nxt.scorer.needs_prev_hidden:
                state.prev_hidden = hidden
            if nxt.scorer.attention == "previous":
                state.capture[i] = {}
                state.probe_queries[i + 1] = nxt.scorer.queries(self._view(state, i, hidden, stage=nxt))
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _current(self, state: _Forward, name: str):
        return (state.cur or state.full)[name]

    def _view(self, state: _Forward, layer: int, hidden, stage: Stage, attention=None, prev=None, prev_out=None) -> LayerView:
        B, S = hidden.shape[:2]
        idx = self._index(state, hidden)
        alive = state.alive if state.alive is not None else torch.ones(B, S, dtype=torch.bool, device=hidden.device)
        is_vision = state.is_vision.gather(1, idx)
        # The last real token produces the next token: it is never a candidate, even when a
        # prompt ends with vision tokens.
        pinned = idx == state.last[:, None]
        valid = state.valid.gather(1, idx)
        last = (idx <= state.last[:, None]).sum(1) - 1
        emb = M.gather_seq(state.embeddings, idx, 1) if state.embeddings is not None and state.idx is not None else state.embeddings
        return LayerView(
            layer=layer,
            hidden=hidden,
            vision_mask=is_vision & alive & ~pinned,
            text_mask=valid & ~is_vision,
            last_index=last,
            positions=idx,
            groups=state.groups.gather(1, idx),
            token_index=(torch.cumsum(state.valid.long(), 1) - 1).gather(1, idx),
            prev_hidden=prev,
            prev_output=prev_out if prev is not None else None,
            embeddings=emb,
            attention=attention,
            keep=stage.keep,
            signals=self._signal_view(state, idx, stage.scorer) if stage.scorer.signals else {},
        )

    @staticmethod
    def _index(state: _Forward, hidden) -> torch.Tensor:
        """(B, S) original indices of the current tokens."""
        if state.idx is not None:
            return state.idx
        B, S = hidden.shape[:2]
        return torch.arange(S, device=hidden.device).expand(B, S)

    def _probe(self, state: _Forward, stage: Stage, module, hidden) -> torch.Tensor:
        """Attention rows for ``stage``'s scorer, from layer ``l-1``'s captured projections or layer ``l``'s own."""
        cos, sin = self._current(state, "position_embeddings")
        idx = self._index(state, hidden)
        key_valid = state.valid.gather(1, idx)
        if state.alive is not None:
            key_valid = key_valid & state.alive
        if stage.scorer.attention == "previous":
            got = state.capture.pop(stage.layer - 1, {})
            queries = state.probe_queries.pop(stage.layer)
            if "q" not in got or "k" not in got:
                raise UnsupportedModelError(f"attention projections of layer {stage.layer - 1} were not captured")
            q_rows = M.gather_seq(got["q"], queries.clamp(min=0), 1)
            attn = self.layers[stage.layer - 1].self_attn
            return attention_rows(attn, q_rows, got["k"], cos, sin, queries, key_valid)
        view = self._view(state, stage.layer, hidden, stage)
        queries = stage.scorer.queries(view)
        normed = module.input_layernorm(hidden)
        attn = module.self_attn
        q_rows = attn.q_proj(M.gather_seq(normed, queries.clamp(min=0), 1))
        return attention_rows(attn, q_rows, attn.k_proj(normed), cos, sin, queries, key_valid)

    def _drop(self, state: _Forward, stage: Stage, module, hidden):
        B, S = hidden.shape[:2]
        dev = hidden.device
        attention = self._probe(state, stage, module, hidden) if stage.scorer.attention else None
        view = self._view(state, stage.layer, hidden, stage, attention, state.prev_hidden, state.prev_output)
        state.prev_hidden = state.prev_output = None
        idx = self._index(state, hidden)
        is_vision_cur = state.is_vision.gather(1, idx)
        pinned = is_vision_cur & (idx == state.last[:, None])  # a vision token that ends the prompt
        cand = view.vision_mask.clone()  # the engine's own copy: plugins only see the view
        n = cand.sum(1)
        budget = kept_count(n, state.keeps.get(stage.layer, stage.keep))
        replay = self._opt("replay")
        merger = stage.merger
        summary = torch.zeros_like(budget)
        if merger is not None:
            summary = torch.minimum(merger.summary_tokens(budget).clamp(min=0).to(budget), budget)
        if replay is not None and stage.layer in replay[0]:
            wanted, wanted_slots = replay[0][stage.layer], replay[1].get(stage.layer)
            kept = torch.zeros_like(cand)
            for b in range(B):
                kept[b] = cand[b] & torch.isin(idx[b], wanted[b].to(dev))
                if wanted_slots is not None:
                    kept[b] &= ~torch.isin(idx[b], wanted_slots[b].to(dev))
            scores = kept.float()
            versions = _versions(view)
        elif bool(n.any()):
            versions = _versions(view)
            scores = stage.scorer.score(view)
            _check_scores(scores, stage, (B, S), dev, cand)
            _check_untouched(view, versions, f"scorer {stage.scorer.name!r}")
            kept = stage.selector.select(scores, view, budget - summary)
            if not isinstance(kept, torch.Tensor) or tuple(kept.shape) != (B, S) or kept.dtype != torch.bool:
                got = f"{tuple(kept.shape)} {kept.dtype}" if isinstance(kept, torch.Tensor) else type(kept).__name__
                raise PluginError(
                    f"selector {stage.selector.name!r} at layer {stage.layer} returned {got}; expected a (B, S) = "
                    f"{(B, S)} bool tensor"
                )
            _check_untouched(view, versions, f"selector {stage.selector.name!r}")
            kept = kept.to(dev) & cand
        else:
            scores = torch.zeros(B, S, device=dev)
            kept = torch.zeros_like(cand)
        slots = None
        if merger is not None and bool(n.any()):
            dropped = cand & ~kept
            summary = torch.minimum(summary, dropped.sum(1))
            hidden, slots = self._merge(merger, stage, view, versions, kept, dropped, summary)
            kept = kept | slots
        base = ~is_vision_cur | pinned
        keep = base | kept
        row_len = keep.sum(1)
        S_new = int(row_len.max())
        fill = S_new - row_len
        if bool(fill.any()):
            # Ragged batch: pad short rows with the next-best vision tokens, marked dead.
            spare = is_vision_cur & ~keep
            fill_scores = torch.where(cand, scores.float(), torch.full_like(scores, -1e30, dtype=torch.float32))
            keep = keep | best_mask(fill_scores, spare, fill)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :S_new]
        new_alive = (base | kept).gather(1, order)
        new_idx = idx.gather(1, order)
        hidden = M.gather_seq(hidden, order, 1)
        state.idx, state.alive = new_idx, new_alive
        state.counts[stage.layer] = kept.sum(1) + pinned.sum(1)
        state.kept[stage.layer] = [new_idx[b][(new_alive[b] & state.is_vision[b].gather(0, new_idx[b]))] for b in range(B)]
        if slots is not None:
            state.slots[stage.layer] = [idx[b][slots[b]] for b in range(B)]
        self._regather(state, hidden.dtype)
        if state.cache is not None:
            meta = getattr(state.cache, _META_ATTR, None)
            if not isinstance(meta, _CacheMeta) or meta.owner() is not self:
                meta = _CacheMeta(weakref.ref(self), state.length, {})
                _attach(state.cache, meta)
            state.cache_meta = meta
        return hidden

    @staticmethod
    def _merge(merger, stage: Stage, view: LayerView, versions, kept, dropped, summary):
        """Run ``merger`` and hold it to its contract (see :class:`tokencomp.Merger`)."""
        who = f"merger {merger.name!r} at layer {stage.layer}"
        out = merger.merge(view, kept.clone(), dropped.clone(), summary.clone())
        _check_untouched(view, versions, who)
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise PluginError(f"{who} must return a (hidden, slots) pair of tensors; got {type(out).__name__}")
        hidden, slots = out
        if hidden.shape != view.hidden.shape or hidden.dtype != view.hidden.dtype or hidden.device != view.hidden.device:
            raise PluginError(f"{who} returned hidden states {tuple(hidden.shape)} {hidden.dtype}; expected {tuple(view.hidden.shape)} {view.hidden.dtype}")
        if slots.shape != kept.shape or slots.dtype != torch.bool:
            raise PluginError(f"{who} returned slots {tuple(slots.shape)} {slots.dtype}; expected a {tuple(kept.shape)} bool tensor")
        if bool((slots & ~dropped).any()) or not torch.equal(slots.sum(1), summary):
            raise PluginError(f"{who} must put exactly {summary.tolist()} summary tokens in dropped slots; got {slots.sum(1).tolist()}")
        return hidden, slots

    def _regather(self, state: _Forward, dtype) -> None:
        full = state.full
        idx, alive = state.idx, state.alive
        cos, sin = full["position_embeddings"]
        cur = {
            "attention_mask": M.gather_prefill_mask(full["attention_mask"], idx, alive, self.kind, dtype),
            "position_embeddings": (M.gather_seq(cos, idx, 1), M.gather_seq(sin, idx, 1)),
            # FlashAttention reads gapped position ids as packed sequences when B == 1; RoPE is
            # already in position_embeddings, so flash layers get none after a drop.
            "position_ids": None if self.kind == M.FLASH else M.gather_positions(full["position_ids"], idx),
        }
        state.cur = cur

    def _decode_layer(self, state: _Forward, i: int, args, kwargs):
        meta = state.cache_meta.layers.get(i)
        if meta is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        q_len = hidden.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        kv_len = cache.layers[i].get_seq_length() - meta.idx.shape[1] + state.cache_meta.prefill_len + q_len
        mask = kwargs.get("attention_mask")
        new = M.remap_decode_mask(mask, meta.idx, meta.alive, state.cache_meta.prefill_len, kv_len, q_len, self.kind, hidden.dtype)
        if new is mask:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = new
        return args, kwargs

    def _finish_stats(self, state: _Forward) -> None:
        B = state.is_vision.shape[0]
        n = state.is_vision.sum(1)
        per_layer, cur = [], n
        for i in range(self.num_layers):
            if i in state.counts:
                cur = state.counts[i]
            per_layer.append(cur)
        table = torch.stack(per_layer, dim=1).tolist() if per_layer else [[] for _ in range(B)]
        out_pos = state.idx if state.idx is not None else torch.arange(state.length).expand(B, -1)
        stats = Stats(table, dict(state.kept), dict(state.slots), out_pos, state.length)
        self._tls.stats = stats
        self._last_stats = stats


def _clock(tensor: torch.Tensor) -> float:
    """Wall time after the device has finished queued work (only used when profiling)."""
    import time

    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


def _is_dynamic(cache) -> bool:
    from transformers.cache_utils import DynamicCache

    if not isinstance(cache, DynamicCache):
        return False
    return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", []))


class _CompactedCache:
    """Put in front of a cache's class after a compressed prefill: keeps our metadata in step with
    beam search, and refuses to decode once the handle that compacted it is gone (an unhooked model
    would otherwise fail deep inside attention, or silently read the wrong columns).

    A class, not patched instance methods: no reference cycle through the cache (it is freed as
    soon as its user drops it), and ``copy.deepcopy`` of the cache stays correct."""

    def update(self, *args, **kwargs):
        owner = self.__dict__[_META_ATTR].owner()
        if owner is None or owner._removed:
            raise UsageError(
                "this KV cache was compacted by a tokencomp recipe that has since been removed; its layers hold "
                "different token counts. Finish generating before remove(), or start from a fresh cache"
            )
        return super().update(*args, **kwargs)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.__dict__[_META_ATTR].reorder(beam_idx)

    # The model sizes masks and positions from layer 0's length. After an input stage layer 0 is
    # compacted too, so the cache reports every layer's *logical* length (tokens of the original
    # sequence plus those added since); the engine picks each layer's mask columns from that.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._logical(layer_idx, super().get_seq_length(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        kv_length, offset = super().get_mask_sizes(query_length, layer_idx)
        return self._logical(layer_idx, kv_length - query_length) + query_length, offset

    def _logical(self, layer_idx: int, physical: int) -> int:
        meta = self.__dict__[_META_ATTR]
        lm = meta.layers.get(layer_idx)
        if lm is None or physical == 0:
            return physical
        return physical - lm.idx.shape[1] + meta.prefill_len


_compacted_classes: dict[type, type] = {}


def _attach(cache, meta: _CacheMeta) -> None:
    """Store ``meta`` on the cache and give it the :class:`_CompactedCache` behaviour."""
    setattr(cache, _META_ATTR, meta)
    cls = type(cache)
    if issubclass(cls, _CompactedCache):
        return
    sub = _compacted_classes.get(cls)
    if sub is None:
        name = f"Compacted{cls.__name__}"
        sub = type(name, (_CompactedCache, cls), {"__module__": __name__, "__qualname__": name})
        globals().setdefault(name, sub)  # picklable by name
        _compacted_classes[cls] = sub
    cache.__class__ = sub


class _GuardedForward:
    """The model's ``forward`` while a recipe is applied (see the module docstring)."""

    def __init__(self, handle: Handle, inner):
        self._handle = handle
        self._inner = inner
        functools.update_wrapper(self, inner)  # generate() inspects the wrapped signature

    def __call__(self, *args, **kwargs):
        return self._handle._run_forward(self._inner, args, kwargs)

    def __deepcopy__(self, memo):
        raise UsageError(
            "cannot copy.deepcopy a model while a tokencomp recipe is applied to it: the copy would share this "
            "handle's hooks. Copy before apply() or after remove(), then apply the recipe to the copy"
        )

    def __reduce__(self):
        raise UsageError("cannot pickle a model while a tokencomp recipe is applied to it; remove() it first")


def _versions(view: LayerView) -> dict[str, int]:
    """In-place version counters of the view's tensors (to detect a plugin writing into them)."""
    return {f.name: v._version for f in dataclasses.fields(view) if isinstance(v := getattr(view, f.name), torch.Tensor)}


def _check_untouched(view: LayerView, versions: dict[str, int], who: str) -> None:
    for name, version in versions.items():
        if getattr(view, name)._version != version:
            raise PluginError(f"{who} at layer {view.layer} modified view.{name} in place; plugins must treat the view as read-only")


def _check_scores(scores, stage: Stage, shape: tuple, device, cand: torch.Tensor) -> None:
    """A scorer's output: a (B, S) real tensor on the hidden states' device, no NaN on candidates.
    ±inf are valid scores (certainly keep / certainly drop); NaN has no order and is an error."""
    who = f"scorer {stage.scorer.name!r} at layer {stage.layer}"
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise PluginError(f"{who} returned {got}; expected a (B, S) = {shape} tensor")
    if scores.device != device:
        raise PluginError(f"{who} returned scores on {scores.device}; the hidden states are on {device}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise PluginError(f"{who} returned {scores.dtype} scores; expected real numbers")
    if scores.is_floating_point() and bool((torch.isnan(scores) & cand).any()):
        raise PluginError(f"{who} returned NaN scores for live vision tokens")


def apply(model: torch.nn.Module, recipe) -> Handle:
    """Apply a recipe (a :class:`Recipe`, path, shipped name, YAML text or dict) to ``model``.

    Everything is checked before the first forward: the model class (an adapter must exist), the
    recipe's layers against the decoder depth, the attention implementation and cache type.
    Returns a :class:`Handle`; use it as a context manager or call ``remove()``.
    """
    handle = Handle(model, load_recipe(recipe))
    handle._install()
    return handle
