"""YAML recipes: load, validate against the registered plugins, and resolve to stages.

Every problem raises :class:`tokencomp.RecipeError` whose one-line message starts with ``file:line:``.
Minimal recipe::

    scorer: NAME              # a scorer plugin name, or {name: NAME, <params>}; optional
    selector: NAME            # optional; both default to the plugins marked `default` (also when null)
    schedule:                 # explicit stages, or a named schedule plugin with params
      stages:
        - {layer: 3, keep: 0.5}
        - {layer: 17, keep: 0.3}
        - {layer: 22, keep: 0.0}

YAML is read with YAML 1.2 scalars (``true``/``false`` are the only booleans; ``5e-1`` and ``.5``
are numbers; numbers are decimal only, see :class:`_Loader`), merge keys (``<<: *anchor``) work,
and duplicate keys are errors. Plugin parameters are checked against the plugin's dataclass fields
(type hints, and ``min`` / ``max`` field metadata: see :func:`build_plugin`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import PluginError, RecipeError
from .interfaces import Schedule, Scorer, Selector, Stage
from .plugins import PluginRegistry, registry

EXPLICIT = "explicit"  # the schedule plugin that holds `stages:` lists (the recipe format itself)
TOP_KEYS = ("name", "description", "scorer", "selector", "schedule", "newlines")
NEWLINE_POLICIES = ("candidate", "keep", "rows")
STAGE_KEYS = ("layer", "phase", "keep", "scorer", "selector", "merge", "mode", "renumber", "evict_earlier")
PHASES = ("input", "prefill", "decode")
DECODE_MODES = ("mask", "evict")


# --------------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------------


class LMap(dict):
    """A mapping that remembers the line of each key (``.lines``) and its own (``.line``)."""

    line: Optional[int] = None
    lines: dict


class LList(list):
    """A list that remembers the line of each item (``.lines``) and its own (``.line``)."""

    line: Optional[int] = None
    lines: list


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars, restricted to plain decimal numbers.

    PyYAML resolves plain scalars by YAML 1.1 rules: ``yes``/``on`` are booleans, ``5e-1`` is a
    string, ``010`` is octal, ``1:30`` is 90 and ``2024-01-01`` a date. Here only ``true``/``false``
    are booleans, ``~``/``null``/empty are null, and numbers are decimal: ``3``, ``-2``, ``0.5``,
    ``.5``, ``5e-1``, ``1E0``, ``.inf``, ``.nan``. Hex, octal, binary, leading zeros, ``_`` and
    ``:`` forms stay strings, so a field expecting a number rejects them (with a hint) instead of
    silently reading another value.
    """

    yaml_implicit_resolvers: dict = {}


_INT = r"[-+]?(?:0|[1-9][0-9]*)"
_FLOAT = r"[-+]?(?:\.[0-9]+|(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
for _tag, _pattern, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", _INT, "-+0123456789"),  # before float: a plain integer is an int
    ("float", _FLOAT, "-+.0123456789"),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("merge", r"<<", "<"),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(rf"^(?:{_pattern})$"), list(_first))

_MERGE, _MAP, _SEQ = "tag:yaml.org,2002:merge", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


def _line_of(node) -> int:
    return node.start_mark.line + 1


def _flat(text: str) -> str:
    """``text`` on one line (messages quoted from plugins and PyYAML may span several)."""
    return " ".join(str(text).split())


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    # str(exc) adds PyYAML's own position and a code snippet on further lines; keep the words only.
    return _flat(" ".join(p for p in (exc.context, exc.problem) if p) or exc)


_BUSY = object()


def _scalar(node, source: str, constructor):
    try:
        return constructor.construct_object(node)
    except yaml.YAMLError as exc:
        raise RecipeError(f"YAML error: {_yaml_problem(exc)}", source=source, line=_line_of(node)) from None
    except Exception:  # an explicit tag on a value it cannot read: `!!int abc`, `!!timestamp x`
        raise RecipeError(f"YAML error: cannot read {node.value!r} as {node.tag}", source=source, line=_line_of(node)) from None


