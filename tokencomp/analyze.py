"""``tokencomp analyze``: the two findings of the token-variation paper (arXiv 2509.01552), measured on any
supported model. (The core names no method: scorers come from the registry.)

**Finding 1, position bias.** For a set of inputs, one stage (``--layer``, ``--keep``) is applied
with each chosen scorer through :func:`tokencomp.apply`; the vision tokens it keeps
(``handle.stats.kept_positions``) are binned by their place in the sample's vision-token sequence
(deciles, front → end) and :func:`position_retention` reports the share kept in every decile. The
paper reports 80–100 % of the end tokens and 10–30 % of the front ones kept by attention-based
scorers on LLaVA-1.5-7B, and a near-uniform profile for the L2 variation.

**Finding 2, variation marks relevance.** :func:`layer_variations` hooks the decoder layers and
computes each token's variation ``‖h_l − h_{l−1}‖`` (L1, L2, or ``1 − cos``) — what layer ``l − 1``
did to it, the default scorer's score of a stage at layer ``l`` — in one untouched forward.
:func:`render_variation` draws the maps next to the picture; on the toy model
(:mod:`tokencomp.toy`), :func:`relevance` gives, per metric and layer, the share of the top-k
variation tokens that lie on the asked-about object (k = that object's token count, so 1.0 is
perfect and the object's share of the grid is chance), and the same share on *any* object (to tell
"relevant to the question" from "salient in the picture").

    from tokencomp import analyze
    res = analyze.position_retention(model, batches, {"variation": default_scorer, "rand": "random"}, layer=3, keep=0.333)
    print(analyze.format_retention(res))
    var = analyze.layer_variations(model, inputs, layers=[2, 6], metrics=("l2",))   # {metric: {layer: (B, S)}}

The command wraps these (``tokencomp analyze --help``); ``--accuracy`` runs the toy accuracy table
instead (:mod:`tokencomp.toy.accuracy`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from .errors import RecipeError, UsageError

__all__ = [
    "METRICS",
    "parse_scorer",
    "stage_recipe",
    "vision_positions",
    "position_retention",
    "format_retention",
    "plot_retention",
    "layer_variations",
    "variation_grids",
    "object_tokens",
    "relevance",
    "format_relevance",
    "render_variation",
    "add_analyze_command",
]

METRICS = ("l2", "l1", "cosine")


def default_scorers() -> list[str]:
    """The registry's default scorer, every scorer that reads attention (Finding 1 is about them), and random."""
    from .plugins import registry

    reg = registry()
    default = reg.default_name("scorer")
    attention = sorted(n for n, e in reg.entries["scorer"].items() if getattr(e.cls, "attention", None) and n != default)
    return [default, *attention, "random"]


# ------------------------------------------------------------------------------------------------
# Finding 1: retention by position
# ------------------------------------------------------------------------------------------------


def parse_scorer(text: str):
    """``NAME``, ``NAME:METRIC`` (a scorer with a ``metric`` parameter, e.g. ``:l1``) or ``NAME:key=value,...``
    → ``(label, recipe scorer)``."""
    name, sep, rest = text.partition(":")
    if not name:
        raise UsageError(f"--scorers {text!r}: empty scorer name")
    if not sep:
        return text, name
    spec: dict = {"name": name}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            if key in METRICS and _has_metric(name):
                key, value = "metric", key
            else:
                raise UsageError(f"--scorers {text!r}: expected NAME:key=value (or NAME:l2|l1|cosine for a scorer with a metric)")
        spec[key] = _number(value)
    return text, spec


def _has_metric(name: str) -> bool:
    from .plugins import registry

    entry = registry().entries["scorer"].get(name)
    return entry is not None and "metric" in entry.cls.params()


