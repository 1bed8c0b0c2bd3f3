"""The engine: all model surgery lives here, as removable PyTorch hooks on an unmodified model.

:class:`Handle` is the model-level object (checks, install / remove, per-thread options, stats);
each compressed forward gets a :class:`~tokencomp.prefill.Prefill` and each decode step after it a
:class:`~tokencomp.decode.Decode`, which own their state and their per-layer step; which tokens a
compacted sequence holds is the pure function :func:`~tokencomp.compaction.compact`.

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
import functools
import threading
import warnings
import weakref
from typing import Any, Callable, Optional, Union

import torch

from . import masks as M
from .decode import Decode, forward_cache, meta_of
from .errors import PluginError, UnsupportedModelError, UsageError, copy_refused
from .interfaces import Schedule, Selection, Stage
from .plugins import PluginRegistry, registry
from .plugins import current as current_plugins
from .prefill import Prefill
from .recipe import Recipe, load_recipe
from .stats import Stats

__all__ = ["apply", "Handle", "Stats", "prompt_vision_mask"]

_SIGNALS_ATTR = "_tokencomp_signals"
_active: "weakref.WeakKeyDictionary[torch.nn.Module, Handle]" = weakref.WeakKeyDictionary()
_active_lock = threading.Lock()


_FORMERLY_PUBLIC = frozenset(
    ("decoder", "layers", "num_layers", "stages", "stage_at", "decode_stages", "decode_at", "text_config", "vision_ids", "kind", "current")
)
"""Handle attributes that were public before they became the engine's own (``_name``)."""