def _convert(node, source: str, constructor, memo: Optional[dict] = None, at: Optional[int] = None):
    # `memo` maps id(node) of collections already converted: an alias reuses the object built for its
    # anchor (no exponential blow-up), and an alias inside its own anchor is reported, not recursed into.
    # `at`: line of the key or list holding `node` (an alias node carries its anchor's position).
    memo = {} if memo is None else memo
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if node.tag not in (_MAP, _SEQ):  # `!!set`, `!!omap`, `!custom {...}` would otherwise pass as plain
            raise RecipeError(f"YAML tag {node.tag!r} is not supported in a recipe", source=source, line=at or _line_of(node))
        done = memo.get(id(node))
        if done is _BUSY:
            raise RecipeError(
                f"a YAML alias refers to its own anchor (at line {_line_of(node)}): recursive structures are not allowed",
                source=source,
                line=at or _line_of(node),
            )
        if done is not None:
            return done
        memo[id(node)] = _BUSY
    if isinstance(node, yaml.MappingNode):
        out = LMap()
        out.line, out.lines = _line_of(node), {}
        merged, merge_line = [], None
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError("mapping keys must be plain names", source=source, line=_line_of(key_node))
            if key_node.tag == _MERGE:
                if merge_line is not None:
                    raise RecipeError(f"duplicate key '<<' (first at line {merge_line})", source=source, line=_line_of(key_node))
                merge_line = _line_of(key_node)
                merged = _merge_sources(value_node, source, constructor, memo, merge_line)
                continue
            key = _scalar(key_node, source, constructor)
            if key in out:
                raise RecipeError(
                    f"duplicate key {key!r} (first at line {out.lines[key]})", source=source, line=_line_of(key_node)
                )
            out[key] = _convert(value_node, source, constructor, memo, _line_of(key_node))
            out.lines[key] = _line_of(key_node)
        # YAML merge keys: keys written in the mapping win over merged ones, earlier merged mappings
        # over later ones. A merged key keeps the line where its value is written (in the anchor).
        for src in merged:
            for key, value in src.items():
                if key not in out:
                    out[key] = value
                    out.lines[key] = src.lines.get(key, merge_line)
        memo[id(node)] = out
        return out
    if isinstance(node, yaml.SequenceNode):
        out = LList(_convert(n, source, constructor, memo, _line_of(node)) for n in node.value)
        out.line, out.lines = _line_of(node), [_line_of(n) for n in node.value]
        memo[id(node)] = out
        return out
    return _scalar(node, source, constructor)


def _merge_sources(node, source: str, constructor, memo: dict, line: int) -> list:
    """The mappings a ``<<`` key merges: one mapping, or a list of mappings."""
    items = node.value if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ else [node]
    out = []
    for item in items:
        if not isinstance(item, yaml.MappingNode):
            raise RecipeError("`<<` (YAML merge key) takes a mapping or a list of mappings, e.g. `<<: *anchor`", source=source, line=line)
        out.append(_convert(item, source, constructor, memo, line))
    return out


