"""Train the toy VLM from scratch on CPU: ``python -m tokencomp.toy.train [--out DIR]``.

Two phases, reproducible from ``--seed`` (data are generated on the fly from the train split):

1. **Vision** (``--vision-steps``): the CLIP vision tower and the projector learn dense per-patch
   targets — the shape kind, colour and grid cell (row, column) of the object under each patch — through
   linear heads on the projector output. This plays the part of a pretrained encoder + projector
   (LLaVA's stage 1); the heads are discarded. Without it the decoder sat on the blind answer prior.
2. **Language** (``--steps``): vision tower and projector frozen, the Llama decoder learns to answer.
   Each sequence is one image followed by all of its questions as a multi-turn chat (rendered by the
   processor's chat template); the language-model loss is on the answer tokens (word and ``</s>``).
   ``--attention-weight`` adds a guidance loss: at ``--attention-layers``, head 0 of the ``ASSISTANT:``
   token (from which the answer is predicted) should put its attention over the image on the patches
   of the asked-about object(s) (the generator's ground-truth masks). It only shortens the long
   plateau before a from-scratch decoder learns to look things up (the previous, unguided run never
   left it in 700 steps); the saved model is a plain ``LlavaForConditionalGeneration`` and nothing
   of the guidance is used at inference.

``--init DIR --data-offset N`` continues the language phase from a saved checkpoint on fresh scenes.
The shipped checkpoint is three runs of at most an hour each on 2 CPU cores (numbers in
:mod:`tokencomp.toy`)::

    python -m tokencomp.toy.train --keep-best --out A
    python -m tokencomp.toy.train --init A --data-offset 100000 --steps 1100 --warmup 30 --lr 5e-4 --keep-best --out B
    python -m tokencomp.toy.train --init B --data-offset 200000 --steps 3000 --warmup 30 --lr 6e-4 \
        --keep-best --eval-every 250 --out C

Saves ``save_pretrained`` model + processor into ``--out`` (fp16 weights by default, small).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import build, scenes

GRID = scenes.SIZE // build.PATCH
N_IMAGE = GRID * GRID
#: classes of the dense vision targets: shape, colour, grid row, grid column of the object under the
#: patch (0 = background), and the patch's own row and column
N_AUX = (len(scenes.SHAPES) + 1, len(scenes.COLOURS) + 1, 4, 4, GRID, GRID)


def patch_mask(mask: np.ndarray) -> torch.Tensor:
    """(N_IMAGE,) bool: the vision patches whose centre pixel lies in the pixel `mask`."""
    c = build.PATCH // 2
    return torch.from_numpy(np.ascontiguousarray(mask[c :: build.PATCH, c :: build.PATCH]).reshape(-1))


def patch_labels(scene) -> np.ndarray:
    """(N_IMAGE, 6) dense vision targets: shape, colour, grid row, grid column of the object under
    each patch (0 for background), and the patch's own row and column (these make the position
    embeddings learn the layout: without them the object's grid cell stayed at chance in one run)."""
    out = np.zeros((6, N_IMAGE), np.int64)
    out[4], out[5] = np.divmod(np.arange(N_IMAGE), GRID)
    colours = list(scenes.COLOURS)
    for o, m in zip(scene.objects, scene.masks):
        hit = patch_mask(m).numpy()
        out[:4, hit] = np.array([scenes.SHAPES.index(o.shape) + 1, colours.index(o.colour) + 1, o.row + 1, o.col + 1])[:, None]
    return out.T


