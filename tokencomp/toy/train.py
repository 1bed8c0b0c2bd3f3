"""Train the toy VLM from scratch on CPU: ``python -m tokencomp.toy.train [--steps N] [--out DIR]``.

Data is generated on the fly from the train split (scene seeds ``step * batch + i``); each sequence
is one image followed by all of its questions as a multi-turn chat (rendered by the processor's
chat template), and the language-model loss is on the answer tokens (the word and its ``</s>``)
only. A dense auxiliary loss (``--aux-weight``) on the last vision layer's patch tokens predicts
each patch's shape, colour and object centre: it plays the part of a pretrained vision encoder
(without it the decoder sat on the blind answer prior for 300+ steps); its heads are not saved.
``--init DIR --freeze-vision`` continues from a saved checkpoint with the vision tower frozen (no
auxiliary loss); ``--keep-best`` saves only when the validation accuracy improves.
Reproducible
from ``--seed`` (single thread). Saves ``save_pretrained`` model + processor into ``--out``
(fp16 weights by default, to keep the shipped folder small).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from . import build, scenes


N_AUX = (len(scenes.SHAPES) + 1, len(scenes.COLOURS) + 1, len(scenes.SHAPES) + 1)


def patch_labels(scene):
    """Dense auxiliary targets per vision patch: (shape, colour, shape-of-the-object-centred-here).

    0 means background / no object centre. They train the vision tower to see shapes and colours
    (a stand-in for a pretrained encoder); the heads are dropped before saving.
    """
    g = scenes.SIZE // build.PATCH
    c = build.PATCH // 2
    shape = np.zeros((g, g), np.int64)
    colour = np.zeros((g, g), np.int64)
    centre = np.zeros((g, g), np.int64)
    colours = list(scenes.COLOURS)
    for o, m in zip(scene.objects, scene.masks):
        hit = m[c :: build.PATCH, c :: build.PATCH]
        shape[hit] = scenes.SHAPES.index(o.shape) + 1
        colour[hit] = colours.index(o.colour) + 1
        centre[int(o.cy) // build.PATCH, int(o.cx) // build.PATCH] = scenes.SHAPES.index(o.shape) + 1
    return np.stack([shape.ravel(), colour.ravel(), centre.ravel()], -1)


def make_batch(processor, start: int, batch: int, seed: int):
    tok = processor.tokenizer
    ids, labels, images, aux = [], [], [], []
    answer_after = tok.convert_tokens_to_ids("ASSISTANT:")
    image_id = tok.convert_tokens_to_ids("<image>")
    n_img = (scenes.SIZE // build.PATCH) ** 2
    for i in range(batch):
        sd = seed * 100_003 + start + i
        scene = scenes.make_scene(sd)
        qs = scenes.scene_questions(scene, np.random.default_rng([sd, 1]))
        text = build.render(processor, [(q[1], q[2]) for q in qs])
        x = tok(text)["input_ids"]
        # expand the image placeholder exactly as LlavaProcessor does
        k = x.index(image_id)
        x = x[:k] + [image_id] * n_img + x[k + 1 :]
        y = [-100] * len(x)
        for j in range(1, len(x)):
            if x[j - 1] == answer_after or (j >= 2 and x[j - 2] == answer_after):
                y[j] = x[j]  # the answer word and the </s> after it
        ids.append(x)
        labels.append(y)
        images.append(scene.image)
        aux.append(patch_labels(scene))
    L = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.full((batch, L), pad)
    lab = torch.full((batch, L), -100)
    att = torch.zeros((batch, L), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return input_ids, att, build.pixel_values(images), lab, torch.from_numpy(np.stack(aux))


@torch.no_grad()
def quick_eval(model, processor, questions) -> float:
    """Fraction of `questions` whose first answer token (argmax) is right: one forward, no generate."""
    from .harness import encode

    model.eval()
    right = 0
    for k in range(0, len(questions), 25):
        chunk = questions[k : k + 25]
        enc = encode(processor, chunk)
        logits = model(**enc).logits[:, -1]
        pred = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        right += sum(p == q.answer for p, q in zip(pred, chunk))
    model.train()
    return right / len(questions)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the dense patch loss on the vision tower")
    ap.add_argument("--init", default=None, help="continue from this saved checkpoint instead of random weights")
    ap.add_argument("--data-offset", type=int, default=0, help="first train scene index (use fresh scenes when continuing)")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="freeze the vision tower (after its auxiliary pre-training, e.g. with --init) and skip the aux loss")
    ap.add_argument("--keep-best", action="store_true", help="save only when the validation accuracy improves")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--out", default="tokencomp/toy/checkpoint")
    ap.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    processor = build.build_processor()
    if args.init:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.init, dtype=torch.float32, attn_implementation="sdpa")
    else:
        model = build.build_model(processor.tokenizer, seed=args.seed)
    model.train()
    if args.freeze_vision:
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
        args.aux_weight = 0.0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M", flush=True)
    vis_dim = model.config.vision_config.hidden_size
    aux_heads = torch.nn.ModuleList(torch.nn.Linear(vis_dim, k) for k in N_AUX)
    captured = {}
    last_vision_layer = model.model.vision_tower.encoder.layers[-1]
    last_vision_layer.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    params = [(n, p) for n, p in list(model.named_parameters()) + list(aux_heads.named_parameters()) if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    held = scenes.make_questions("test", 200, seed=1)  # validation: test split, other seed than the tests'
    t0 = time.time()
    run_loss = None
    best = -1.0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        input_ids, att, pix, lab, aux = make_batch(processor, args.data_offset + step * args.batch, args.batch, args.seed)
        logits = model(input_ids=input_ids, attention_mask=att, pixel_values=pix).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten())
        h = captured["h"][:, 1:]  # patch tokens of the last vision layer (what LLaVA feeds the projector)
        if args.aux_weight:
            aux_loss = sum(
                torch.nn.functional.cross_entropy(head(h).flatten(0, 1), aux[..., k].flatten()) for k, head in enumerate(aux_heads)
            )
        else:
            aux_loss = torch.zeros(())
        lm_loss = loss
        loss = lm_loss + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss = lm_loss.item() if run_loss is None else 0.95 * run_loss + 0.05 * lm_loss.item()
        run_aux = aux_loss.item() if step == 0 else 0.95 * run_aux + 0.05 * aux_loss.item()
        if step % 20 == 0:
            print(f"step {step} loss {run_loss:.4f} aux {run_aux:.3f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = quick_eval(model, processor, held)
            print(f"step {step + 1} val_acc {acc:.3f} {time.time() - t0:.0f}s", flush=True)
            if not args.keep_best or acc > best:
                best = max(best, acc)
                save(model, processor, args.out, args.fp32)
                print(f"saved step {step + 1} to {args.out}", flush=True)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


def save(model, processor, out, fp32=False):
    if fp32:
        model.save_pretrained(out)
    else:
        state = {k: v.detach().half() for k, v in model.state_dict().items()}
        model.save_pretrained(out, state_dict=state)
        import json, os

        path = os.path.join(out, "config.json")
        cfg = json.load(open(path))
        cfg["dtype"] = "float16"
        json.dump(cfg, open(path, "w"), indent=2)
    processor.save_pretrained(out)


if __name__ == "__main__":
    main()