_TAB_HINT = "; YAML does not allow tabs for indentation, indent with spaces"


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse one YAML document keeping line numbers; duplicate keys and syntax errors are RecipeErrors.

    Scalars are read as described in :class:`_Loader`; merge keys (``<<: *anchor``) are supported.
    """
    # PyYAML rejects tabs anywhere outside quoted and block scalars, but YAML allows them as
    # separating white space inside a line (`keep:<TAB>0.5`, a tab before a comment). Each tab the
    # scanner rejects after the first non-blank character of its line is read as a space, and the
    # text is parsed again; a tab in the indentation stays an error. Line numbers are unchanged.
    retries = 1000  # bounds the re-parsing of a pathological text
    while True:
        try:
            node = yaml.compose(text, Loader=_Loader)
            break
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            tab = mark is not None and "'\\t'" in str(exc.problem) and text[mark.index : mark.index + 1] == "\t"
            indent = tab and not text[text.rfind("\n", 0, mark.index) + 1 : mark.index].strip()
            if tab and not indent and retries:
                text, retries = text[: mark.index] + " " + text[mark.index + 1 :], retries - 1
                continue
            # A problem found at the end of the stream (an unclosed bracket or quote) is reported on the
            # last line of the text, not on the line after it, with where the construct started.
            last = max(1, len(text.splitlines()))
            line = min(mark.line + 1, last) if mark is not None else 1
            msg = f"YAML syntax error: {_flat(exc.problem or exc)}"
            if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
                msg += f" ({_flat(exc.context)} started at line {exc.context_mark.line + 1})"
            raise RecipeError(msg + (_TAB_HINT if indent else ""), source=source, line=line) from None
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow
            line = text.count("\n", 0, max(exc.position, 0)) + 1
            raise RecipeError(f"YAML error: {_flat(str(exc).splitlines()[0])}", source=source, line=line) from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"YAML error: {_flat(exc)}", source=source, line=1) from None
        except RecursionError:
            raise RecipeError(_TOO_DEEP, source=source, line=1) from None
    if node is None:
        raise RecipeError("the recipe is empty; it needs at least a `schedule`", source=source, line=1)
    try:
        return _convert(node, source, _Loader(""))
    except RecursionError:
        raise RecipeError(_TOO_DEEP, source=source, line=1) from None


_TOO_DEEP = "the recipe is nested too deeply to be a recipe"


# --------------------------------------------------------------------------------------------------
# Parameter validation against plugin dataclass fields
# --------------------------------------------------------------------------------------------------


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def coerce(value: Any, hint: Any, what: str, source: str, line: Optional[int]) -> Any:
    """Check ``value`` against the type hint ``hint``; return it converted (lists to tuples, ints to floats)."""
    origin = typing.get_origin(hint)

    def bad():
        return RecipeError(f"{what} must be {_type_name(hint)}, got {value!r}{_notation_hint(value)}", source=source, line=line)

    if hint is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(hint) and type(value) in {type(a) for a in typing.get_args(hint)}:
            return value
        raise bad()
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return coerce(value, arg, what, source, line)
            except RecipeError:
                continue
        raise bad()
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise bad()
        args = [a for a in typing.get_args(hint) if a is not Ellipsis] or [Any]
        lines = getattr(value, "lines", [line] * len(value))
        items = [coerce(v, args[0], f"{what}[{i}]", source, lines[i]) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is type(None):
        if value is None:
            return None
        raise bad()
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RecipeError(f"{what} must be a finite number, got {value!r}", source=source, line=line)
            return float(value)
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


_NUMBERISH = re.compile(r"[-+]?[0-9.][0-9a-zA-Z_.:+-]*")


def _notation_hint(value: Any) -> str:
    """Why a string that looks like a number was not read as one (see :class:`_Loader`)."""
    if isinstance(value, str) and re.fullmatch(f"{_INT}|{_FLOAT}", value.strip()):
        return " (a quoted string: write numbers without quotes)"
    if isinstance(value, str) and _NUMBERISH.fullmatch(value.strip()):
        return " (numbers are read in plain decimal only, like 16, 0.5 or 5e-1: not hex, octal, 1_000 or 1:30)"
    if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n"):
        return " (only true and false are booleans)"
    return ""


def _check_bounds(value: Any, field: dataclasses.Field, what: str, source: str, line: Optional[int]) -> None:
    """Enforce the ``min`` / ``max`` a plugin field declares in its metadata (inclusive bounds)."""
    low, high = field.metadata.get("min"), field.metadata.get("max")
    if low is None and high is None:
        return
    items = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
    for i, v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue  # None or another type the hint allows: nothing to compare
        name = what if i is None else f"{what}[{i}]"
        if low is not None and v < low:
            raise RecipeError(f"{name} must be >= {low}, got {v}", source=source, line=line)
        if high is not None and v > high:
            raise RecipeError(f"{name} must be <= {high}, got {v}", source=source, line=line)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _recipe_key(field: dataclasses.Field) -> str:
    return field.metadata.get("recipe_key", field.name)


def build_plugin(kind: str, spec: Any, source: str, line: Optional[int], *, reserved: tuple[str, ...] = ()):
    """Class and checked keyword arguments of the ``kind`` plugin described by ``spec``: a name or
    ``{name: ..., <params>}``.

    Each parameter is checked against the type hint of the plugin's dataclass field, and against
    the bounds the field may declare in its metadata, ``min`` and ``max`` (inclusive; for a list,
    every item)::

        min_keep: int = dataclasses.field(default=0, metadata={"min": 0})

    Checks that involve several fields belong in the plugin's ``__post_init__``: a ``ValueError``
    raised there becomes a :class:`RecipeError` at the plugin's line.
    """
    if isinstance(spec, str):
        name, params, lines = spec, {}, {}
    elif isinstance(spec, dict):
        if "name" not in spec:
            raise RecipeError(f"{kind} needs a `name` (registered: {', '.join(registry().names(kind))})", source=source, line=getattr(spec, "line", line))
        name = spec["name"]
        params = {k: v for k, v in spec.items() if k != "name"}
        lines = getattr(spec, "lines", {})
        line = lines.get("name", line)
    else:
        raise RecipeError(
            f"{kind} must be a plugin name or a mapping {{name: ..., <params>}}, got {spec!r}", source=source, line=line
        )
    if not isinstance(name, str):
        raise RecipeError(f"{kind} name must be a string, got {name!r}", source=source, line=line)
    if not name.strip():
        raise RecipeError(f"{kind} name is empty (registered: {', '.join(registry().names(kind))})", source=source, line=line)
    try:
        cls = registry().get(kind, name)
    except PluginError as exc:
        raise RecipeError(_flat(exc), source=source, line=line) from None
    fields = {_recipe_key(f): f for f in cls.params().values()}
    hints = _hints(cls)
    kwargs = {}
    for key, value in params.items():
        where = lines.get(key, line)
        if key not in fields or key in reserved:
            allowed = ", ".join(k for k in fields if k not in reserved) or "none"
            raise RecipeError(f"unknown parameter {key!r} for {kind} {name!r}; allowed: {allowed}", source=source, line=where)
        f = fields[key]
        what = f"{kind} {name!r} parameter {key!r}"
        kwargs[f.name] = coerce(value, hints[f.name], what, source, where)
        _check_bounds(kwargs[f.name], f, what, source, where)
    return cls, kwargs, line


def _instantiate(cls, kwargs, kind, source, line):
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"invalid {kind} {cls.name!r}: {_flat(exc)}", source=source, line=line) from None


def make_plugin(kind: str, spec: Any, source: str, line: Optional[int]):
    """Validated plugin instance for a recipe ``scorer:`` / ``selector:`` / ``schedule:`` value."""
    cls, kwargs, line = build_plugin(kind, spec, source, line)
    return _instantiate(cls, kwargs, kind, source, line)


def _check_keep(keep: Any, source: str, line: Optional[int]) -> float:
    keep = coerce(keep, float, "keep", source, line)
    if not 0.0 <= keep <= 1.0:
        raise RecipeError(f"keep must be in [0, 1] (the fraction of vision tokens kept), got {keep}", source=source, line=line)
    return keep


def _check_layer(layer: Any, source: str, line: Optional[int]) -> int:
    layer = coerce(layer, int, "layer", source, line)
    if layer < 1:
        raise RecipeError(
            f"layer must be >= 1, got {layer}: to reduce tokens before the first decoder layer, write a stage "
            "`{phase: input, keep: ...}` (no layer)",
            source=source,
            line=line,
        )
    return layer


def _stage_layer(item: dict, lines: dict, source: str, line: Optional[int], i: int) -> int:
    """The decoder layer a stage runs before: 0 for ``phase: input``, else its ``layer:`` (>= 1)."""
    phase = item.get("phase", "prefill")
    if phase not in PHASES:
        raise RecipeError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}", source=source, line=lines.get("phase", line))
    if phase == "input":
        if "layer" in item:
            raise RecipeError("an input stage runs before layer 0 and takes no `layer:`", source=source, line=lines.get("layer", line))
        return 0
    if "layer" not in item:
        raise RecipeError(f"stage {i} is missing 'layer'", source=source, line=line)
    return _check_layer(item["layer"], source, lines.get("layer", line))


def _parse_stages(value: Any, source: str, line: Optional[int]) -> tuple[Stage, ...]:
    if not isinstance(value, list) or not value:
        raise RecipeError("schedule.stages must be a non-empty list of {layer, keep} mappings", source=source, line=line)
    stages, prev = [], None
    for i, item in enumerate(value):
        sline = value.lines[i] if isinstance(value, LList) else line
        if not isinstance(item, dict):
            raise RecipeError(f"stage {i} must be a mapping like {{layer: 3, keep: 0.5}}, got {item!r}", source=source, line=sline)
        ilines = getattr(item, "lines", {})
        for key in item:
            if key not in STAGE_KEYS:
                raise RecipeError(f"unknown stage key {key!r}; allowed: {', '.join(STAGE_KEYS)}", source=source, line=ilines.get(key, sline))
        if "keep" not in item:
            raise RecipeError(f"stage {i} is missing 'keep'", source=source, line=sline)
        layer = _stage_layer(item, ilines, source, sline, i)
        decode = _decode_mode(item, ilines, source, sline)
        if decode is None:
            if prev is not None and layer <= prev:
                raise RecipeError(f"stage layers must be strictly increasing: {layer} follows {prev}", source=source, line=ilines.get("layer", sline))
            prev = layer
        keep = _check_keep(item["keep"], source, ilines.get("keep", sline))
        scorer = make_plugin("scorer", item["scorer"], source, ilines.get("scorer")) if "scorer" in item else None
        selector = make_plugin("selector", item["selector"], source, ilines.get("selector")) if "selector" in item else None
        merger = make_plugin("merger", item["merge"], source, ilines.get("merge")) if item.get("merge") is not None else None
        renumber = item.get("renumber", False)
        if not isinstance(renumber, bool):
            raise RecipeError(f"renumber must be true or false, got {renumber!r}", source=source, line=ilines.get("renumber", sline))
        if renumber and layer != 0:
            raise RecipeError("`renumber:` is for input stages (`phase: input`)", source=source, line=ilines.get("renumber", sline))
        evict_earlier = item.get("evict_earlier", False)
        if not isinstance(evict_earlier, bool):
            raise RecipeError(f"evict_earlier must be true or false, got {evict_earlier!r}", source=source, line=ilines.get("evict_earlier", sline))
        if evict_earlier and (layer == 0 or decode is not None):
            raise RecipeError("`evict_earlier:` is for prefill stages (`layer: l` with l >= 1): it removes the tokens the "
                              "stage drops from the KV cache of the layers before it", source=source, line=ilines.get("evict_earlier", sline))
        stages.append(Stage(layer, keep, scorer, selector, line=sline, merger=merger, decode=decode, renumber=renumber,
                            evict_earlier=evict_earlier))
    decode_layers = [s.layer for s in stages if s.decode]
    if decode_layers != sorted(set(decode_layers)):
        raise RecipeError(f"decode stage layers must be strictly increasing, got {decode_layers}", source=source, line=line)
    return tuple(stages)


def _decode_mode(item: dict, lines: dict, source: str, line: Optional[int]) -> Optional[str]:
    """``mask`` / ``evict`` for a ``phase: decode`` stage, None for the others (which take no ``mode``)."""
    if item.get("phase") != "decode":
        if "mode" in item:
            raise RecipeError("`mode:` is for decode stages (`phase: decode`)", source=source, line=lines.get("mode", line))
        return None
    for key in ("scorer", "selector", "merge"):
        if key in item:
            raise RecipeError(
                f"a decode stage takes no `{key}:`: it keeps the cached vision tokens the new token attends to most "
                "at the layer before",
                source=source,
                line=lines.get(key, line),
            )
    mode = item.get("mode", "mask")
    if mode not in DECODE_MODES:
        raise RecipeError(f"mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}", source=source, line=lines.get("mode", line))
    return mode


def _make_schedule(spec: Any, source: str, line: Optional[int]) -> Schedule:
    # `stages` is only valid in the explicit form, which _from_tree parses itself.
    cls, kwargs, nline = build_plugin("schedule", spec, source, line, reserved=("stages",))
    return _instantiate(cls, kwargs, "schedule", source, nline)


# --------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: default scorer and selector, and a schedule of stages.

    Use :func:`load_recipe` to build one. :meth:`stages` resolves the schedule for a decoder depth.
    """

    scorer: Scorer
    selector: Selector
    schedule: Schedule
    source: str = "<string>"
    name: Optional[str] = None
    description: Optional[str] = None
    line: Optional[int] = dataclasses.field(default=None, compare=False)
    newlines: str = "candidate"
    """LLaVA-NeXT / OneVision ``image_newline`` tokens (row ends of the anyres grids): ``candidate``
    (ranked like any vision token, as the in-LLM methods' code does), ``keep`` (never dropped) or
    ``rows`` (kept exactly for the grid rows that keep a token, as the video methods that re-insert
    row ends do)."""

    def stages(self, num_layers: int) -> list[Stage]:
        """Stages for a decoder with ``num_layers`` layers, defaults filled in.

        Raises :class:`RecipeError` naming the depth when a layer does not exist in the model.
        """
        out: list[Stage] = []
        prev = -1
        for st in self.schedule.stages(num_layers):
            line = st.line if st.line is not None else self.line
            if st.layer >= num_layers:
                raise RecipeError(
                    f"stage layer {st.layer} does not exist: the model's decoder has {num_layers} layers (0..{num_layers - 1})",
                    source=self.source,
                    line=line,
                )
            if not st.decode and (st.layer < 0 or (prev >= 0 and st.layer <= prev)):
                raise RecipeError(f"schedule gave layers that are not strictly increasing from 0: {st.layer}", source=self.source, line=line)
            if st.decode and st.layer < 1:
                raise RecipeError(f"a decode stage needs a layer >= 1 (it reads layer - 1), got {st.layer}", source=self.source, line=line)
            if not 0.0 <= st.keep <= 1.0:
                raise RecipeError(f"schedule gave keep {st.keep} outside [0, 1]", source=self.source, line=line)
            if not st.decode:
                prev = st.layer
            st = dataclasses.replace(st, scorer=st.scorer or self.scorer, selector=st.selector or self.selector)
            if st.layer == 0 and (st.scorer.needs_prev_hidden or st.scorer.attention == "previous"):
                raise RecipeError(
                    f"scorer {st.scorer.name!r} looks at the previous decoder layer, which an input stage (before layer 0) "
                    "does not have; give the input stage a scorer of its own (`scorer:`)",
                    source=self.source,
                    line=line,
                )
            out.append(st)
        return out

    def describe(self, num_layers: int) -> str:
        """One line per stage, for logs and the CLI."""
        return "\n".join(
            (
                f"decode, layer {s.layer:>3}+: attend to {s.keep:.4g} of the cached vision tokens ({s.decode})"
                if s.decode
                else f"{'input' if s.layer == 0 else f'layer {s.layer:>3}'}: keep {s.keep:.4g} of the vision tokens, "
                f"scorer {s.scorer.name}, selector {s.selector.name}" + (f", merger {s.merger.name}" if s.merger is not None else "")
                + (", renumbered" if s.renumber else "") + (", evicted from the earlier layers' cache too" if s.evict_earlier else "")
            )
            for s in self.stages(num_layers)
        )

    @classmethod
    def of(
        cls,
        scorer: Union[Scorer, str, dict, None] = None,
        selector: Union[Selector, str, dict, None] = None,
        stages: Optional[Any] = None,
        *,
        schedule: Union[Schedule, str, dict, None] = None,
        name: Optional[str] = None,
        description: Optional[str] = None,
    ) -> "Recipe":
        """A recipe from Python objects, the same :class:`Recipe` a YAML file gives::

            Recipe.of(scorer=MyScorer(), stages=[(3, 0.5), (17, 0.3), (22, 0.0)])
            Recipe.of(stages=[Stage(0, 0.5, scorer=OtherScorer(), merger=MyMerger()), (3, 0.5)])

        ``scorer`` / ``selector``: plugin instances (or a name / ``{name: ..., <params>}`` like in YAML);
        left out, the registry's defaults (classes by name: :mod:`tokencomp.methods`). ``stages``: ``(layer, keep)`` tuples or :class:`Stage` objects,
        layer 0 being the input stage (``phase: input``); or ``schedule``: a schedule instance or spec
        (default: the registry's default schedule when neither is given). Checked like a YAML recipe
        (:class:`RecipeError`)."""
        from .interfaces import Merger

        source = "<Recipe.of>"

        def plugin(kind, value, base):
            if value is None:
                value = _default(kind, source)
            if isinstance(value, (str, dict)):
                return make_plugin(kind, _annotate(value), source, None)
            if not isinstance(value, base):
                raise RecipeError(f"{kind} must be a {base.__name__} instance, a name or a mapping; got {value!r}", source=source)
            return value

        scorer, selector = plugin("scorer", scorer, Scorer), plugin("selector", selector, Selector)
        if stages is not None and schedule is not None:
            raise RecipeError("give `stages` or `schedule`, not both", source=source)
        if stages is None:
            sched = plugin("schedule", schedule, Schedule)
            return cls(scorer, selector, sched, source, name, description)
        if isinstance(stages, (Stage, tuple)) and not (isinstance(stages, tuple) and stages and isinstance(stages[0], (Stage, tuple, list))):
            stages = [stages]
        items, prev = [], None
        for i, st in enumerate(list(stages)):
            if isinstance(st, (tuple, list)):
                if len(st) != 2:
                    raise RecipeError(f"stage {i} must be a (layer, keep) pair or a Stage, got {st!r}", source=source)
                layer = coerce(st[0], int, f"stage {i} layer", source, None)
                if layer < 0:
                    raise RecipeError(f"stage {i} layer must be >= 0 (0: the input stage), got {layer}", source=source)
                st = Stage(layer, _check_keep(st[1], source, None))
            elif isinstance(st, Stage):
                _check_keep(st.keep, source, None)
                for attr, base in (("scorer", Scorer), ("selector", Selector), ("merger", Merger)):
                    value = getattr(st, attr)
                    if value is not None and not isinstance(value, base):
                        raise RecipeError(f"stage {i} {attr} must be a {base.__name__} instance, got {value!r}", source=source)
                if st.decode is not None and st.decode not in DECODE_MODES:
                    raise RecipeError(f"stage {i} decode mode must be one of {', '.join(DECODE_MODES)}, got {st.decode!r}", source=source)
            else:
                raise RecipeError(f"stage {i} must be a (layer, keep) pair or a Stage, got {st!r}", source=source)
            if st.decode is None:
                if prev is not None and st.layer <= prev:
                    raise RecipeError(f"stage layers must be strictly increasing: {st.layer} follows {prev}", source=source)
                prev = st.layer
            items.append(st)
        if not items:
            raise RecipeError("stages must be a non-empty list of (layer, keep) pairs or Stage objects", source=source)
        sched = _instantiate(registry().get("schedule", EXPLICIT), {"stages_": tuple(items)}, "schedule", source, None)
        return cls(scorer, selector, sched, source, name, description)


