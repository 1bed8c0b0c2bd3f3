"""The ``demo``, ``run`` and ``bench`` commands of the ``tokencomp`` CLI."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEMO_LAYERS = 32
DEMO_IMAGE = 336  # LLaVA-1.5's CLIP-336 input: 24 x 24 = 576 vision tokens


def add_commands(sub) -> None:
    """Register ``demo``, ``run`` and ``bench`` on the CLI's sub-parser."""
    p = sub.add_parser("demo", help="compress a model end to end and show what was kept (no weights needed)")
    p.add_argument("--recipe", help="recipe (shipped name or path); default: the default scorer, selector and schedule plugins")
    p.add_argument("--model", help="a real checkpoint (id or path); default: a random-weight LLaVA-1.5 built here")
    p.add_argument("--image", help="image file for --model (default: a generated picture)")
    p.add_argument("--prompt", default="What is in this image?", help="question for --model")
    p.add_argument("--out", default="tokencomp-demo.png", help="heatmap PNG to write")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="generate with a recipe on a real checkpoint; print the answer and stats")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--model", required=True, help="checkpoint id or path (loaded with from_pretrained)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", help="video as a folder of frame images")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    p.add_argument("--heatmap", help="also write a PNG of the tokens kept at each stage over the images / frames")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="time untouched vs recipe side by side; print ratios")
    p.add_argument("recipe", metavar="RECIPE")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint id or path")
    src.add_argument("--synthetic", default="llava-1.5-7b:layers=8,hidden=1024,heads=16,kv_heads=16,intermediate=2816",
                     help="random-weight model with a real decoder shape: NAME[:layers=N,hidden=H,...]")
    p.add_argument("--vision-tokens", type=int, nargs="+", default=[576], help="one or more vision-token counts")
    p.add_argument("--text-tokens", type=int, default=60)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", dest="json_out", help="write the results as JSON here")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table (for BENCHMARKS.md)")
    p.set_defaults(func=cmd_bench)

    from .evaltable import add_eval_command  # `tokencomp eval` (lmms-eval imported only when it runs)

    add_eval_command(sub)


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


def _load_real(model_id: str, attn: str, dtype):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_id, attn_implementation=attn, dtype=dtype).eval()


def cmd_bench(args) -> int:
    import tokencomp
    from .bench import bench, format_report
    from .testing import build_synthetic

    recipe = tokencomp.load_recipe(args.recipe)  # bad recipes fail before any model is built
    dtype = getattr(torch, args.dtype)
    if args.model:
        model = _load_real(args.model, args.attn, dtype)
    else:
        model = build_synthetic(args.synthetic, attn=args.attn, dtype=dtype)
    model = model.to(args.device)
    results = []
    for n in args.vision_tokens:
        rep = bench(model, recipe, vision_tokens=n, text_tokens=args.text_tokens, batch=args.batch,
                    new_tokens=args.new_tokens, repeat=args.repeat)
        rep["model_spec"] = args.model or f"synthetic {args.synthetic}"
        results.append(rep)
        print(format_report(rep))
        print()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    if args.markdown:
        from .bench import MARKDOWN_HEADER, format_markdown_row

        print(MARKDOWN_HEADER)
        for rep in results:
            print(format_markdown_row(rep))
    return 0


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------


