"""``LlavaHf``'s prompts and generation, re-implemented for every batch size; quarantined here.

This module depends on lmms-eval internals that are not its API: the request layout
(``Instance.args`` = ``(context, gen_kwargs | continuation, doc_to_visual, doc_id, task, split)``),
``LlavaHf``'s attributes (``_image_processor``, ``chat_template``, ``task_dict``, ``cache_hook``,
``load_video``, ``max_frames_num``, ``eot_token_id``, ``use_cache``, ...), ``lmms_eval.utils.Collator``
and ``lmms_eval.models.simple.llava_hf``'s ``VICUNA_CHAT_TEMPLATE`` / ``DEFAULT_*_TOKEN``.

**Version guard.** It was written for lmms-eval 0.7.x (tested with 0.7.3). On any other version,
building the LLaVA class (:func:`batching_mixin`, called by ``model_class("llava_hf")``, i.e. the
start of ``--model tokencomp`` on a LLaVA checkpoint, before the model loads) raises a one-line
:class:`~tokencomp.UnsupportedModelError` naming the version found. There is no fallback to
``LlavaHf``'s own path with a warning, because that path refuses batch size > 1, loses the image
token with transformers-5 chat templates and cannot score ``loglikelihood`` (see the class): a run
would fail later or, worse, give numbers not comparable to a table made here. The Qwen bases do
not use this module and are not guarded.
"""

from __future__ import annotations

from importlib import metadata
from typing import Optional

import torch

from ...errors import UnsupportedModelError

__all__ = ["WRITTEN_FOR", "installed_version", "check_version", "batching_mixin", "LlavaHfBatching"]

WRITTEN_FOR = ("0.7",)
"""The lmms-eval ``major.minor`` versions whose internals this module was written against."""


def installed_version() -> str:
    """The installed lmms-eval's version (``"unknown"`` when it carries none)."""
    import lmms_eval

    version = getattr(lmms_eval, "__version__", None)  # 0.7.3 has none: its distribution's metadata
    if version is None:
        try:
            version = metadata.version("lmms-eval")
        except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
            version = "unknown"
    return str(version)


def check_version(version: Optional[str] = None) -> None:
    """Raise :class:`~tokencomp.UnsupportedModelError` unless lmms-eval ``version`` (default: the
    installed one) is one this module was written for."""
    version = version or installed_version()
    if ".".join(version.split(".")[:2]) not in WRITTEN_FOR:
        supported = ", ".join(f"{v}.x" for v in WRITTEN_FOR)
        raise UnsupportedModelError(
            f"tokencomp: --model tokencomp on LLaVA checkpoints re-implements lmms-eval {supported} internals "
            f"(LlavaHf batching); found lmms-eval {version}. Install lmms-eval=={WRITTEN_FOR[-1]}.*"
        )


def batching_mixin() -> type:
    """:class:`LlavaHfBatching`, after :func:`check_version`."""
    check_version()
    return LlavaHfBatching