def _what(value: Any) -> str:
    """Kind of a parsed YAML value, in YAML words."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null (nothing)"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _from_tree(tree: Any, source: str) -> Recipe:
    if not isinstance(tree, dict):
        raise RecipeError(f"a recipe must be a mapping with keys {', '.join(TOP_KEYS)}; got {_what(tree)}", source=source, line=getattr(tree, "line", 1))
    lines = getattr(tree, "lines", {})
    for key in tree:
        if key not in TOP_KEYS:
            raise RecipeError(f"unknown key {key!r}; allowed: {', '.join(TOP_KEYS)}", source=source, line=lines.get(key, 1))
    if "schedule" not in tree:
        raise RecipeError("the recipe has no `schedule` (explicit `stages:` or a named schedule)", source=source, line=getattr(tree, "line", 1))
    for key in ("name", "description"):
        if key in tree and not isinstance(tree[key], str):
            raise RecipeError(f"{key} must be a string", source=source, line=lines.get(key, 1))
    # Only a missing key or null means "the default": '' and {} are mistakes, reported by make_plugin.
    plugins = {}
    for kind in ("scorer", "selector"):
        spec = tree[kind] if tree.get(kind) is not None else _default(kind, source)
        plugins[kind] = make_plugin(kind, spec, source, lines.get(kind, 1))
    scorer, selector = plugins["scorer"], plugins["selector"]
    sched_spec, sline = tree["schedule"], lines.get("schedule", 1)
    if isinstance(sched_spec, dict) and "stages" in sched_spec:
        extra = [k for k in sched_spec if k not in ("stages", "name")]
        if sched_spec.get("name", EXPLICIT) != EXPLICIT or extra:
            bad = extra[0] if extra else "name"
            raise RecipeError(
                f"`stages:` lists explicit stages and takes no other key (got {bad!r}); use a named schedule instead",
                source=source,
                line=getattr(sched_spec, "lines", {}).get(bad, sline),
            )
        stages = _parse_stages(sched_spec["stages"], source, getattr(sched_spec, "lines", {}).get("stages", sline))
        schedule = _instantiate(registry().get("schedule", EXPLICIT), {"stages_": stages}, "schedule", source, sline)
    else:
        schedule = _make_schedule(sched_spec, source, sline)
    newlines = tree.get("newlines", "candidate")
    if newlines not in NEWLINE_POLICIES:
        raise RecipeError(
            f"newlines must be one of {', '.join(NEWLINE_POLICIES)}, got {newlines!r}", source=source, line=lines.get("newlines", 1)
        )
    return Recipe(scorer, selector, schedule, source, tree.get("name"), tree.get("description"), line=sline, newlines=newlines)


def _default(kind: str, source: str) -> str:
    try:
        return registry().default_name(kind)
    except PluginError as exc:
        raise RecipeError(_flat(exc), source=source, line=1) from None


def default_recipe(*, plugins: Optional[PluginRegistry] = None) -> "Recipe":
    """The recipe made of the default scorer, selector and schedule plugins (of ``plugins``, default:
    the registry in effect)."""
    if plugins is not None:
        with plugins.use():
            return default_recipe()
    return load_recipe({"schedule": _default("schedule", "<default>")})


def _annotate(obj: Any) -> Any:
    """Wrap plain dicts/lists (from a Python dict recipe) so they behave like parsed YAML."""
    if isinstance(obj, dict) and not isinstance(obj, LMap):
        out = LMap((k, _annotate(v)) for k, v in obj.items())
        out.line, out.lines = None, {}
        return out
    if isinstance(obj, list) and not isinstance(obj, LList):
        out = LList(_annotate(v) for v in obj)
        out.line, out.lines = None, [None] * len(out)
        return out
    return obj


# --------------------------------------------------------------------------------------------------
# Shipped recipes
# --------------------------------------------------------------------------------------------------


def shipped_root():
    """Folder of the recipes shipped with tokencomp (the repository's ``schedules/``)."""
    return importlib.resources.files("tokencomp.recipes")


def shipped_recipes() -> dict[str, Any]:
    """Shipped recipe names (``family/name`` without ``.yaml`` / ``.yml``) mapped to their files."""
    out = {}

    def walk(node, prefix):
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(_SUFFIXES):
                out[prefix + child.name.rsplit(".", 1)[0]] = child

    walk(shipped_root(), "")
    return dict(sorted(out.items()))


_SUFFIXES = (".yaml", ".yml")


def _strip_suffix(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _reads_as_yaml(line: str) -> bool:
    """Whether a one-line string is meant as YAML text: ``key: value``, ``{...}``, ``[...]``, a comment."""
    s = line.strip()
    return not s or s[0] in "{[#" or ": " in s or ":\t" in s or s.endswith(":")


def load_recipe(recipe: Union[str, os.PathLike, dict, "Recipe"], *, plugins: Optional[PluginRegistry] = None) -> Recipe:
    """Load and validate a recipe from a path, a shipped recipe name, YAML text or a dict.

    Plugin names are looked up in ``plugins`` (a :class:`~tokencomp.plugins.PluginRegistry`; default:
    the registry in effect, :func:`tokencomp.plugins.current`).

    A string is read as the first of these that applies:

    1. it has a line break: YAML text;
    2. it names an existing file: that file;
    3. it is a shipped recipe name (``family/name``, with or without ``.yaml`` / ``.yml``);
    4. it ends in ``.yaml`` / ``.yml``: a missing file, ``file not found: <path>``;
    5. it reads as one line of YAML (``key: value``, ``{...}``, ``[...]``, a comment, blank): YAML text;
    6. it contains a path separator (``/`` or ``\\``) or starts with ``~``: ``file not found: <path>``;
    7. it contains ``:``: YAML text (a lone scalar, reported as not a mapping);
    8. otherwise a misspelt shipped name: an error with the closest shipped names.

    So ``/data/exp:1/r.yaml`` and ``C:\\exp\\r.yaml`` are paths, never YAML text.
    Raises :class:`RecipeError` (message ``file:line: what is wrong and what is allowed``).
    """
    if plugins is not None:
        with plugins.use():
            return load_recipe(recipe)
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        try:
            tree = _annotate(recipe)
        except RecursionError:  # a dict that contains itself, or absurdly deep nesting
            raise RecipeError(_TOO_DEEP, source="<dict>", line=1) from None
        return _from_tree(tree, "<dict>")
    if isinstance(recipe, os.PathLike):
        return _load_file(Path(recipe))
    if not isinstance(recipe, str):
        raise RecipeError(f"a recipe is a path, a shipped name, YAML text or a dict; got {type(recipe).__name__}")
    text = recipe
    if "\n" in text or "\r" in text:
        return _from_tree(parse_yaml(text, "<string>"), "<string>")
    if os.path.isfile(text):
        return _load_file(Path(text))
    shipped = shipped_recipes()
    key = _strip_suffix(text)
    if key in shipped:
        res = shipped[key]
        source = f"{key}.{res.name.rsplit('.', 1)[1]}"  # the shipped file's own suffix, whatever was asked
        return _from_tree(parse_yaml(res.read_text(encoding="utf-8"), source), source)
    yaml_suffix = text.lower().endswith(_SUFFIXES)
    if not yaml_suffix and _reads_as_yaml(text):
        return _from_tree(parse_yaml(text, "<string>"), "<string>")
    path_like = yaml_suffix or "/" in text or "\\" in text or text.startswith("~")
    if not path_like and ":" in text:  # `a:b` is a YAML scalar, never a shipped name
        return _from_tree(parse_yaml(text, "<string>"), "<string>")
    import difflib

    close = difflib.get_close_matches(key, list(shipped), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if path_like:
        if os.path.exists(text):  # a folder, or a file we may not read
            return _load_file(Path(text))
        what = f"file not found: {text}"
        # A relative path with "/" may have been meant as a shipped name; an absolute one was not.
        if not (os.path.isabs(text) or "\\" in text or text.startswith("~") or re.match(r"[A-Za-z]:", text)):
            what += f" (nor a shipped recipe: {hint}`tokencomp recipes` lists them)"
        raise RecipeError(what, source=text, line=1)
    raise RecipeError(f"{text!r} is neither a file nor a shipped recipe ({hint}`tokencomp recipes` lists them)", source=text, line=1)


def _load_file(path: Path) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"file not found: {path}", source=str(path), line=1) from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe: {_flat(exc.strerror or exc)}", source=str(path), line=1) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe is not UTF-8 text: {_flat(exc)}", source=str(path), line=1) from None
    return _from_tree(parse_yaml(text, str(path)), str(path))