def build_demo_model():
    """A random-weight LLaVA-1.5 with the real 32-layer depth and 576 vision tokens per image, but a
    narrow decoder (hidden 256) so it runs on a laptop CPU in well under a second."""
    import transformers

    from .testing import _CLASSES, tiny_config

    cfg = tiny_config("llava", layers=DEMO_LAYERS)
    cfg.vision_config.image_size = DEMO_IMAGE
    cfg.image_seq_length = (DEMO_IMAGE // 14) ** 2
    text = cfg.get_text_config()
    text.hidden_size, text.intermediate_size = 256, 1024
    text.num_attention_heads, text.num_key_value_heads = 8, 8
    text.head_dim = 32
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _CLASSES["llava"](cfg).eval()
    assert isinstance(model, transformers.LlavaForConditionalGeneration)
    return model


def demo_inputs(model, image: torch.Tensor, prompt_len: int = 24, seed: int = 0):
    """LLaVA-style prompt ids around 576 image placeholders, and CLIP-normalised pixels."""
    from .testing import BOS_ID, IMAGE_ID, TEXT_ID_MIN, VOCAB_SIZE

    gen = torch.Generator().manual_seed(seed)
    n = model.config.image_seq_length
    pre = torch.randint(TEXT_ID_MIN, VOCAB_SIZE, (prompt_len,), generator=gen)
    post = torch.randint(TEXT_ID_MIN, VOCAB_SIZE, (prompt_len // 2,), generator=gen)
    ids = torch.cat([torch.tensor([BOS_ID]), pre, torch.full((n,), IMAGE_ID), post])[None]
    mean = torch.tensor([0.481, 0.458, 0.408])[:, None, None]
    std = torch.tensor([0.269, 0.261, 0.276])[:, None, None]
    pixels = ((image - mean) / std)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def cmd_demo(args) -> int:
    import tokencomp
    from .flops import DecoderShape, prefill_flops
    from .heatmap import demo_picture, render_regions, token_layout, write_png

    recipe = tokencomp.load_recipe(args.recipe) if args.recipe else tokencomp.default_recipe()
    if args.model:
        return _demo_real(args, recipe)
    model = build_demo_model()
    image = demo_picture(DEMO_IMAGE)
    inputs = demo_inputs(model, image)
    n_layers = model.config.get_text_config().num_hidden_layers
    name = recipe.name or (recipe.source if recipe.source != "<dict>" else f"default ({recipe.scorer.name} scorer, {recipe.schedule.name} schedule)")
    print(f"model: random-weight LLaVA-1.5 shape ({n_layers} layers, 576 vision tokens); recipe: {name}")
    print(recipe.describe(n_layers))
    kw = dict(max_new_tokens=8, do_sample=False)
    times = {"baseline": [], "compressed": []}
    with torch.no_grad():
        for _ in range(3):  # interleaved, median reported
            t0 = time.perf_counter()
            base = model.generate(**inputs, **kw)
            times["baseline"].append(time.perf_counter() - t0)
            with tokencomp.apply(model, recipe) as handle:
                t0 = time.perf_counter()
                comp = model.generate(**inputs, **kw)
                times["compressed"].append(time.perf_counter() - t0)
    stats = handle.stats
    counts = stats.vision_tokens_per_layer[0]
    L = inputs["input_ids"].shape[1]
    shape = DecoderShape.from_config(model.config)
    f_base = prefill_flops(shape, [L] * n_layers)
    f_comp = prefill_flops(shape, [L - counts[0] + c for c in counts])
    tb, tc = sorted(times["baseline"])[1], sorted(times["compressed"])[1]
    print(f"vision tokens entering each layer: {counts}")
    print(f"average vision tokens per layer: {sum(counts) / len(counts):.1f} of {counts[0]}")
    print(f"prefill FLOPs: {f_base / 1e9:.2f} G -> {f_comp / 1e9:.2f} G ({100 * (1 - f_comp / f_base):.1f}% saved)")
    print(f"generate (8 tokens) latency: baseline {tb * 1000:.0f} ms, compressed {tc * 1000:.0f} ms (ratio {tc / tb:.2f})")
    print(f"generated ids (random weights, not meaningful): baseline {base[0, L:].tolist()}, compressed {comp[0, L:].tolist()}")
    panels = render_regions(image, token_layout(model, inputs), stats.kept_positions)
    write_png(args.out, panels)
    print(f"wrote {args.out}: the image, then the patches kept after each stage ({', '.join(map(str, stats.kept_positions))})")
    return 0


def _load_images(paths):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


def _demo_real(args, recipe) -> int:
    from .heatmap import demo_picture

    if args.image:
        images = _load_images([args.image])
    else:
        from PIL import Image

        pic = (demo_picture(DEMO_IMAGE).permute(1, 2, 0) * 255).round().byte().numpy()
        images = [Image.fromarray(pic)]
    answer_base, answer_comp, stats = _generate_real(args.model, recipe, images, args.prompt, 64, "sdpa", compare=True)
    print(f"baseline:   {answer_base}")
    print(f"compressed: {answer_comp}")
    print(f"vision tokens per layer: {stats.vision_tokens_per_layer[0]}")
    return 0


def _generate_real(model_id, recipe, images, prompt, max_new_tokens, attn, compare=False, video=None, heatmap=None):
    import tokencomp
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id)
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

    with torch.no_grad():
        base = decode(model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)) if compare else None
        with tokencomp.apply(model, recipe) as handle:
            comp = decode(model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))
    if heatmap:
        _write_heatmap(heatmap, model, inputs, images, video, handle.stats)
    return base, comp, handle.stats


def _picture(pil, size=224) -> torch.Tensor:
    """A PIL image as a (3, size, size) float tensor (regions cover whole images, so aspect is free)."""
    import numpy as np

    arr = torch.from_numpy(np.asarray(pil.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0)
    return arr.permute(2, 0, 1)


def _write_heatmap(path, model, inputs, images, video, stats) -> None:
    from .heatmap import render_regions, token_layout, write_png

    regions = token_layout(model, {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()})
    pictures = {("image", i, 0): _picture(im) for i, im in enumerate(images)}
    frames = video or []
    for r in regions:
        if r.view == "video":
            # A Qwen frame covers temporal_patch_size input frames: show the first of them.
            step = max(1, len(frames) // max(1, sum(1 for x in regions if x.view == "video")))
            pictures[("video", r.image, r.frame)] = _picture(frames[min(r.frame * step, len(frames) - 1)])
    write_png(path, render_regions(pictures, regions, stats.kept_positions))
    print(f"wrote {path}", file=sys.stderr)


def cmd_run(args) -> int:
    import tokencomp

    recipe = tokencomp.load_recipe(args.recipe)
    images = _load_images(args.image)
    video = None
    if args.video:
        frames = sorted(p for p in Path(args.video).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not frames:
            print(f"error: no .png/.jpg frames in {args.video}", file=sys.stderr)
            return 1
        video = _load_images(frames)
    _, answer, stats = _generate_real(
        args.model, recipe, images, args.prompt, args.max_new_tokens, args.attn, video=video, heatmap=args.heatmap
    )
    print(answer)
    print(json.dumps(stats.as_dict()["average_vision_tokens"]), file=sys.stderr)
    print(f"vision tokens per layer: {stats.vision_tokens_per_layer}", file=sys.stderr)
    return 0