class LlavaHfBatching:
    """Prompts and generation for ``LlavaHf`` (LLaVA-1.5 / NeXT / OneVision), at every batch size.

    **Prompts.** ``LlavaHf`` renders ``[{"role": "user", "content": "<image>\\n" + context}]`` with
    ``tokenizer.apply_chat_template``. Checkpoints saved by transformers 5 (``chat_template.jinja``)
    and the legacy ``chat_template.json`` ones both put the *processor's* template on the tokenizer
    too; that template expects ``content`` as a list of ``{"type": "image"}`` / ``{"type": "text"}``
    parts, so string content renders ``USER: ASSISTANT:`` and the image token is lost (the
    processor then fails with "Found total 0 <image> tokens and 1 images"). Here the template
    (``chat_template=`` argument, else the processor's, else the tokenizer's, else lmms-eval's
    Vicuna default) is probed once: a template that renders list content gets the visuals as
    ``image`` / ``video`` parts and the context (without ``<image>`` markers) as a text part,
    rendered by the processor; a string-content template (lmms-eval's Vicuna default, a custom
    one) gets ``LlavaHf``'s own string prompt.

    **Generation.** Image and text-only requests are batched (left padding; lmms-eval's
    ``LlavaHf`` asserts batch size 1), batch size 1 included, so that both go through the same
    prompts; video requests run one at a time like ``LlavaHf``'s. Generation settings are
    ``LlavaHf.generate_until``'s (which, like here, does not cut the answer at ``until``).
    """

    def _llava_template(self) -> tuple[str, bool]:
        """(template, takes list content)."""
        from jinja2 import TemplateError
        from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE

        template = (
            self.chat_template
            or getattr(self._image_processor, "chat_template", None)
            or getattr(self.tokenizer, "chat_template", None)
            or VICUNA_CHAT_TEMPLATE
        )
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default") or next(iter(template.values()))
        cache = getattr(self, "_tokencomp_template", None)
        if cache is None or cache[0] != template:
            probe = "tokencomp-probe-7f3a"
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe}]}],
                    chat_template=template, tokenize=False, add_generation_prompt=True,
                )
                takes_list = isinstance(text, str) and probe in text and "'type'" not in text
            except (TemplateError, TypeError, ValueError):  # a string-content template fails on a list
                takes_list = False
            cache = self._tokencomp_template = (template, takes_list)
        return cache

    def _llava_prompt(self, context: str, n_images: int, continuation: Optional[str] = None, video: bool = False) -> str:
        from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN

        template, takes_list = self._llava_template()
        marker = DEFAULT_VIDEO_TOKEN if video else DEFAULT_IMAGE_TOKEN
        if takes_list:
            text = context
            if n_images:
                text = "\n".join(line.strip() for line in context.replace(marker, "\n").split("\n")).strip("\n")
            parts = [{"type": "video" if video else "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
            messages = [{"role": "user", "content": parts}]
            if continuation is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": continuation}]})
        else:
            if n_images and (continuation is not None or marker not in context):
                context = " ".join([marker] * n_images) + "\n" + context
            messages = [{"role": "user", "content": context}]
            if continuation is not None:
                messages.append({"role": "assistant", "content": continuation})
        render = self._image_processor if takes_list else self.tokenizer
        return render.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=continuation is None
        )

    def loglikelihood(self, requests):
        """``LlavaHf.loglikelihood``'s result convention (mean continuation loss, greedy match) with
        the prompts above; lmms-eval 0.7.3's own cannot run on transformers 5 (it calls the processor
        on ``<image>`` text without images to measure the context length).

        Note: lmms-eval 0.7.3 (the newest release on PyPI) cannot score *any* model's
        ``loglikelihood`` / ``multiple_choice`` task through its evaluator: ``evaluator.py`` passes
        every response through ``api.instance.unwrap_generation_output``, which turns the
        ``(loglikelihood, is_greedy)`` tuple into its ``str()``, and the task's ``process_results``
        then fails on the string. No released lmms-eval fixes it yet; this method is tested directly.
        """
        from tqdm import tqdm

        res = []
        for req in tqdm(requests, disable=(self.rank != 0), desc="Model Responding"):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self.flatten([doc_to_visual(doc)])
            images = visuals or None
            ctx_len = self._image_processor(images=images, text=[self._llava_prompt(context, len(visuals))], return_tensors="pt")["input_ids"].shape[1]
            inputs = self._image_processor(images=images, text=[self._llava_prompt(context, len(visuals), continuation)], return_tensors="pt")
            inputs = inputs.to(self._device, self.model.dtype)
            ids = inputs["input_ids"]
            labels = ids.clone()
            labels[:, :ctx_len] = -100
            with torch.no_grad():  # not inference_mode: tokencomp's engine tracks tensor versions
                out = self.model(**inputs, labels=labels)
            greedy = out["logits"][:, ctx_len - 1 : -1].argmax(dim=-1)
            res.append((float(out["loss"].item()), bool((greedy == ids[:, ctx_len:]).all())))
        return res

    def _llava_generate(self, inputs, gen_kwargs: dict) -> list[str]:
        inputs = inputs.to(self._device, self.model.dtype)
        temperature = gen_kwargs.get("temperature", 0) or 0
        do_sample = temperature > 0
        cont = self.model.generate(
            **inputs,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=gen_kwargs.get("top_p"),
            num_beams=gen_kwargs.get("num_beams", 1),
            max_new_tokens=gen_kwargs.get("max_new_tokens", 1024),
            use_cache=self.use_cache,
            pad_token_id=self.eot_token_id,
            eos_token_id=self.eot_token_id,
        )
        return self.tokenizer.batch_decode(cont[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def generate_until(self, requests):
        import PIL.Image
        from lmms_eval import utils
        from tqdm import tqdm

        visuals_of = {}
        video_idx, image_idx = [], []
        for i, req in enumerate(requests):
            _, _, doc_to_visual, doc_id, task, split = req.args
            vis = self.flatten([doc_to_visual(self.task_dict[task][split][doc_id])])
            visuals_of[i] = vis
            (video_idx if any(not isinstance(v, PIL.Image.Image) for v in vis) else image_idx).append(i)
        out: list = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        for i in video_idx:  # one at a time, like LlavaHf
            context, gen_kwargs = requests[i].args[:2]
            gen_kwargs = dict(gen_kwargs)
            gen_kwargs.pop("until", None)
            try:
                videos = [self.load_video(visuals_of[i], self.max_frames_num)]
            except Exception as exc:  # noqa: BLE001 - as LlavaHf: any video that cannot be decoded gets an empty answer
                from loguru import logger

                logger.info(f"Error {exc} when loading video : {visuals_of[i]}")
                out[i] = ""
            else:
                text = self._llava_prompt(context, len(videos), video=True)
                out[i] = self._llava_generate(self._image_processor(videos=videos, text=text, return_tensors="pt"), gen_kwargs)[0]
            self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), out[i])
            pbar.update(1)
        if image_idx:
            items = [requests[i].args + (i,) for i in image_idx]
            collator = utils.Collator(items, lambda x: (-len(self.tok_encode(x[0])), x[0]), grouping=True)
            results = []
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                contexts, all_gen_kwargs, _, _, _, _, order = zip(*chunk)
                gen_kwargs = dict(all_gen_kwargs[0])
                gen_kwargs.pop("until", None)
                texts, images = [], []
                for ctx, i in zip(contexts, order):
                    vis = visuals_of[i]
                    texts.append(self._llava_prompt(ctx, len(vis)))
                    images.extend(vis)
                inputs = self._image_processor(images=images or None, text=texts, padding=True, return_tensors="pt")
                answers = self._llava_generate(inputs, gen_kwargs)
                for ctx, ans, gk in zip(contexts, answers, all_gen_kwargs):
                    results.append(ans)
                    self.cache_hook.add_partial("generate_until", (ctx, gk), ans)
                pbar.update(len(chunk))
            for i, ans in zip(image_idx, collator.get_original(results)):
                out[i] = ans
        pbar.close()
        return out