def _number(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def stage_recipe(scorer, layer: int, keep: float):
    """A recipe of one stage: before decoder layer `layer`, keep `keep` of the vision tokens by `scorer`."""
    import tokencomp

    if isinstance(scorer, tokencomp.Recipe):
        return scorer
    return tokencomp.load_recipe({"scorer": scorer, "schedule": {"stages": [{"layer": layer, "keep": keep}]}})


def vision_positions(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the sequence positions of its vision placeholder tokens, in order (front → end)."""
    from .plugins import registry

    ids = registry().adapter_for(model).vision_token_ids()
    mask = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
    return [row.nonzero().flatten().cpu() for row in mask]


def _bins(n: int, bins: int) -> torch.Tensor:
    return (torch.arange(n) * bins) // max(n, 1)


@torch.no_grad()
def position_retention(model, batches: Iterable[dict], scorers: Mapping[str, object], layer: int, keep: float,
                       bins: int = 10) -> dict:
    """Share of the vision tokens kept by a one-stage recipe, per position bin of the vision sequence.

    ``batches``: processor outputs (each a dict for ``model(**inputs)``); ``scorers``: label → recipe
    scorer (a name or ``{name: ..., param: ...}``) or a whole :class:`tokencomp.Recipe` whose stage
    at `layer` is read. Each sample's vision tokens (all its images / frames, in sequence order) are
    cut into `bins` equal parts; ``retention[i]`` = kept / present in part ``i`` over all samples.
    """
    import tokencomp

    batches = list(batches)
    out = {"layer": layer, "keep": keep, "bins": bins, "inputs": 0, "vision_tokens": [], "scorers": {}}
    for label, scorer in scorers.items():
        recipe = stage_recipe(scorer, layer, keep)
        kept = torch.zeros(bins, dtype=torch.long)
        total = torch.zeros(bins, dtype=torch.long)
        n_inputs, counts = 0, []
        with tokencomp.apply(model, recipe) as handle:
            for inputs in batches:
                model(**inputs)
                stage = handle.stats.kept_positions.get(layer)
                if stage is None:
                    raise UsageError(f"scorer {label}: the recipe has no stage at layer {layer}")
                for b, pos in enumerate(vision_positions(model, inputs["input_ids"])):
                    which = _bins(len(pos), bins)
                    hit = torch.isin(pos, stage[b].cpu())
                    total += torch.bincount(which, minlength=bins)
                    kept += torch.bincount(which[hit], minlength=bins)
                    n_inputs += 1
                    counts.append(len(pos))
        out["inputs"], out["vision_tokens"] = n_inputs, counts
        out["scorers"][label] = {
            "scorer": scorer if isinstance(scorer, (str, dict)) else str(scorer),
            "retention": [round(k / t, 4) if t else None for k, t in zip(kept.tolist(), total.tolist())],
            "kept": kept.tolist(),
            "total": total.tolist(),
        }
    return out


def format_retention(res: dict) -> str:
    """The retention table as text: one row per scorer, one column per position bin (front → end)."""
    bins = res["bins"]
    head = f"{'scorer':<16}" + "".join(f"{f'{100 * i // bins}-{100 * (i + 1) // bins}%':>8}" for i in range(bins))
    lines = [f"Finding 1: share of vision tokens kept, by position in the vision sequence (front -> end); "
             f"stage at layer {res['layer']}, keep {res['keep']}, {res['inputs']} inputs", head]
    for label, row in res["scorers"].items():
        cells = "".join(f"{'-' if v is None else f'{100 * v:.0f}%':>8}" for v in row["retention"])
        lines.append(f"{label:<16}{cells}")
    return "\n".join(lines)


def plot_retention(res: dict, path, svg: bool = False) -> str:
    """Bar chart of :func:`position_retention` as a PNG at `path` (and, with ``svg``, the same figure
    beside it as SVG): matplotlib when installed (``tokencomp[viz]``), else a plain Pillow chart (PNG
    only: ``svg`` then needs matplotlib). Returns which one drew it."""
    from .heatmap import require_matplotlib

    try:
        plt = require_matplotlib()
    except UsageError:
        if svg:
            raise
        _pillow_retention(res, path)
        return "pillow"
    labels = list(res["scorers"])
    bins = res["bins"]
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        vals = [0 if v is None else 100 * v for v in res["scorers"][label]["retention"]]
        ax.bar([i + (k - (len(labels) - 1) / 2) * width for i in range(bins)], vals, width, label=label)
    ax.set_xticks(range(bins), [f"{100 * i // bins}-{100 * (i + 1) // bins}" for i in range(bins)], fontsize=7)
    ax.set_xlabel("position in the vision-token sequence (%), front -> end")
    ax.set_ylabel("tokens kept (%)")
    ax.set_title(f"retention by position, layer {res['layer']}, keep {res['keep']} ({res['inputs']} inputs)", fontsize=9)
    ax.axhline(100 * res["keep"], color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    if svg:
        fig.savefig(Path(path).with_suffix(".svg"))
    plt.close(fig)
    return "matplotlib"


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _pillow_retention(res: dict, path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    labels = list(res["scorers"])
    bins = res["bins"]
    bar, gap, ph, left, top = 7, 6, 120, 34, 30
    group = len(labels) * bar + gap
    width = left + bins * group + 10
    height = top + ph + 40 + 12 * len(labels)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), f"vision tokens kept (%) by position, layer {res['layer']}, keep {res['keep']}", fill="black", font=font)
    d.text((4, 16), f"{res['inputs']} inputs; x: position decile, front -> end", fill="black", font=font)
    for pct in (0, 50, 100):
        y = top + ph - ph * pct // 100
        d.line([(left - 3, y), (width - 10, y)], fill=(220, 220, 220))
        d.text((2, y - 5), f"{pct}", fill="black", font=font)
    ky = top + ph - int(ph * res["keep"])
    d.line([(left, ky), (width - 10, ky)], fill=(150, 150, 150))
    for i in range(bins):
        x0 = left + i * group
        for k, label in enumerate(labels):
            v = res["scorers"][label]["retention"][i] or 0.0
            d.rectangle([x0 + k * bar, top + ph - int(ph * v), x0 + (k + 1) * bar - 1, top + ph], fill=_PALETTE[k % 10])
        d.text((x0, top + ph + 3), f"{i + 1}", fill="black", font=font)
    for k, label in enumerate(labels):
        y = top + ph + 20 + 12 * k
        d.rectangle([left, y + 2, left + 8, y + 10], fill=_PALETTE[k % 10])
        d.text((left + 12, y), label, fill="black", font=font)
    img.save(path, format="PNG")


# ------------------------------------------------------------------------------------------------
# Finding 2: variation maps
# ------------------------------------------------------------------------------------------------


def _variation(h: torch.Tensor, prev: torch.Tensor, metric: str) -> torch.Tensor:
    h, prev = h.float(), prev.float()
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(h, prev, dim=-1)
    return torch.linalg.vector_norm(h - prev, ord=2 if metric == "l2" else 1, dim=-1)


@torch.no_grad()
def layer_variations(model, inputs: dict, layers: Sequence[int], metrics: Sequence[str] = METRICS) -> dict:
    """``{metric: {layer: (B, S) float32}}``: each token's variation across decoder layer ``layer − 1``
    (its output minus its input: the variation score of a stage before ``layer``), from one untouched
    forward with hooks on the decoder layers."""
    from .plugins import registry

    decoder = registry().adapter_for(model).language_model(model)
    blocks = decoder.layers
    depth = len(blocks)
    for layer in layers:
        if not 1 <= layer <= depth:
            raise UsageError(f"--variation-layers {layer}: must be in 1..{depth} (the model has {depth} decoder layers)")
    for m in metrics:
        if m not in METRICS:
            raise UsageError(f"--metrics {m}: unknown metric; choose from {', '.join(METRICS)}")
    seen: dict[int, tuple] = {}
    handles = []
    for layer in set(layers):
        def hook(mod, args, kwargs, output, i=layer - 1):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            seen[i] = (h_in.detach(), h_out.detach())

        handles.append(blocks[layer - 1].register_forward_hook(hook, with_kwargs=True))
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return {m: {layer: _variation(seen[layer - 1][1], seen[layer - 1][0], m).cpu() for layer in layers} for m in metrics}


def variation_grids(model, inputs: dict, variations: dict, sample: int = 0):
    """``(regions, {(metric, layer): [grid per region]})``: the variations of `sample` laid on each
    image's / frame's token grid (:func:`tokencomp.heatmap.token_layout`)."""
    from .heatmap import token_layout

    cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}
    regions = token_layout(model, cpu, sample)
    grids = {}
    for metric, per_layer in variations.items():
        for layer, values in per_layer.items():
            grids[(metric, layer)] = [values[sample][r.positions] for r in regions]
    return regions, grids


_RAMP = [(0.0, (10, 10, 40)), (0.35, (120, 30, 120)), (0.7, (235, 100, 40)), (1.0, (255, 245, 160))]


def _colour(values: torch.Tensor):
    import numpy as np

    v = values.float()
    lo, hi = float(v.min()), float(v.max())
    t = ((v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)).numpy()
    xs = [a for a, _ in _RAMP]
    return np.stack([np.interp(t, xs, [c[k] for _, c in _RAMP]) for k in range(3)], -1).astype(np.uint8)


def render_variation(picture, regions, grids: dict, *, masks: Optional[list] = None, titles: Optional[list] = None,
                     size: int = 160):
    """A PIL image: per region (image / frame) one row — the picture, the ground-truth mask grid when
    given (``masks[i]`` a bool grid like the region's), then one heat panel per ``(metric, layer)`` of
    ``grids`` (bright = varied most), each with a label strip."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from .heatmap import to_pil

    font = ImageFont.load_default()
    label_h, gap = 14, 4
    rows = []
    for i, region in enumerate(regions):
        pic = picture[i] if isinstance(picture, (list, tuple)) else picture
        pic = to_pil(Image.fromarray(pic) if isinstance(pic, np.ndarray) else pic)
        box = region.box or (0.0, 0.0, float(pic.width), float(pic.height))
        view = pic.transform((size, size), Image.Transform.EXTENT, data=box, resample=Image.Resampling.BICUBIC)
        panels = [(titles[i] if titles else f"image {region.image}" + (f" frame {region.frame}" if region.view == "video" else ""), view)]
        if masks is not None and masks[i] is not None:
            m = torch.as_tensor(masks[i]).float()
            grid = (np.stack([m.numpy()] * 3, -1) * 255).astype(np.uint8)
            panels.append(("object tokens (truth)", Image.fromarray(grid).resize((size, size), Image.Resampling.NEAREST)))
        for (metric, layer), per_region in grids.items():
            heat = Image.fromarray(_colour(per_region[i])).resize((size, size), Image.Resampling.NEAREST)
            panels.append((f"{metric} variation, layer {layer}", Image.blend(view, heat, 0.75)))
        rows.append(panels)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    slot = max(size, max(measure.textbbox((0, 0), t, font=font)[2] + 4 for row in rows for t, _ in row))
    width = max(len(r) for r in rows) * (slot + gap) - gap
    canvas = Image.new("RGB", (width, len(rows) * (size + label_h + gap) - gap), "white")
    d = ImageDraw.Draw(canvas)
    for k, row in enumerate(rows):
        y = k * (size + label_h + gap)
        for j, (title, p) in enumerate(row):
            x = j * (slot + gap)
            d.text((x + 2, y + 1), title, fill="black", font=font)
            canvas.paste(p, (x, y + label_h))
    return canvas


def object_tokens(mask, patch: int, min_fraction: float = 0.25) -> torch.Tensor:
    """``(H/patch, W/patch)`` bool: the patches whose pixels are at least `min_fraction` object."""
    m = torch.as_tensor(mask).float()
    g0, g1 = m.shape[0] // patch, m.shape[1] // patch
    return m[: g0 * patch, : g1 * patch].reshape(g0, patch, g1, patch).mean((1, 3)) >= min_fraction


@torch.no_grad()
def relevance(model, processor, questions, layers: Sequence[int], metrics: Sequence[str] = METRICS,
              batch_size: int = 25) -> dict:
    """Toy data: per ``metric`` and ``layer``, the mean share of the top-k variation tokens that lie on
    the asked-about object (k = the object's token count) and on any object, with the chance levels
    (the object's / all objects' share of the grid). Questions whose object has no token are skipped."""
    from .toy import build, harness, scenes

    acc = {(m, l): {"asked": 0.0, "any": 0.0} for m in metrics for l in layers}
    chance_asked = chance_any = chance_among = 0.0
    n = 0
    for k in range(0, len(questions), batch_size):
        chunk = questions[k : k + batch_size]
        enc = harness.encode(processor, chunk)
        var = layer_variations(model, enc, layers, metrics)
        pos = vision_positions(model, enc["input_ids"])
        for b, q in enumerate(chunk):
            asked = object_tokens(q.mask, build.PATCH).flatten()
            scene = scenes.make_scene(q.seed)
            anyobj = object_tokens(sum(m.astype(int) for m in scene.masks) > 0, build.PATCH).flatten()
            kk = int(asked.sum())
            if kk == 0 or len(pos[b]) != asked.numel():
                continue
            n += 1
            chance_asked += kk / asked.numel()
            chance_any += float(anyobj.float().mean())
            chance_among += kk / max(kk, int(anyobj.sum()))
            for m in metrics:
                for l in layers:
                    top = var[m][l][b][pos[b]].argsort(descending=True, stable=True)[:kk]
                    acc[(m, l)]["asked"] += float(asked[top].float().mean())
                    acc[(m, l)]["any"] += float(anyobj[top].float().mean())
    if n == 0:
        raise UsageError("no question with a visible asked-about object: nothing to measure")
    return {
        "questions": n,
        "k": "object token count (a token is on the object when >= 25% of its patch is)",
        "chance_asked": round(chance_asked / n, 4),
        "chance_any": round(chance_any / n, 4),
        "asked_among_objects": round(chance_among / n, 4),
        "share": {f"{m}@{l}": {"asked": round(v["asked"] / n, 4), "any": round(v["any"] / n, 4)} for (m, l), v in acc.items()},
    }


def format_relevance(rel: dict) -> str:
    lines = [f"Finding 2: share of the top-k variation tokens on the asked-about object (k = its token count), "
             f"{rel['questions']} questions; chance {100 * rel['chance_asked']:.1f}% (asked object), "
             f"{100 * rel['chance_any']:.1f}% (any object); the asked object's share of all object tokens: "
             f"{100 * rel['asked_among_objects']:.1f}% (what top-k spread over every object would give)",
             f"{'metric@layer':<14}{'asked':>8}{'any obj':>9}"]
    for key, v in rel["share"].items():
        lines.append(f"{key:<14}{100 * v['asked']:>7.1f}%{100 * v['any']:>8.1f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def add_analyze_command(sub) -> None:
    from .cli import positive_int

    p = sub.add_parser("analyze", help="the token-variation paper's findings on a model: position bias of scorers, variation maps")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint folder or id (default: the shipped toy model, tokencomp/toy/checkpoint)")
    src.add_argument("--synthetic", metavar="FAMILY", help="a tiny random-weight model of this family (llava, llava_next, qwen2_vl, ...)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable; needed for a model that is not a toy one)")
    p.add_argument("--video", help="folder of frame images (models that take video: Qwen, OneVision)")
    p.add_argument("--prompt", default="Describe the image.", help="question asked with --image / --video")
    p.add_argument("--n", type=positive_int, default=50, help="toy questions (held-out split) to measure on (default 50)")
    p.add_argument("--scorers", nargs="+", default=None,
                   help="scorers to compare: NAME, NAME:l1 (metric), NAME:key=value,... (default: the default scorer, "
                        "every attention-based scorer, random)")
    p.add_argument("--layer", type=positive_int, help="decoder layer of the stage (default: 3, or the last but one on shallower models)")
    p.add_argument("--keep", type=float, default=0.333, help="fraction of the vision tokens the stage keeps (default 0.333)")
    p.add_argument("--variation-layers", type=positive_int, nargs="+", help="layers of the variation maps (default: 2, middle, last but one)")
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument("--maps", type=int, default=4, help="variation pictures to write (toy: one per question; default 4)")
    p.add_argument("--out-dir", default="tokencomp-analyze", help="folder for analyze.json and the PNGs (created)")
    p.add_argument("--svg", action="store_true", help="also write the position plot as SVG (needs tokencomp[viz])")
    p.add_argument("--accuracy", action="store_true", help="run the toy accuracy table instead (see benchmarks/accuracy.py)")
    p.add_argument("--quick", action="store_true", help="with --accuracy: a small smoke run (few questions, few configs)")
    p.set_defaults(func=cmd_analyze)


def _check_args(args) -> None:
    if not 0.0 <= args.keep <= 1.0:
        raise UsageError(f"--keep {args.keep}: must be in [0, 1]")
    if args.maps < 0:
        raise UsageError(f"--maps {args.maps}: must be >= 0")
    if args.svg:
        from .heatmap import require_matplotlib

        require_matplotlib()  # before any model work
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {args.out_dir}: exists and is not a folder")
    if not out.parent.exists() and str(out.parent) not in ("", "."):
        raise UsageError(f"--out-dir {args.out_dir}: parent folder {out.parent} does not exist")
    if args.scorers is None:
        args.scorers = default_scorers()
    for text in args.scorers:
        _, spec = parse_scorer(text)
        try:
            stage_recipe(spec, 1, args.keep)
        except RecipeError as exc:
            raise UsageError(f"--scorers {text}: {str(exc).splitlines()[0]}") from None


def _is_toy(processor) -> bool:
    from .toy import scenes

    vocab = getattr(getattr(processor, "tokenizer", None), "get_vocab", lambda: {})()
    return all(w in vocab for w in scenes.vocabulary())


def _depth(args) -> int:
    """Decoder depth of the model the arguments name, from its config only."""
    if args.synthetic:
        from .testing import FAMILIES

        if args.synthetic not in FAMILIES:
            raise UsageError(f"--synthetic {args.synthetic}: unknown family; choose from {', '.join(FAMILIES)}")
        return 6
    from .runner import check_model
    from .toy import harness

    return check_model(args.model or harness.CHECKPOINT).get_text_config().num_hidden_layers


def _load(args):
    """(model, processor or None, toy?) for the arguments."""
    from .runner import _load_real, check_model, check_processor_deps, takes_video

    if args.synthetic:
        from .testing import build_tiny

        try:
            model = build_tiny(args.synthetic, layers=6)
        except (ValueError, KeyError) as exc:
            raise UsageError(f"--synthetic {args.synthetic}: {str(exc).splitlines()[0]}") from None
        return model, None, False
    from .toy import harness

    model_id = args.model or harness.CHECKPOINT
    config = check_model(model_id)
    if args.video and not takes_video(config):
        raise UsageError(f"--video {args.video}: {config.model_type} models take no video input (pass frames as several --image)")
    check_processor_deps(model_id, config)
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"--model {model_id}: cannot load its processor: {str(exc).splitlines()[0]}") from None
    toy = _is_toy(processor)
    if not toy and not args.image and not args.video:
        raise UsageError(f"--model {model_id}: not a toy checkpoint; give --image (or --video) and --prompt to analyze it")
    model = _load_real(model_id, "sdpa", torch.float32)
    return model, processor, toy


def _real_inputs(args, model, processor):
    from .runner import _load_images, load_video

    images = _load_images(args.image)
    video = load_video(args.video) if args.video else None
    content = [{"type": "image"} for _ in images] + ([{"type": "video"}] if video else [])
    content.append({"type": "text", "text": args.prompt})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kw = {"text": [text], "return_tensors": "pt"}
    if images:
        kw["images"] = images
    if video:
        kw["videos"] = [video]
    return processor(**kw), images, video


def cmd_analyze(args) -> int:
    if args.accuracy:
        from .toy.accuracy import main as accuracy_main

        return accuracy_main(["--quick"] if args.quick else [])
    _check_args(args)
    depth = _depth(args)  # layer checks before any weights are loaded
    layer = args.layer if args.layer is not None else min(3, depth - 1)
    if not 1 <= layer < depth:
        raise UsageError(f"--layer {layer}: must be in 1..{depth - 1} (the model has {depth} decoder layers)")
    vlayers = args.variation_layers or sorted({min(2, depth - 1), max(1, depth // 2), max(1, depth - 2)})
    for l in vlayers:
        if not 1 <= l <= depth:
            raise UsageError(f"--variation-layers {l}: must be in 1..{depth} (the model has {depth} decoder layers)")
    with torch.no_grad():  # scoped: the CLI may run inside a test process
        return _analyze(args, depth, layer, vlayers)


def _analyze(args, depth, layer, vlayers) -> int:
    from .heatmap import token_layout

    model, processor, toy = _load(args)
    out = Path(args.out_dir)
    out.mkdir(exist_ok=True)
    scorers = dict(parse_scorer(s) for s in args.scorers)
    report: dict = {"model": args.synthetic and f"synthetic {args.synthetic}" or (args.model or "toy (tokencomp/toy/checkpoint)"),
                    "depth": depth}
    pictures, regions_masks = [], []
    if toy and not args.image and not args.video:
        from .toy import harness, scenes

        questions = scenes.make_questions("test", args.n)
        batches = [harness.encode(processor, questions[k : k + 25]) for k in range(0, len(questions), 25)]
        report["inputs"] = f"{len(questions)} held-out toy questions (test split, seed 0)"
    elif args.synthetic:
        from .testing import make_inputs

        batches = [make_inputs(model, batch=2, seed=s) for s in range(2)]
        questions = None
        report["inputs"] = "4 random prompts of the tiny model"
    else:
        inputs, images, video = _real_inputs(args, model, processor)
        batches, questions = [inputs], None
        report["inputs"] = f"{len(images)} image(s)" + (f", a video of {len(video)} frames" if video else "") + f", prompt {args.prompt!r}"
    # Finding 1
    pos = position_retention(model, batches, scorers, layer, args.keep)
    report["position"] = pos
    print(format_retention(pos))
    how = plot_retention(pos, out / "position.png", svg=args.svg)
    print(f"wrote {out / 'position.png'}" + ("" if how == "matplotlib" else " (Pillow chart; pip install 'tokencomp[viz]' for matplotlib)"))
    # Finding 2
    from .heatmap import token_layout

    if questions is not None:
        rel = relevance(model, processor, questions, vlayers, args.metrics)
        report["relevance"] = rel
        print(format_relevance(rel))
        from .toy import build, harness

        for i, q in enumerate(questions[: args.maps]):
            enc = harness.encode(processor, [q])
            var = layer_variations(model, enc, vlayers, args.metrics)
            regions, grids = variation_grids(model, enc, var)
            pic = render_variation([q.image], regions, grids, masks=[object_tokens(q.mask, build.PATCH)],
                                   titles=[f"{q.question} {q.answer}"])
            pic.save(out / f"variation-{i}.png")
        if args.maps:
            print(f"wrote {out}/variation-0..{min(args.maps, len(questions)) - 1}.png: picture, asked-object tokens, "
                  f"then {', '.join(args.metrics)} variation at layers {vlayers}")
    elif args.maps:
        inputs = batches[0]
        var = layer_variations(model, inputs, vlayers, args.metrics)
        cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}
        if args.synthetic:
            regions, grids = variation_grids(model, cpu, var)
            pics = [torch.full((3, 64, 64), 0.5)] * len(regions)
        else:
            sizes = [(im.height, im.width) for im in images]
            regions = token_layout(model, cpu, 0, processor=processor, image_sizes=sizes)
            grids = {}
            for metric, per_layer in var.items():
                for l, values in per_layer.items():
                    grids[(metric, l)] = [values[0][r.positions] for r in regions]
            frames = list(video or [])
            pics = [images[r.image] if r.view != "video" else frames[min(r.frame, len(frames) - 1)] for r in regions]
        render_variation(pics, regions, grids).save(out / "variation-0.png")
        print(f"wrote {out / 'variation-0.png'}: {', '.join(args.metrics)} variation at layers {vlayers}, one row per image / view / frame")
    (out / "analyze.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out / 'analyze.json'}", file=sys.stderr)
    return 0
