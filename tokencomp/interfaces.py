"""The plugin interfaces: :class:`Scorer`, :class:`Selector`, :class:`Merger`, :class:`Schedule`,
:class:`ModelAdapter`, and the read-only views the engine gives them (:class:`LayerView` to scorers,
selectors and mergers; :class:`Selection` to a model adapter's patches).

Plugins subclass these as small dataclasses: the dataclass fields *are* the parameters a recipe may
set (their type hints are the schema the recipe loader validates against), and the class attribute
``name`` is the name recipes use. Nothing here knows any method by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Literal, Mapping, Optional, Sequence

import torch

from .masks import token_runs  # noqa: F401  (moved to masks; importable from here as before)

AttentionSource = Literal["previous", "current"]


@dataclass(frozen=True)
class LayerView:
    """Read-only view of one decoder layer's input during a compressed prefill.

    All ``(B, S)`` tensors index the *current* (already compacted) sequence of ``S`` tokens.
    Scorers must not modify any tensor in it.
    """

    layer: int
    """Index of the decoder layer about to run."""
    hidden: torch.Tensor
    """``(B, S, D)`` residual stream entering ``layer``."""
    vision_mask: torch.Tensor
    """``(B, S)`` bool: live vision tokens (the candidates to score)."""
    text_mask: torch.Tensor
    """``(B, S)`` bool: real (non-padding) text tokens."""
    last_index: torch.Tensor
    """``(B,)`` long: index of each sample's last real token (the query that generates the answer).
    That token is never a candidate (not in ``vision_mask``), even when the prompt ends with vision tokens."""
    positions: torch.Tensor
    """``(B, S)`` long: each token's position in the original, uncompressed sequence."""
    groups: torch.Tensor
    """``(B, S)`` long: image / frame number of each vision token, ``-1`` for other tokens."""
    token_index: torch.Tensor
    """``(B, S)`` long: index of each token among its sample's real tokens (padding not counted),
    so it does not depend on how the sample was padded in a batch."""
    prev_hidden: Optional[torch.Tensor] = None
    """``(B, S, D)`` residual stream that entered ``layer - 1`` (only if the scorer sets ``needs_prev_hidden``)."""
    prev_output: Optional[torch.Tensor] = None
    """``(B, S, D)`` output of layer ``layer - 1`` itself (with ``prev_hidden``). It is ``hidden`` unless the
    model adds something to the residual stream between layers (Qwen3-VL's deepstack features), so
    ``prev_output - prev_hidden`` is what layer ``layer - 1`` did to each token."""
    embeddings: Optional[torch.Tensor] = None
    """``(B, S, D)`` input embeddings of the current tokens (only if the scorer sets ``needs_embeddings``)."""
    prompt_embeddings: Optional[torch.Tensor] = None
    """``(B, L, D)`` input embeddings of the whole uncompressed prompt, which ``positions`` index (with
    ``needs_embeddings``): for what a method decides once from all the prompt's tokens."""
    prompt_vision_mask: Optional[torch.Tensor] = None
    """``(B, L)`` bool: the vision tokens of the whole uncompressed prompt (with ``prompt_embeddings``)."""
    prev_keys: Optional[torch.Tensor] = None
    """``(B, S, Hkv·d)`` the key vectors layer ``layer - 1`` computed for the current tokens, all KV heads
    concatenated, after its k-norm and RoPE, as it caches them (only if the scorer sets ``needs_prev_keys``)."""
    final_normed: Optional[torch.Tensor] = None
    """``(B, S, D)`` ``hidden`` through the decoder's final norm (only if the scorer sets ``needs_final_norm``)."""
    attention: Optional[torch.Tensor] = None
    """``(B, Q, S)`` float32 attention probabilities of the rows the scorer asked for with
    :meth:`Scorer.queries`, averaged over heads unless its ``attention_rows`` says otherwise (only if
    the scorer sets ``attention``); rows for ``-1`` queries are 0."""
    keep: float = 1.0
    """Fraction of the live vision tokens this stage keeps."""
    signals: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Vision-tower signals the scorer declared in ``Scorer.signals``: ``(B, S)`` per name, aligned with
    the current tokens (0 on non-vision tokens)."""
    videos: Optional[torch.Tensor] = None
    """``(B, S)`` long: the video each vision token belongs to (its frame is its ``groups`` entry), ``-1``
    for images and other tokens; from :meth:`ModelAdapter.vision_videos`. ``None`` when the adapter
    cannot tell: video methods then take runs of contiguous, equal-size frames for videos."""
    grid_widths: Optional[torch.Tensor] = None
    """``(B, S)`` long: tokens per row of the grid of each vision token's image or frame (0 elsewhere);
    from :meth:`ModelAdapter.vision_grid_widths`. ``None`` when the adapter cannot tell: spatial
    methods then take square grids (and a non-square group as one row)."""


class _Plugin:
    """Shared helpers of plugin classes: name and parameter introspection."""

    name: ClassVar[str] = ""
    default: ClassVar[bool] = False
    """True for the plugin a recipe uses when it names none of this kind (one per kind)."""

    @classmethod
    def params(cls) -> dict[str, dataclasses.Field]:
        """The recipe parameters of this plugin: its dataclass fields (empty for a plain class)."""
        if not dataclasses.is_dataclass(cls):
            return {}
        return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


class Scorer(_Plugin):
    """Gives every live vision token a score; higher means more worth keeping.

    Class attributes declare what the engine must provide in the :class:`LayerView`:

    * ``needs_prev_hidden``: the residual stream that entered the previous layer;
    * ``needs_embeddings``: the input embeddings of the current tokens (and of the whole prompt);
    * ``needs_prev_keys``: the keys layer ``l - 1`` computed (``LayerView.prev_keys``; None in an input stage);
    * ``needs_final_norm``: the hidden states through the decoder's final norm (``LayerView.final_normed``);
    * ``attention``: ``"previous"`` for attention rows of the layer *before* the drop layer (taken
      from that layer's own post-RoPE q/k while it runs), ``"current"`` for rows computed with the
      drop layer's own norm and q/k projections on its input. Rows are chosen by :meth:`queries`;
    * ``attention_rows``: how those rows are formed, as :func:`tokencomp.probes.attention_rows` takes
      them (default: as the layer attends, after RoPE, causal, averaged over heads; e.g. PruneVid's
      ``{"rope": False, "causal": False, "heads": "max"}``);
    * ``signals``: vision-tower signals by name (see :meth:`ModelAdapter.signal_names`).
    """

    needs_prev_hidden: ClassVar[bool] = False
    needs_embeddings: ClassVar[bool] = False
    needs_prev_keys: ClassVar[bool] = False
    needs_final_norm: ClassVar[bool] = False
    attention: ClassVar[Optional[AttentionSource]] = None
    attention_rows: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    signals: ClassVar[tuple[str, ...]] = ()
    """Named vision-tower signals the scorer reads from ``view.signals`` (e.g. ``"cls_attention"``);
    the model adapter computes them (:meth:`ModelAdapter.install_signals`)."""

    def queries(self, view: LayerView) -> torch.Tensor:
        """``(B, Q)`` long indices of the query rows whose attention the scorer needs; ``-1`` pads.

        Called with the view of the layer whose attention is probed. Default: the last real token.
        """
        return view.last_index[:, None]

    def score(self, view: LayerView) -> torch.Tensor:  # pragma: no cover - interface
        """Return ``(B, S)`` scores; only entries where ``view.vision_mask`` is True are used."""
        raise NotImplementedError


class Selector(_Plugin):
    """Turns scores and a per-sample budget into the set of kept vision tokens."""

    def select(self, scores: torch.Tensor, view: LayerView, budget: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Return a ``(B, S)`` bool mask, a subset of ``view.vision_mask``.

        ``budget`` is ``(B,)`` long: ``floor(n_b * keep)`` for each sample's ``n_b`` live vision tokens.
        A selector may keep a different number (e.g. a minimum of one); the engine handles ragged counts.
        """
        raise NotImplementedError


class Merger(_Plugin):
    """Folds the vision tokens a stage drops into the ones it keeps, or into a few new *summary*
    tokens, instead of discarding them.

    A stage with a merger keeps exactly its budget ``k``: the selector keeps ``k - c`` tokens, where
    ``c = summary_tokens(k)``, and :meth:`merge` turns ``c`` of the dropped tokens into summary tokens.
    A summary token takes the *slot* of one dropped token: its original position (so RoPE, masks and
    the cache treat it like that token), and its row of the hidden states. A merger may also lay the
    states of the held slots (kept and summary) out in another order, slots staying where they are:
    VisionZip's contextual tokens follow the dominant ones of their image (``contextual``'s ``place``).
    """

    def summary_tokens(self, budget: torch.Tensor) -> torch.Tensor:
        """``(B,)`` long: how many of each sample's ``budget`` become summary tokens (default none)."""
        return torch.zeros_like(budget)

    def merge(
        self, view: LayerView, kept: torch.Tensor, dropped: torch.Tensor, summary: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        """Return ``(hidden, slots)``.

        ``kept`` / ``dropped``: ``(B, S)`` bool, the selector's choice among ``view.vision_mask``.
        ``summary``: ``(B,)`` long, the summary tokens to make (never more than ``dropped`` has).
        ``hidden``: a new ``(B, S, D)`` tensor (never modify ``view.hidden``) with the states of the kept
        tokens (merged into, or unchanged) and of the summary tokens in their slots; other rows are
        ignored. ``slots``: ``(B, S)`` bool, exactly ``summary[b]`` of ``dropped`` per sample.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Stage:
    """One drop point: before decoder layer ``layer`` runs, keep ``int(n * keep)`` of the ``n`` live
    vision tokens, scored by ``scorer`` and chosen by ``selector`` (``None``: the recipe's defaults).

    ``layer == 0`` is an *input* stage (``phase: input`` in a recipe): it runs on the decoder's input
    embeddings, so every layer and the KV cache see the shorter sequence."""

    layer: int
    keep: float
    scorer: Optional[Scorer] = None
    selector: Optional[Selector] = None
    line: Optional[int] = dataclasses.field(default=None, compare=False)
    """Recipe line this stage came from, for error messages."""
    merger: Optional[Merger] = None
    """Folds the dropped tokens into the kept ones or into summary tokens (``None``: plain drop)."""
    renumber: bool = False
    """Input stages only: give the kept tokens contiguous positions, as the pre-LLM methods' own code
    does by feeding a shorter sequence (default: kept tokens keep their original positions)."""
    evict_earlier: bool = False
    """Prefill stages only: once the prefill has run, remove the tokens this stage dropped from the
    KV cache of the layers *before* it too, so that no layer attends to them while decoding (PruneVid's
    official code prunes the whole cache). The prefill itself is unchanged."""
    decode: Optional[str] = None
    """For a *decode* stage (``phase: decode``): ``"mask"`` or ``"evict"``. At every generated token,
    layers ``layer`` and later attend to the ``keep`` fraction of the cached vision tokens that the new
    token attends to most at layer ``layer - 1``; ``mask`` hides the others for that step (the cache
    stays), ``evict`` removes them from those layers' cache for good."""

    @property
    def phase(self) -> str:
        """``"input"`` (before layer 0), ``"prefill"`` (inside the decoder, during the prefill) or
        ``"decode"`` (during generation)."""
        return "decode" if self.decode else ("input" if self.layer == 0 else "prefill")


class Schedule(_Plugin):
    """Produces the drop stages for a decoder of a given depth."""

    def stages(self, num_layers: int) -> Sequence[Stage]:  # pragma: no cover - interface
        """Return the stages, layers strictly increasing, for a decoder with ``num_layers`` layers."""
        raise NotImplementedError

    def keeps_for(self, num_layers: int, vision_tokens: int) -> Sequence[float]:
        """Keep ratios of :meth:`stages`, in order, for a sample that brings ``vision_tokens`` vision
        tokens. Override only when they depend on that count (the engine then calls this once per
        distinct count, per sample of every prefill); the default says they do not."""
        raise NotImplementedError


@dataclass(frozen=True)
class Selection:
    """Read-only view of the tokens a compressed prefill carries right now, for model adapters that
    patch the model (e.g. Qwen3-VL deepstack features, which must follow the kept tokens).

    :meth:`tokencomp.Handle.selection` returns one while a prefill of the calling thread runs after
    its first drop; adapters must not modify its tensors."""

    positions: torch.Tensor
    """``(B, S)`` long: the original sequence position of each token the decoder now carries."""
    alive: torch.Tensor
    """``(B, S)`` bool: False on filler slots (a short row of a ragged batch, padded with dropped tokens)."""


def _config_int(config, *names: str) -> Optional[int]:
    """The first of ``names`` that ``config`` sets to an int (transformers spells ids two ways)."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@dataclass(frozen=True)
class ModelAdapter(_Plugin):
    """Tells the engine where things are in one family of Hugging Face models: everything tokencomp
    knows about a model family lives in its adapter.

    Adapters stay thin: the engine does all the model surgery. ``model_classes`` lists the class names
    handled (subclasses match too). An adapter is built from the model's config by
    :meth:`from_config` and is immutable: what a family needs from the config becomes a field there.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()
    renumber: ClassVar[bool] = True
    """Whether input stages may renumber positions (one position per token, RoPE from the decoder's
    ``rotary_emb``); False for multi-axis positions such as M-RoPE."""

    image_token_id: Optional[int] = None
    """Placeholder id of image tokens in ``input_ids`` (None: the family takes no images)."""
    video_token_id: Optional[int] = None
    """Placeholder id of video tokens (None: the family takes no video)."""

    @classmethod
    def from_config(cls, config) -> "ModelAdapter":
        """The adapter of a model with this (top-level) config. Subclasses that need more of the
        config extend this (``dataclasses.replace(super().from_config(config), field=...)``)."""
        return cls(
            image_token_id=_config_int(config, "image_token_id", "image_token_index"),
            video_token_id=_config_int(config, "video_token_id", "video_token_index"),
        )

    def vision_token_ids(self, model=None) -> list[int]:
        """Placeholder token ids that mark vision tokens in ``input_ids`` (image, then video).
        ``model`` is not needed (the adapter was built from its config); it is accepted because
        callers written for earlier versions pass it."""
        return [i for i in dict.fromkeys((self.image_token_id, self.video_token_id)) if i is not None]

    def rotary(self, model) -> torch.nn.Module:
        """The module computing ``(cos, sin)`` from position ids (for renumbered input stages)."""
        return self.language_model(model).rotary_emb

    def language_model(self, model) -> torch.nn.Module:
        """The text decoder module, whose ``.layers`` are hooked."""
        return model.get_decoder()

    def vision_groups(self, vision_mask: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
        """``(B, S)`` long: image/frame number of every vision token, ``-1`` elsewhere.

        Default: each contiguous run of vision tokens is one group.
        """
        starts = vision_mask & ~torch.nn.functional.pad(vision_mask, (1, 0))[:, :-1]
        groups = torch.cumsum(starts.long(), dim=1) - 1
        return torch.where(vision_mask, groups, torch.full_like(groups, -1))

    def vision_videos(self, vision_mask: torch.Tensor, groups: torch.Tensor, call_kwargs: dict[str, Any]) -> Optional[torch.Tensor]:
        """``(B, S)`` long: the video of every vision token that is part of a video, ``-1`` elsewhere;
        the video's frames are its tokens' ``groups``. Video methods need it where a processor puts
        text between a video's frames. Default: ``None`` (not known; videos are then guessed as runs of
        contiguous, equal-size groups)."""
        return None

    def vision_grid_widths(self, vision_mask: torch.Tensor, groups: torch.Tensor, call_kwargs: dict[str, Any]) -> Optional[torch.Tensor]:
        """``(B, S)`` long: tokens per row of the grid each vision token's group (image or frame) is laid
        out in, 0 elsewhere. Spatial methods (MustDrop's windows) need it where pictures are not
        square. Default: ``None`` (not known; square groups are assumed)."""
        return None

    def row_markers(self, model, embeds: torch.Tensor, vision_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """``(B, L)`` bool: vision tokens that only mark the end of a grid row (LLaVA-NeXT's
        ``image_newline``), found on the decoder's input embeddings; None if the family has none."""
        return None

    def token_layout(self, model, inputs: dict, sample: int = 0, *, processor=None, image_sizes=None) -> list:
        """Where each vision token of ``inputs[sample]`` lies in its picture: a list of
        :class:`tokencomp.heatmap.Region` (one per image, view or video frame).

        With ``processor`` (the one that made ``inputs``) each region also gets its ``box`` in the
        original picture, replayed from the processor's geometry; ``image_sizes`` lists the original
        ``(height, width)`` of the sample's images where ``inputs`` do not carry them. Default: no
        layout (:class:`~tokencomp.UnsupportedModelError`)."""
        from .errors import UnsupportedModelError

        raise UnsupportedModelError(f"the {self.name!r} adapter draws no token layout for {type(model).__name__}")

    def signal_names(self, model) -> tuple[str, ...]:
        """Vision-tower signals this adapter can compute for ``model`` (default: none). Known names:

        * ``cls_attention``: head-averaged attention of the encoder's [CLS] query to each patch, at the
          layer whose output the projector reads, one value per LLM vision token. Towers without a
          [CLS] token (Qwen-VL) give the no-[CLS] variant: the attention each patch *receives* at the
          last block, averaged over heads and over the queries of its attention segment (image, frame
          or window), summed over the patches merged into one LLM token."""
        return ()

    def install_signals(self, model, names: Sequence[str], emit: Callable[..., None]) -> list:
        """Hook the vision tower so that each of ``names`` is computed while it runs, then passed to
        ``emit(name, values, output)``: one value per vision token, in the order the model places image
        features into the prompt (row-major over the batch), and the tower's output object (``generate``
        may encode images before the prefill and pass that object back in as ``mm_encoder_outputs``).
        Return the removable hook handles. Compute from the tower's own projections, never by forcing
        eager attention or ``output_attentions``."""
        return []

    def install(self, model, engine) -> Optional[Callable[[], None]]:
        """Install family-specific patches (e.g. Qwen3-VL deepstack); return a function that undoes them.
        ``engine`` is the :class:`tokencomp.Handle`; a patch that must follow the dropped tokens reads
        ``engine.selection()`` (a :class:`Selection`), nothing else of the engine."""
        return None