class Handle:
    """An applied recipe. ``handle.stats`` describes the last compressed forward;
    ``handle.remove()`` (or leaving the ``with`` block) restores the model exactly.

    Public: ``model``, ``recipe``, ``adapter`` (the model's :class:`~tokencomp.ModelAdapter`), ``stats``,
    ``remove()``, ``replay()``, ``vision_mask()``, ``selection()``, ``on_prefill()``, ``profile`` /
    ``overhead_s``. Everything else is the engine's own."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe):
        self.model = model
        self.recipe = recipe
        reg = registry()
        self.adapter = reg.adapter_for(model)
        self._decoder = self.adapter.language_model(model)
        self._layers = list(self._decoder.layers)
        self._num_layers = len(self._layers)
        every = recipe.stages(self._num_layers)
        self._stages: list[Stage] = [s for s in every if not s.decode]
        self._stage_at = {s.layer: s for s in self._stages}
        self._decode_stages: list[Stage] = [s for s in every if s.decode]
        self._decode_at = {s.layer: s for s in self._decode_stages}
        self._text_config = self._decoder.config
        self._vision_ids = torch.tensor(self.adapter.vision_token_ids(model), dtype=torch.long)
        if self._vision_ids.numel() == 0:
            raise UnsupportedModelError(f"{type(model).__name__}: the adapter found no image/video token id in the config")
        self._check_supported()
        self._kind = M.mask_kind(self._text_config._attn_implementation)
        # A schedule whose keep ratios depend on each input's vision-token count (e.g. `budget`).
        self._adaptive = type(recipe.schedule).keeps_for is not Schedule.keeps_for
        self._keep_cache: dict[int, list[float]] = {}
        self._warned_grad = False
        self._last_stats = Stats()
        self._prefill_listeners: list[Callable[[Stats], None]] = []
        self._tls = threading.local()
        self._hooks: list = []
        self._undo: list = []
        self._removed = False
        self.profile = False
        """Set True to accumulate the time spent scoring, selecting and gathering in ``overhead_s``."""
        self.overhead_s = 0.0

    # ------------------------------------------------------------------ set-up and removal

    def _check_supported(self) -> None:
        cfg, model = self._text_config, self.model
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
        if any(s.renumber for s in self._stages) and not self.adapter.renumber:
            raise UnsupportedModelError(
                f"renumber: the {self.adapter.name!r} adapter's positions are not one number per token "
                f"({type(model).__name__}); keep original positions (drop `renumber:`)"
            )
        self._signals = sorted({n for s in self._stages for n in s.scorer.signals})
        missing = [n for n in self._signals if n not in self.adapter.signal_names(model)]
        if missing:
            users = sorted({s.scorer.name for s in self._stages if set(s.scorer.signals) & set(missing)})
            have = ", ".join(self.adapter.signal_names(model)) or "none"
            raise UnsupportedModelError(
                f"scorer {', '.join(map(repr, users))} needs the vision-tower signal {', '.join(missing)}, which the "
                f"{self.adapter.name!r} adapter does not compute for {type(model).__name__} (available: {have})"
            )
        for stage in self._stages:
            scorer = stage.scorer
            if scorer.attention is not None:
                attn = self._layers[stage.layer if scorer.attention == "current" else stage.layer - 1].self_attn
                for name in ("q_proj", "k_proj"):
                    if not isinstance(getattr(attn, name, None), torch.nn.Module):
                        raise UnsupportedModelError(
                            f"scorer {scorer.name!r} needs attention rows but layer attention has no {name}"
                        )
                form = dict(scorer.attention_rows)
                if set(form) - {"rope", "causal", "heads"} or form.get("heads", "mean") not in ("mean", "max") or any(
                    not isinstance(form[k], bool) for k in ("rope", "causal") if k in form
                ):
                    raise PluginError(
                        f"scorer {scorer.name!r}: attention_rows {form!r} must take rope / causal (true or false) and "
                        "heads ('mean' or 'max') only"
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
            for i, layer in enumerate(self._layers):
                self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            for stage in self._stages:
                names: tuple[str, ...] = ()
                if stage.scorer.attention == "previous":
                    names = ("q", "k")
                elif stage.scorer.needs_prev_keys and stage.layer > 0:  # an input stage has no layer before it
                    names = ("k",)
                for name in names:
                    proj = getattr(self._layers[stage.layer - 1].self_attn, f"{name}_proj")
                    self._hooks.append(proj.register_forward_hook(self._capture_hook(stage.layer - 1, name)))
                if stage.scorer.needs_prev_hidden:
                    self._hooks.append(self._layers[stage.layer - 1].register_forward_hook(self._output_hook()))
            for stage in self._decode_stages:
                if self._stage_at.get(stage.layer) is None or self._stage_at[stage.layer].scorer.attention != "previous":
                    q_proj = self._layers[stage.layer - 1].self_attn.q_proj
                    self._hooks.append(q_proj.register_forward_hook(self._capture_hook(stage.layer - 1, "q")))
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

    def on_prefill(self, callback: Callable[[Stats], None]) -> Callable[[], None]:
        """Call ``callback(stats)`` after every compressed prefill, in the thread that ran it and before
        the model's forward hooks see its output (a hook can pair the :class:`Stats` with its call, e.g.
        to score the shorter logits with ``stats.output_positions``). Returns the function that
        unregisters it."""
        self._prefill_listeners.append(callback)

        def unregister() -> None:
            if callback in self._prefill_listeners:
                self._prefill_listeners.remove(callback)

        return unregister

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

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: the formerly public names still read, with a warning.
        if name in _FORMERLY_PUBLIC:
            warnings.warn(f"Handle.{name} is internal to the engine (Handle._{name}) and may change", DeprecationWarning, stacklevel=2)
            return getattr(self, f"_{name}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        stages = ", ".join(
            f"{s.layer}:{s.keep:g}/{s.scorer.name}" + (f"+{s.merger.name}" if s.merger is not None else "") for s in self._stages
        )
        stages += "".join(f", decode {s.layer}:{s.keep:g}/{s.decode}" for s in self._decode_stages)
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

    def replay(self, kept_positions: Union[Stats, dict[int, list[torch.Tensor]]], summary_positions: Optional[dict] = None):
        """Context manager: force the selection a :class:`Stats` recorded in this thread's compressed
        forwards, e.g. to recompute a generation without a cache; mergers then merge into the recorded
        tokens again. Pass the ``Stats``, or its stage-first ``kept_positions`` (and, for stages with a
        merger, ``summary_positions``)."""
        if isinstance(kept_positions, Stats):
            kept_positions, summary_positions = kept_positions.kept_positions, kept_positions.summary_positions
        return self._set_opt("replay", (kept_positions, summary_positions or {}))

    def vision_mask(self, mask: torch.Tensor, groups: Optional[torch.Tensor] = None):
        """Context manager: the (B, L) bool vision-token mask for ``inputs_embeds``-only calls, and
        optionally the (B, L) image / frame number of each vision token (``-1`` elsewhere; default:
        each contiguous run of vision tokens is one group) — what quota selectors and video methods
        read from ``view.groups``.

        Shapes must be the (batch, sequence) shape of the prefill's inputs (checked at the call)."""
        for name, t in (("mask", mask), ("groups", groups)):
            if t is None and name == "groups":
                continue
            if not isinstance(t, torch.Tensor) or t.ndim != 2:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise UsageError(f"handle.vision_mask needs (batch, sequence) tensors; got {name} {got}")
        if groups is not None and groups.shape != mask.shape:
            raise UsageError(f"handle.vision_mask: groups {tuple(groups.shape)} and mask {tuple(mask.shape)} differ in shape")
        return self._set_opt("explicit_mask", (mask, groups))

    def _current(self) -> Union[Prefill, Decode, None]:
        """The engine's own state of this thread's forward in progress, or None (adapters read
        :meth:`selection` instead)."""
        stack = self._opt("stack")
        return stack[-1] if stack else None

    def selection(self) -> Optional[Selection]:
        """Which tokens this thread's compressed prefill carries now (a read-only :class:`Selection`),
        or None outside a prefill and before its first drop: what a model adapter's patches may read."""
        state = self._current()
        if not isinstance(state, Prefill) or state.idx is None:
            return None
        return Selection(state.idx, state.alive)

    # ------------------------------------------------------------------ the model's forward

    def _run_forward(self, inner, args, kwargs):
        stack = self._opt("stack")
        if stack is None:
            stack = []
            self._tls.stack = stack
        state = self._start(args, kwargs)
        if isinstance(state, Decode):
            kwargs = state.shift_positions(kwargs)
        stack.append(state)
        try:
            out = inner(*args, **kwargs)
        finally:
            # Also on KeyboardInterrupt: no state (which holds the cache) outlives its call.
            stack.pop()
        if isinstance(state, Prefill):
            stats = state.stats()
            self._tls.stats = self._last_stats = stats
            for callback in tuple(self._prefill_listeners):  # a copy: callbacks may unregister
                callback(stats)
        return out

    def _start(self, args, kwargs) -> Union[Prefill, Decode, None]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = forward_cache(kwargs)
        meta = meta_of(cache)
        if meta is not None and cache.get_seq_length() > 0:
            if meta.owner() is not self:
                raise UsageError(
                    "this KV cache was compacted by another tokencomp handle (since removed, or applied to another "
                    "model); its layers hold different token counts. Finish generating under the handle that filled "
                    "it, or start from a fresh cache"
                )
            return Decode(self, meta)
        if cache is not None and cache.get_seq_length() > 0:
            return None  # chunked/multi-turn prefill onto a cache we did not compress: untouched
        explicit, explicit_groups = self._opt("explicit_mask") or (None, None)
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
        else:
            is_vision = prompt_vision_mask(args, kwargs, self._vision_ids)
        if is_vision is None:
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
        if explicit_groups is not None:
            groups = torch.where(is_vision, explicit_groups.to(is_vision.device).long(), torch.full_like(explicit_groups, -1, device=is_vision.device).long())
        else:
            groups = self.adapter.vision_groups(is_vision, kwargs)
        # Which frames form a video: the adapter's word (None with explicit groups, which it cannot see).
        videos = self.adapter.vision_videos(is_vision, groups, kwargs) if explicit_groups is None else None
        widths = self.adapter.vision_grid_widths(is_vision, groups, kwargs) if explicit_groups is None else None
        for what, got in (("vision_groups", groups), ("vision_videos", videos), ("vision_grid_widths", widths)):
            if got is not None and (not isinstance(got, torch.Tensor) or tuple(got.shape) != (B, L)):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise PluginError(f"model adapter {self.adapter.name!r}: {what} gave {shape}; expected a ({B}, {L}) tensor, one entry per token")
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
        return Prefill(self, is_vision=is_vision, valid=valid, groups=groups, last=last, keeps=keeps, signals=signals, videos=videos,
                       grid_widths=widths)

    def _keeps_for(self, is_vision: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-sample keep ratios of every stage from an input-dependent schedule (one solve per count)."""
        rows = []
        for n in is_vision.sum(1).tolist():
            if n not in self._keep_cache:
                got = [float(k) for k in self.recipe.schedule.keeps_for(self._num_layers, n)]
                if len(got) != len(self._stages) or not all(0.0 <= k <= 1.0 for k in got):
                    raise PluginError(
                        f"schedule {self.recipe.schedule.name!r}: keeps_for({self._num_layers}, {n}) gave {got}; expected "
                        f"{len(self._stages)} keep ratios in [0, 1], one per stage"
                    )
                self._keep_cache[n] = got
            rows.append(self._keep_cache[n])
        table = torch.tensor(rows, dtype=torch.float64, device=is_vision.device)
        return {s.layer: table[:, j] for j, s in enumerate(self._stages)}

    # ------------------------------------------------------------------ hooks

    def _layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            state = self._current()
            return None if state is None else state.layer(layer_idx, module, args, kwargs)

        return hook

    def _capture_hook(self, layer_idx: int, name: str):
        def hook(module, args, output):
            state = self._current()
            if state is not None:
                state.captured(layer_idx, name, output)

        return hook

    def _output_hook(self):
        def hook(module, args, output):
            state = self._current()
            if isinstance(state, Prefill):
                state.layer_output(output)

        return hook

    def _emit_signal(self, name: str, values: torch.Tensor, carrier: Any = None) -> None:
        state = self._current()
        if isinstance(state, Prefill):
            state.signals[name] = values
        if carrier is not None:
            # generate() may run the tower before the prefill and hand its output back to every
            # forward as `mm_encoder_outputs`: the signal travels with that object.
            carrier.__dict__.setdefault(_SIGNALS_ATTR, {})[name] = values


def prompt_vision_mask(args: tuple, kwargs: dict, vision_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """The (B, L) vision-token mask of a model forward that prefills a prompt given as ``input_ids``
    (no KV cache, or an empty one) with vision tokens in it; None for every other forward: a decode
    step, a prompt continued on a filled cache, an ``inputs_embeds`` call, a text-only prompt.

    The engine compresses exactly these forwards (and ``inputs_embeds`` ones inside
    :meth:`Handle.vision_mask`); integrations that describe untouched runs use the same test."""
    cache = forward_cache(kwargs)
    if cache is not None and cache.get_seq_length() > 0:
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if kwargs.get("inputs_embeds") is not None or input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        return None
    is_vision = torch.isin(input_ids, vision_ids.to(input_ids.device))
    return is_vision if bool(is_vision.any()) else None


def _is_dynamic(cache) -> bool:
    from transformers.cache_utils import DynamicCache

    if not isinstance(cache, DynamicCache):
        return False
    return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", []))


class _GuardedForward:
    """The model's ``forward`` while a recipe is applied (see the module docstring)."""

    def __init__(self, handle: Handle, inner):
        self._handle = handle
        self._inner = inner
        functools.update_wrapper(self, inner)  # generate() inspects the wrapped signature

    def __call__(self, *args, **kwargs):
        return self._handle._run_forward(self._inner, args, kwargs)

    def __deepcopy__(self, memo):
        raise copy_refused()

    def __reduce__(self):
        raise UsageError("cannot pickle a model while a tokencomp recipe is applied to it; remove() it first")


def apply(model: torch.nn.Module, recipe, *, plugins: Optional[PluginRegistry] = None) -> Handle:
    """Apply a recipe (a :class:`Recipe`, path, shipped name, YAML text or dict) to ``model``.

    Everything is checked before the first forward: the model class (an adapter must exist), the
    recipe's layers against the decoder depth, the attention implementation and cache type.
    Plugins (the recipe's names, the model adapter) come from ``plugins`` (a
    :class:`~tokencomp.plugins.PluginRegistry`; default: the registry in effect).
    Returns a :class:`Handle`; use it as a context manager or call ``remove()``.
    """
    with (plugins or current_plugins()).use():
        handle = Handle(model, load_recipe(recipe))
    handle._install()
    return handle
