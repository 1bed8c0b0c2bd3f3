"""Peak memory of the vision tower with and without tokencomp's [CLS]-attention probe (issue 11:
the signal must cost <= 1% extra). LLaVA-1.5's real CLIP ViT-L/14-336 shape, random weights, a tiny
text decoder; the tower runs exactly as in a prefill (``get_image_features``).

    python -m benchmarks.probe_memory [--images N] [--dtype float32|bfloat16] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import transformers

import tokencomp
from tokencomp.bench import PeakMemory


def build(dtype):
    vision = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14
    )
    text = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, vocab_size=1000)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=999, vision_feature_layer=-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = build(getattr(torch, args.dtype))
    pixels = torch.randn(args.images, 3, 336, 336, dtype=getattr(torch, args.dtype))
    recipe = {"schedule": {"stages": [{"phase": "input", "keep": 0.3334, "scorer": "cls_attention"}]}}
    dev = torch.device("cpu")

    def peak(hooked: bool) -> int:
        with torch.no_grad():
            handle = tokencomp.apply(model, recipe) if hooked else None
            try:
                model.model.get_image_features(pixel_values=pixels)  # warm-up
                with PeakMemory(dev) as mem:
                    model.model.get_image_features(pixel_values=pixels)
                return mem.peak
            finally:
                if handle is not None:
                    handle.remove()

    plain = [peak(False) for _ in range(args.rounds)]
    probed = [peak(True) for _ in range(args.rounds)]
    res = {
        "shape": "CLIP ViT-L/14-336 (24 layers, 1024 wide, 16 heads, 577 tokens)",
        "images": args.images,
        "dtype": args.dtype,
        "peak_bytes_untouched": plain,
        "peak_bytes_probed": probed,
        "ratio_median": statistics.median(probed) / statistics.median(plain),
    }
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