def _scene_seed(seed: int, index: int) -> int:
    return seed * 100_003 + index  # train split: seeds below the test offset


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected patch features exactly as LLaVA computes them (layer -1, CLS dropped, projector)."""
    hidden = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    return model.model.multi_modal_projector(hidden[:, 1:])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train_vision(model, args, log) -> None:
    """Phase 1: vision tower + projector on the dense patch targets."""
    heads = torch.nn.ModuleList(torch.nn.Linear(model.config.text_config.hidden_size, k) for k in N_AUX)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=args.vision_lr, weight_decay=0.01)
    for step in range(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vision_steps, args.vision_lr, 30)
        batch = [scenes.make_scene(_scene_seed(args.seed, 50_000_000 + step * args.vision_batch + i)) for i in range(args.vision_batch)]
        target = torch.from_numpy(np.stack([patch_labels(s) for s in batch]))
        feats = image_features(model, build.pixel_values([s.image for s in batch]))
        losses = [F.cross_entropy(h(feats).flatten(0, 1), target[..., k].flatten()) for k, h in enumerate(heads)]
        opt.zero_grad(set_to_none=True)
        sum(losses).backward()
        opt.step()
        if step % 50 == 0 or step + 1 == args.vision_steps:
            with torch.no_grad():
                on = target[..., 0] > 0
                acc = [(h(feats).argmax(-1) == target[..., k])[on].float().mean().item() for k, h in enumerate(heads)]
            log(f"vision step {step} loss {sum(losses).item():.3f} object-patch acc shape/colour/row/col/patch-row/patch-col "
                + " ".join(f"{a:.2f}" for a in acc))


def make_batch(processor, start: int, batch: int, seed: int):
    """Token ids, attention mask, pixels, answer labels and, per sample, (image start, positions of the
    ``ASSISTANT:`` tokens, patch masks of the asked-about objects) for the attention guidance."""
    tok = processor.tokenizer
    answer_after = tok.convert_tokens_to_ids("ASSISTANT:")
    image_id = tok.convert_tokens_to_ids("<image>")
    ids, labels, images, guide = [], [], [], []
    for i in range(batch):
        sd = _scene_seed(seed, start + i)
        scene = scenes.make_scene(sd)
        qs = scenes.scene_questions(scene, np.random.default_rng([sd, 1]))
        x = tok(build.render(processor, [(q[1], q[2]) for q in qs]))["input_ids"]
        k = x.index(image_id)
        x = x[:k] + [image_id] * N_IMAGE + x[k + 1 :]  # expand the placeholder as LlavaProcessor does
        y = [-100] * len(x)
        for j in range(1, len(x)):
            if x[j - 1] == answer_after or (j >= 2 and x[j - 2] == answer_after):
                y[j] = x[j]  # the answer word and the </s> after it
        asks = [j for j, t in enumerate(x) if t == answer_after]
        ids.append(x)
        labels.append(y)
        images.append(scene.image)
        guide.append((k, asks, [patch_mask(q[3]) for q in qs]))
    L = max(map(len, ids))
    input_ids = torch.full((batch, L), tok.pad_token_id)
    lab = torch.full((batch, L), -100)
    att = torch.zeros((batch, L), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):  # right padding: training only
        input_ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return input_ids, att, build.pixel_values(images), lab, guide


class AttentionGuide:
    """Captures the inputs of the guided decoder layers and scores head 0's attention over the image."""

    def __init__(self, model, layers):
        self.layers = {i: model.model.language_model.layers[i] for i in layers}
        self.inputs = {}
        self.hooks = [layer.register_forward_pre_hook(self._capture(i), with_kwargs=True) for i, layer in self.layers.items()]

    def _capture(self, i):
        def hook(module, args, kwargs):
            self.inputs[i] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], kwargs["position_embeddings"])
        return hook

    def loss(self, guide) -> torch.Tensor:
        """Mean over (layer, question) of -log(attention mass on the object's patches), the softmax
        taken over the image keys only."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        total, n = torch.zeros(()), 0
        for i, layer in self.layers.items():
            hidden, (cos, sin) = self.inputs[i]
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            B, L, _ = x.shape
            q = attn.q_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)[:, :1]
            k = attn.k_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)[:, :1]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            for b, (start, asks, masks) in enumerate(guide):
                keys = k[b, 0, start : start + N_IMAGE]
                for pos, m in zip(asks, masks):
                    if not m.any():
                        continue  # "is there a ...?" with no object of the shape: nothing to point at
                    logp = torch.log_softmax(q[b, 0, pos] @ keys.T * attn.scaling, -1)
                    total = total - torch.logsumexp(logp[m], 0)
                    n += 1
        return total / max(1, n)


@torch.no_grad()
def quick_eval(model, processor, questions) -> tuple[float, dict]:
    """(accuracy, per-kind accuracy): the first answer token (argmax) of one forward per question."""
    from .harness import encode

    model.eval()
    per = {}
    for k in range(0, len(questions), 25):
        chunk = questions[k : k + 25]
        logits = model(**encode(processor, chunk)).logits[:, -1]
        for p, q in zip(processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()), chunk):
            per.setdefault(q.kind, []).append(p == q.answer)
    model.train()
    return sum(map(sum, per.values())) / len(questions), {k: round(sum(v) / len(v), 2) for k, v in sorted(per.items())}


def train_language(model, processor, args, log) -> None:
    """Phase 2: the decoder (vision tower and projector frozen)."""
    for p in list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters()):
        p.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in params if p.ndim >= 2], "weight_decay": 0.05},
                             {"params": [p for n, p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    guide = AttentionGuide(model, args.attention_layers) if args.attention_weight else None
    held = scenes.make_questions("test", 200, seed=1)  # validation: test split, another seed than the tests'
    best, run = -1.0, None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        input_ids, att, pix, lab, where = make_batch(processor, args.data_offset + step * args.batch, args.batch, args.seed)
        logits = model(input_ids=input_ids, attention_mask=att, pixel_values=pix).logits
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten())
        g_loss = guide.loss(where) if guide else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (lm + args.attention_weight * g_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        run = (lm.item(), g_loss.item()) if run is None else (0.95 * run[0] + 0.05 * lm.item(), 0.95 * run[1] + 0.05 * g_loss.item())
        if step % 25 == 0:
            log(f"step {step} lm {run[0]:.4f} guide {run[1]:.3f} lr {lr_at(step, args.steps, args.lr, args.warmup):.2e}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc, per = quick_eval(model, processor, held)
            log(f"step {step + 1} val_acc {acc:.3f} {per}")
            if not args.keep_best or acc > best:
                best = max(best, acc)
                save(model, processor, args.out, args.fp32)
                log(f"saved step {step + 1} to {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vision-steps", type=int, default=400)
    ap.add_argument("--vision-batch", type=int, default=32)
    ap.add_argument("--vision-lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--attention-weight", type=float, default=0.5)
    ap.add_argument("--attention-layers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="continue the language phase from this saved checkpoint (no vision phase)")
    ap.add_argument("--data-offset", type=int, default=0, help="first train scene of the language phase (fresh scenes when continuing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--keep-best", action="store_true", help="save only when the validation accuracy improves")
    ap.add_argument("--out", default="tokencomp/toy/checkpoint")
    ap.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    # Adam's second moments and tiny gradients drift into subnormal floats, which x86 CPUs compute
    # ~100x slower: a run slowed from 2 s to 15 s per step by step 250 without this.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    processor = build.build_processor()
    if args.init:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.init, dtype=torch.float32, attn_implementation="sdpa")
        args.vision_steps = 0  # the checkpoint's vision tower and projector are already trained
    else:
        model = build.build_model(processor.tokenizer, seed=args.seed)
    model.train()
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    log(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    train_vision(model, args, log)
    train_language(model, processor, args, log)
    log("done")


def save(model, processor, out, fp32=False):
    """``save_pretrained`` model (fp16 unless `fp32`) and processor into `out`."""
    if fp32:
        model.save_pretrained(out)
    else:
        model.save_pretrained(out, state_dict={k: v.detach().half() for k, v in model.state_dict().items()})
        path = os.path.join(out, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["dtype"] = "float16"
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    processor.save_pretrained(out)


if __name__ == "__main__":
    main()
