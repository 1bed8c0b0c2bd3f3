"""The ``demo``, ``run`` and ``bench`` commands of the ``tokencomp`` CLI."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from .cli import INTERRUPTED, nonnegative_int, one_line, positive_int
from .errors import UnsupportedModelError, UsageError
from .progress import progress

DEMO_LAYERS = 32
DEMO_IMAGE = 336  # the demo model's input side: 24 x 24 patches of 14 px = 576 vision tokens


def add_commands(sub) -> None:
    """Register ``demo``, ``run`` and ``bench`` on the CLI's sub-parser."""
    p = sub.add_parser("demo", help="compress a model end to end and show what was kept (no download needed)")
    p.add_argument("--recipe", help="recipe (shipped name or path); default: the default scorer, selector and schedule plugins")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a real checkpoint (id or path); default: the shipped toy LLaVA (tokencomp/toy) on a generated scene")
    src.add_argument("--synthetic", action="store_true",
                     help="a random-weight LLaVA-1.5-shaped model built here (32 layers, 576 vision tokens) instead of the toy model")
    p.add_argument("--image", help="image file for --model (default: a generated picture)")
    p.add_argument("--prompt", default="What is in this image?", help="question for --model")
    p.add_argument("--out", default="tokencomp-demo.png", help="heatmap PNG to write (also with --model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="generate with a recipe on a real checkpoint; print the answer and stats")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--model", required=True, help="checkpoint id or path (loaded with from_pretrained)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", help="video as a folder of frame images")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    p.add_argument("--heatmap", help="also write a PNG of the tokens kept at each stage over the images / frames")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="time untouched vs recipe side by side; print ratios")
    p.add_argument("recipe", metavar="RECIPE")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint id or path")
    src.add_argument("--synthetic", type=synthetic_spec,
                     help="random-weight model with a real decoder shape: NAME[:layers=N,hidden=H,...] "
                          "(default: a narrowed LLaVA-1.5-7B shape, tokencomp.synthetic.BENCH_SYNTHETIC)")
    p.add_argument("--vision-tokens", type=positive_int, nargs="+", default=[576], help="one or more vision-token counts")
    p.add_argument("--text-tokens", type=nonnegative_int, default=60)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--frames", type=positive_int, default=1,
                   help="split the vision tokens into this many equal frames (video mode: e.g. 6272 tokens as 32 frames of 196)")
    p.add_argument("--new-tokens", type=nonnegative_int, default=8, help="decode steps timed (0: prefill only)")
    p.add_argument("--repeat", type=positive_int, default=5, help="measured rounds (after one warm-up round)")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", dest="json_out", help="write the results as JSON here")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table (for BENCHMARKS.md)")
    p.add_argument("--no-limit", dest="limit", action="store_false",
                   help="skip the physical-limit variant (bare layers fed the recipe's token counts)")
    p.add_argument("--no-peer", dest="peer", action="store_false",
                   help="skip the full-attention-matrix peer variant of attention-based scorers")
    p.add_argument("--no-generate", dest="generate", action="store_false",
                   help="skip the end-to-end generate timing of each round (prefill and decode are still timed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    from .evaltable import add_eval_command  # `tokencomp eval` (lmms-eval imported only when it runs)

    add_eval_command(sub)

    from .analyze import add_analyze_command  # `tokencomp analyze`: the token-variation paper's findings

    add_analyze_command(sub)


# ------------------------------------------------------------------------------------------------
# Checks of user-given arguments, all before any model is built or loaded
# ------------------------------------------------------------------------------------------------


def synthetic_spec(text: str) -> str:
    """``argparse`` type of ``--synthetic``: ``NAME[:key=N,...]`` with every size >= 1 and an even
    head dimension (rotary embeddings rotate pairs of channels)."""
    from .synthetic import parse_synthetic

    name, _, rest = text.partition(":")
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        # parse_synthetic divides by heads and kv_heads: reject zeros before it does.
        if value.strip().isdigit() and int(value) < 1:
            raise argparse.ArgumentTypeError(f"{key} must be >= 1, got {value.strip()} (in {text!r})")
    try:
        _, dims = parse_synthetic(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    head_dim = dims["hidden"] // dims["heads"]
    if head_dim % 2:
        raise argparse.ArgumentTypeError(
            f"hidden / heads = {dims['hidden']} / {dims['heads']} = {head_dim}: the head dimension must be even (in {text!r})"
        )
    return text


def check_device(spec: str) -> torch.device:
    """``--device``: a device string torch knows, and present on this machine."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r}: not a device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA GPU is visible" if torch.version.cuda else f"this torch ({torch.__version__}) is built without CUDA"
            raise UsageError(f"--device {spec}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    return device


def check_output(path: str, option: str) -> None:
    """Fail now, not after a long run, when ``path`` cannot be written."""
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a directory")
    if not parent.exists():
        raise UsageError(f"{option} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory")
    existed = p.exists()
    try:
        # A real open, not os.access: read-only mounts and root's permissions answer truthfully.
        with open(p, "ab"):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write: {exc.strerror or exc}") from None
    if not existed:
        p.unlink()


def check_input_file(path, option: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {path}: no such file")
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a directory, not a file")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def check_model(model_id: str) -> None:
    """``--model``: an existing checkpoint folder or a Hub id whose config is an image-text-to-text
    model with a tokencomp adapter. Reads only the config: a wrong model fails before its weights
    are loaded."""
    path = Path(model_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--model {model_id}: not a directory (expected a checkpoint folder or a Hugging Face model id)")
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {model_id}: no config.json in this folder, not a Hugging Face checkpoint")
    elif not _HUB_ID.match(model_id) or model_id.startswith((".", "~")):
        raise UsageError(f"--model {model_id}: no such directory")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model {model_id}: cannot read its config: {one_line(str(exc))}") from None
    cls_name = _image_text_class(config)
    if cls_name is None:
        raise UsageError(f"--model {model_id}: model_type {config.model_type!r} is not a vision-language (image-text-to-text) model")
    if _adapter_class(config) is None:
        from .plugins import registry

        supported = registry().supported_classes()
        raise UnsupportedModelError(f"--model {model_id}: {cls_name} is not supported by tokencomp; supported: {', '.join(supported)}")
    return config


def _adapter_class(config):
    """The adapter class of the model class that ``config`` loads as, or None."""
    import transformers

    from .plugins import registry

    cls = getattr(transformers, _image_text_class(config) or "", None)
    return registry().adapter_class(cls) if isinstance(cls, type) else None


def check_processor_deps(model_id: str, config) -> None:
    """Processors of video models cannot be built without torchvision (transformers 5's video
    processors need it, and those processors include one): say so in one line."""
    if not takes_video(config):
        return
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA wheel failing next to a CPU torch
        raise UsageError(
            f"--model {model_id}: the {config.model_type} processor needs torchvision, which does not import here "
            f"({type(exc).__name__}: {one_line(str(exc))}); install the build matching torch {torch.__version__} "
            "(CPU-only torch: pip install torchvision --index-url https://download.pytorch.org/whl/cpu)"
        ) from None


def takes_video(config) -> bool:
    """Whether the model has a video placeholder token (its adapter says, from the config)."""
    cls = _adapter_class(config)
    return cls is not None and cls.from_config(config).video_token_id is not None


def _image_text_class(config):
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names
    except ImportError:  # pragma: no cover - older transformers: let from_pretrained decide
        return getattr(config, "architectures", [None])[0]
    return names.get(getattr(config, "model_type", None))


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


def _load_real(model_id: str, attn: str, dtype):
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(model_id, attn_implementation=attn, dtype=dtype).eval()
    except (OSError, ValueError, ImportError) as exc:
        # Missing weights, a config transformers cannot map, an attention kernel not installed.
        raise UsageError(f"--model {model_id}: cannot load: {one_line(str(exc))}") from None


def _build_synthetic(spec: str, attn: str, dtype):
    from .synthetic import build_synthetic

    try:
        return build_synthetic(spec, attn=attn, dtype=dtype)
    except ImportError as exc:  # --attn flash_attention_2 without flash-attn installed
        raise UsageError(f"--attn {attn}: {one_line(str(exc))}") from None


def _write_json(path: str, results: list) -> None:
    Path(path).write_text(json.dumps(results, indent=2))


def cmd_bench(args) -> int:
    import tokencomp
    from .bench import bench, format_report

    recipe = tokencomp.load_recipe(args.recipe)  # bad recipes fail before any model is built
    device = check_device(args.device)
    if args.json_out:
        check_output(args.json_out, "--json")
    if args.model:
        check_model(args.model)
    dtype = getattr(torch, args.dtype)
    if not args.model and not args.synthetic:
        from .synthetic import BENCH_SYNTHETIC

        args.synthetic = BENCH_SYNTHETIC
    spec = args.model or f"synthetic {args.synthetic}"
    results = []
    try:
        if args.model:
            model = _load_real(args.model, args.attn, dtype)
        else:
            with torch.device(device):  # random weights made where they run: seconds for a 7B shape on a GPU
                model = _build_synthetic(args.synthetic, args.attn, dtype)
        model = model.to(device)
        for n in progress(args.vision_tokens, args.quiet or len(args.vision_tokens) < 2, desc="vision-token counts", unit="count"):
            rep = bench(model, recipe, vision_tokens=n, text_tokens=args.text_tokens, batch=args.batch, frames=args.frames,
                        new_tokens=args.new_tokens, repeat=args.repeat, progress=not getattr(args, "quiet", False),
                        limit=args.limit, peer=args.peer, generate=args.generate)
            rep["model_spec"] = spec
            results.append(rep)
            print(format_report(rep))
            print()
            if args.json_out:  # after every count: a later failure keeps the earlier results
                _write_json(args.json_out, results)
    except KeyboardInterrupt as exc:
        # Ctrl-C: keep what was measured. bench() attaches the rounds of the count in progress.
        partial = getattr(exc, "report", None)
        if partial is not None:
            partial["model_spec"] = spec
            results.append(partial)
            print(format_report(partial))
            print()
        done = [r["vision_tokens"] for r in results]
        missing = [n for n in args.vision_tokens if n not in done]
        msg = "interrupted"
        if partial is not None:
            msg += f"; vision tokens {partial['vision_tokens']}: {partial['repeat']} of {partial['repeat_requested']} rounds (partial)"
        if missing:
            msg += f"; not measured: vision tokens {', '.join(map(str, missing))}"
        if args.json_out and results:
            _write_json(args.json_out, results)
            msg += f"; results so far written to {args.json_out}"
        _print_markdown(args, results)
        print(msg, file=sys.stderr)
        return INTERRUPTED
    _print_markdown(args, results)
    return 0


def _print_markdown(args, results) -> None:
    if args.markdown and results:
        from .bench import MARKDOWN_HEADER, format_markdown_row

        print(MARKDOWN_HEADER)
        for rep in results:
            print(format_markdown_row(rep))


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    import tokencomp
    from .flops import DecoderShape, prefill_flops_compared
    from .heatmap import demo_picture, render_regions, save_png, token_layout

    recipe = tokencomp.load_recipe(args.recipe) if args.recipe else tokencomp.default_recipe()
    if args.model:
        return _demo_real(args, recipe)
    if args.image:
        raise UsageError(f"--image {args.image}: needs --model (the default demo asks the toy model about a generated scene)")
    check_output(args.out, "--out")
    if not args.synthetic:
        return _demo_toy(args, recipe)
    from .synthetic import build_demo_model, demo_inputs

    model = build_demo_model(DEMO_LAYERS, DEMO_IMAGE)
    image = demo_picture(DEMO_IMAGE)
    inputs = demo_inputs(model, image)
    n_layers = model.config.get_text_config().num_hidden_layers
    name = recipe.name or (recipe.source if recipe.source != "<dict>" else f"default ({recipe.scorer.name} scorer, {recipe.schedule.name} schedule)")
    print(f"model: random-weight LLaVA-1.5 shape ({n_layers} layers, 576 vision tokens); recipe: {name}")
    print(recipe.describe(n_layers))
    kw = dict(max_new_tokens=8, do_sample=False)
    times = {"baseline": [], "compressed": []}
    with torch.no_grad():
        for _ in progress(range(3), getattr(args, "quiet", False), desc="generate (baseline, compressed)", unit="round"):  # interleaved, median reported
            t0 = time.perf_counter()
            base = model.generate(**inputs, **kw)
            times["baseline"].append(time.perf_counter() - t0)
            with tokencomp.apply(model, recipe) as handle:
                t0 = time.perf_counter()
                comp = model.generate(**inputs, **kw)
                times["compressed"].append(time.perf_counter() - t0)
    stats = handle.stats
    counts = stats.vision_tokens_per_layer[0]
    shape = DecoderShape.from_config(model.config)
    f_base, f_comp = prefill_flops_compared(shape, stats.real_tokens[0], stats.input_vision_tokens[0], counts)
    tb, tc = sorted(times["baseline"])[1], sorted(times["compressed"])[1]
    print(f"vision tokens entering each layer: {counts}")
    print(f"average vision tokens per layer: {sum(counts) / len(counts):.1f} of {stats.input_vision_tokens[0]}")
    print(f"prefill FLOPs: {f_base / 1e9:.2f} G -> {f_comp / 1e9:.2f} G ({100 * (1 - f_comp / f_base):.1f}% saved)")
    print(f"generate (8 tokens) latency: baseline {tb * 1000:.0f} ms, compressed {tc * 1000:.0f} ms (ratio {tc / tb:.2f})")
    L = inputs["input_ids"].shape[1]
    print(f"generated ids (random weights, not meaningful): baseline {base[0, L:].tolist()}, compressed {comp[0, L:].tolist()}")
    rendering = render_regions(image, token_layout(model, inputs), stats.kept_positions)
    save_png(args.out, rendering)
    print(f"wrote {args.out}: " + "; ".join(rendering.legend()))
    return 0


def _demo_toy(args, recipe) -> int:
    """The default demo: the shipped toy LLaVA answers a held-out question about a generated scene,
    untouched and compressed; tokens per layer, FLOPs, and the heatmap of the kept patches."""
    import tokencomp
    from PIL import Image

    from .flops import DecoderShape, prefill_flops_compared
    from .heatmap import render_inputs, save_png
    from .toy import harness, scenes

    model, processor = harness.load()
    n_layers = model.config.get_text_config().num_hidden_layers
    # The first held-out question the untouched model answers right (kinds cycle through the list).
    candidates = scenes.make_questions("test", 40)
    with torch.no_grad():
        enc = harness.encode(processor, candidates)
        first = model(**enc, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
    words = processor.tokenizer.convert_ids_to_tokens(first)
    q = next((c for c, w in zip(candidates, words) if w == c.answer), candidates[0])
    inputs = harness.encode(processor, [q])
    from .plugins import registry

    vision_ids = torch.tensor(registry().adapter_for(model).vision_token_ids())
    n_vision = int(torch.isin(inputs["input_ids"], vision_ids).sum())
    name = recipe.name or (recipe.source if recipe.source != "<dict>" else f"default ({recipe.scorer.name} scorer, {recipe.schedule.name} schedule)")
    print(f"model: the shipped toy LLaVA ({n_layers} layers, {n_vision} vision tokens; trained on generated shape scenes, "
          f"accuracy under compression: ACCURACY.md); recipe: {name}   (--synthetic: the random-weight LLaVA-1.5 shape)")
    print(recipe.describe(n_layers))
    L = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=3, do_sample=False)

    def answer(out):
        return processor.batch_decode(out[:, L:], skip_special_tokens=True)[0].strip()

    with torch.no_grad():
        base = answer(model.generate(**inputs, **kw))
        with tokencomp.apply(model, recipe) as handle:
            comp = answer(model.generate(**inputs, **kw))
    stats = handle.stats
    counts = stats.vision_tokens_per_layer[0]
    shape = DecoderShape.from_config(model.config)
    f_base, f_comp = prefill_flops_compared(shape, stats.real_tokens[0], stats.input_vision_tokens[0], counts)
    print(f"question (held-out scene {q.seed}): {q.question}   expected: {q.answer}")
    print(f"answer untouched:  {base}")
    print(f"answer compressed: {comp}")
    print(f"vision tokens entering each layer: {counts}")
    print(f"average vision tokens per layer: {sum(counts) / len(counts):.1f} of {stats.input_vision_tokens[0]}")
    print(f"prefill FLOPs: {f_base / 1e9:.3f} G -> {f_comp / 1e9:.3f} G ({100 * (1 - f_comp / f_base):.1f}% saved)")
    rendering = render_inputs(model, processor, inputs, [Image.fromarray(q.image)], None, handle.stats.kept_positions)
    save_png(args.out, rendering)
    print(f"wrote {args.out}: " + "; ".join(rendering.legend()))
    return 0


def load_video(path: str):
    """The frames of ``--video FOLDER`` (its .png / .jpg files in name order), decoded now."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"--video {path}: {'not a folder' if folder.exists() else 'no such folder'} (expected a folder of frame images)")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not frames:
        raise UsageError(f"--video {path}: no .png/.jpg frames in this folder")
    return _load_images(frames, "--video")


def _load_images(paths, option: str = "--image"):
    """Decode every image now, so that a missing or broken file fails before the model loads."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        check_input_file(p, option)
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:  # not an image, truncated, unreadable
            raise UsageError(f"{option} {p}: cannot decode the image: {one_line(str(exc))}") from None
    return images


def _demo_real(args, recipe) -> int:
    from .heatmap import demo_picture

    if args.image:
        images = _load_images([args.image])
    else:
        from PIL import Image

        pic = (demo_picture(DEMO_IMAGE).permute(1, 2, 0) * 255).round().byte().numpy()
        images = [Image.fromarray(pic)]
    check_output(args.out, "--out")
    check_processor_deps(args.model, check_model(args.model))
    answer_base, answer_comp, stats = _generate_real(args.model, recipe, images, args.prompt, 64, "sdpa", compare=True,
                                                     heatmap=args.out, quiet=args.quiet)
    print(f"baseline:   {answer_base}")
    print(f"compressed: {answer_comp}")
    print(f"vision tokens per layer: {stats.vision_tokens_per_layer[0]}")
    return 0


def _generate_real(model_id, recipe, images, prompt, max_new_tokens, attn, compare=False, video=None, heatmap=None,
                   quiet=False):
    import tokencomp
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"--model {model_id}: cannot load its processor: {one_line(str(exc))}") from None
    model = _load_real(model_id, attn, "auto")
    content = [{"type": "image"} for _ in images]
    if video is not None:
        content.append({"type": "video"})
    content.append({"type": "text", "text": prompt})
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kwargs = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if video is not None:
        kwargs["videos"] = [video]
    inputs = processor(**kwargs).to(model.device)
    n = inputs["input_ids"].shape[1]

    def decode(out):
        return processor.batch_decode(out[:, n:], skip_special_tokens=True)[0].strip()

    base = comp = None
    with torch.no_grad():
        for which in progress(["baseline", "compressed"] if compare else ["compressed"], quiet or not compare,
                              desc="generate", unit="run"):
            if which == "baseline":
                base = decode(model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))
                continue
            with tokencomp.apply(model, recipe) as handle:
                comp = decode(model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))
    if heatmap:
        _write_heatmap(heatmap, model, processor, inputs, images, video, handle.stats)
    return base, comp, handle.stats


def _write_heatmap(path, model, processor, inputs, images, video, stats) -> None:
    from .heatmap import render_inputs, save_png

    rendering = render_inputs(model, processor, inputs, images, video, stats.kept_positions)
    save_png(path, rendering)
    print(f"wrote {path}: each row is one image / view / frame, its panels left to right:", file=sys.stderr)
    for line in rendering.legend():
        print(f"  {line}", file=sys.stderr)


def cmd_run(args) -> int:
    import tokencomp

    recipe = tokencomp.load_recipe(args.recipe)
    images = _load_images(args.image)
    video = load_video(args.video) if args.video else None
    if args.heatmap:
        check_output(args.heatmap, "--heatmap")
        if not images and video is None:
            raise UsageError(f"--heatmap {args.heatmap}: the prompt has no image or video to draw (add --image or --video)")
    config = check_model(args.model)
    if video is not None and not takes_video(config):
        raise UsageError(f"--video {args.video}: {config.model_type} models take no video input "
                         "(pass frames as several --image, or use a video model: Qwen2/2.5/3-VL, LLaVA-OneVision)")
    check_processor_deps(args.model, config)
    _, answer, stats = _generate_real(
        args.model, recipe, images, args.prompt, args.max_new_tokens, args.attn, video=video, heatmap=args.heatmap,
        quiet=args.quiet,
    )
    print(answer)
    print(json.dumps(stats.as_dict()["average_vision_tokens"]), file=sys.stderr)
    print(f"vision tokens per layer: {stats.vision_tokens_per_layer}", file=sys.stderr)
    return 0
