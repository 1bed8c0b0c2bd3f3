"""Tiny local checkpoints: folders that ``from_pretrained`` loads, built offline in seconds.

:func:`save_tiny_checkpoint` writes a complete Hugging Face checkpoint folder for one family of
:mod:`tokencomp.synthetic` — random-weight model, the family's real processor classes, a small BPE
tokenizer trained here on local text with the family's special tokens, and the family's chat
template — exactly as transformers saves it (``model.save_pretrained`` + ``processor.save_pretrained``).
The folder then stands in for a hub checkpoint wherever a *path* is needed::

    folder = save_tiny_checkpoint("llava", tmp_path / "tiny-llava")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=4)

The model uses :func:`tokencomp.synthetic.tiny_config` (same decoder and vision shapes, same token
counts per image) except for the vocabulary, which is the tokenizer's: ``vocab_size``,
``image_token_id`` / ``video_token_id``, Qwen's vision start/end ids and pad/bos/eos ids in the
configs are the tokenizer's ids of those tokens.

Families: ``llava`` (LLaVA-1.5: ``LlavaProcessor`` + ``CLIPImageProcessor``, Vicuna ``USER: ...
ASSISTANT:`` template), ``llava_next`` (LLaVA-NeXT: ``LlavaNextProcessor`` + anyres
``LlavaNextImageProcessor``, the Mistral-7B ``[INST] ... [/INST]`` template of
llava-v1.6-mistral-7b-hf), ``llava_onevision`` (``LlavaOnevisionProcessor`` with image and video
processors, ChatML template) and the Qwen families ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``
(their processors, Qwen chat templates). In transformers 5 the processors of OneVision and of the
Qwen families require a video processor, and video processors require torchvision: without a
working torchvision (PyPI's CUDA wheel cannot load next to a CPU torch) those families raise
:class:`tokencomp.UnsupportedModelError` saying what to install (:data:`NEEDS_TORCHVISION`).

``template_file`` chooses the chat-template layout: ``"jinja"`` (``chat_template.jinja``, what
transformers 5 writes) or ``"json"`` (the legacy ``chat_template.json`` of checkpoints saved by
transformers 4, e.g. most ``llava-hf/*`` repositories); both load the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import UnsupportedModelError, UsageError
from . import qwen_vl
from .common import MAX_POS, attn_map
from .tiny import FAMILY_SPECS, tiny_config

__all__ = ["save_tiny_checkpoint", "CHAT_TEMPLATES", "CHECKPOINT_FAMILIES", "NEEDS_TORCHVISION"]

#: Families :func:`save_tiny_checkpoint` can write: every tiny family.
CHECKPOINT_FAMILIES = tuple(FAMILY_SPECS)

#: Families whose processor cannot be built (nor loaded by ``AutoProcessor``) without torchvision:
#: transformers 5's video processors need it, and the processors of families that take video require one.
NEEDS_TORCHVISION = tuple(name for name, spec in FAMILY_SPECS.items() if spec.layout.video)

# ------------------------------------------------------------------------------------------------
# chat templates: those shipped with the public checkpoints of each family (content as a list of
# {"type": "image"|"video"|"text"} parts, as the processors' apply_chat_template expects)
# ------------------------------------------------------------------------------------------------

_LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-*-hf
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_LLAVA_NEXT_TEMPLATE = (  # llava-hf/llava-v1.6-mistral-7b-hf
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ ' ' + content['text'] + '</s>' }}{% endgeneration %}{% endfor %}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

_ONEVISION_TEMPLATE = (  # llava-hf/llava-onevision-qwen2-*-ov-hf
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_QWEN_TEMPLATE = (  # Qwen/Qwen2-VL-*-Instruct, Qwen/Qwen2.5-VL-*-Instruct
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN3_TEMPLATE = (  # Qwen/Qwen3-VL-*-Instruct (no default system prompt; string or list content)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The chat template written into each family's checkpoint.
CHAT_TEMPLATES = {
    "llava": _LLAVA_TEMPLATE,
    "llava_next": _LLAVA_NEXT_TEMPLATE,
    "llava_onevision": _ONEVISION_TEMPLATE,
    "qwen2_vl": _QWEN_TEMPLATE,
    "qwen2_5_vl": _QWEN_TEMPLATE,
    "qwen3_vl": _QWEN3_TEMPLATE,
}

# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------

# Special tokens per family, in id order: pad, bos, eos, image, video, vision start, vision end
# take ids 0..6 (the tiny models' PAD_ID..VISION_END_ID); None keeps the slot with a filler token.
_LLAMA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<video>", "<vision_start>", "<vision_end>", "<unk>"]
_CHATML_SPECIALS = ["<|endoftext|>", "<|bos|>", "<|im_end|>", "<image>", "<video>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>"]
_QWEN_SPECIALS = [
    "<|endoftext|>", "<|bos|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>",
]

# Local training text: the kind of prompts and answers evaluation benchmarks use.
_CORPUS = """\
What is shown in this image? Answer the question using a single word or phrase.
Is there a cat in the image? Please answer yes or no. Yes. No.
Which of the following options is correct? A. red B. green C. blue D. yellow
Answer with the option's letter from the given choices directly.
Describe the picture in detail. The photo shows a dog on a green field under a blue sky.
How many people are there in the picture? One, two, three, four, five, six, seven, eight, nine, ten.
What color is the car? The car is red. What is the man holding? He is holding an umbrella.
Where is the woman sitting? She is sitting on a bench in the park next to the river.
What does the sign say? The sign says stop. What time is it on the clock? It is three o'clock.
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: ASSISTANT: user assistant system You are a helpful assistant.
Please look at the video and answer: what happens first, and what happens next?
0 1 2 3 4 5 6 7 8 9 10 100 2024 3.5 (a) (b) (c) (d) "quoted" [brackets] {braces} <tags> #hash @at 50%
"""


def _train_tokenizer(specials: list[str], vocab_size: int, bos: str | None):
    """A byte-level BPE trained on :data:`_CORPUS`, special tokens first (ids 0..len(specials)-1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    if bos is not None:  # Llama-style: every encoded text starts with <s>
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _tokenizer(family: str, vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    if family in ("llava", "llava_next"):
        specials, bos, named = _LLAMA_SPECIALS, "<s>", {"image_token": "<image>"}
        kwargs = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    elif family == "llava_onevision":
        specials, bos, named = _CHATML_SPECIALS, None, {"image_token": "<image>", "video_token": "<video>"}
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:
        specials, bos, named = _QWEN_SPECIALS, None, {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        }
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(specials, vocab_size, bos),
        extra_special_tokens=named,
        model_max_length=MAX_POS,
        padding_side="left",  # batched generation (the processors' callers may switch)
        **kwargs,
    )
    # The named tokens are special already (trained as special tokens); make sure nothing splits them.
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in tok.all_special_tokens]},
                           replace_extra_special_tokens=False)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    # tokenizers assigns special tokens the first ids, in order; the configs rely on it.
    assert [ids[s] for s in specials] == list(range(len(specials))), f"special tokens got unexpected ids: {ids}"
    return tok, specials


# ------------------------------------------------------------------------------------------------
# processors
# ------------------------------------------------------------------------------------------------


def _torchvision_error(family: str) -> str | None:
    """Why the family's processor cannot be built here (None when it can)."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA wheel failing next to a CPU torch
        return (
            f"save_tiny_checkpoint({family!r}): the {family} processor (its video processor) needs torchvision, "
            f"which does not import here ({type(exc).__name__}: {exc}). Install the torchvision build that matches "
            f"torch {torch.__version__} (CPU: pip install torchvision --index-url https://download.pytorch.org/whl/cpu)."
        )
    return None


def _processor(family: str, cfg, tokenizer, template: str):
    import transformers as tf

    vis = cfg.vision_config
    if family == "llava":
        side = vis.image_size
        return tf.LlavaProcessor(
            image_processor=tf.CLIPImageProcessor(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side}
            ),
            tokenizer=tokenizer,
            patch_size=vis.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS
            chat_template=template,
        )
    if family == "llava_next":
        tile = vis.image_size
        return tf.LlavaNextProcessor(
            image_processor=tf.LlavaNextImageProcessor(
                size={"shortest_edge": tile},
                crop_size={"height": tile, "width": tile},
                image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
            ),
            tokenizer=tokenizer,
            patch_size=vis.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if family == "llava_onevision":
        tile = vis.image_size
        video = tf.LlavaOnevisionVideoProcessor(size={"height": tile, "width": tile})
        return tf.LlavaOnevisionProcessor(
            image_processor=tf.LlavaOnevisionImageProcessor(
                size={"height": tile, "width": tile},
                image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
            ),
            tokenizer=tokenizer,
            video_processor=video,
            num_image_tokens=(tile // vis.patch_size) ** 2,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio,
            chat_template=template,
        )
    # Qwen families (torchvision checked by the caller)
    unit = qwen_vl.PATCH * qwen_vl.MERGE
    common = dict(
        patch_size=qwen_vl.PATCH,
        temporal_patch_size=qwen_vl.TEMPORAL,
        merge_size=qwen_vl.MERGE,
    )
    # Small images (up to 8x16 merged tokens) so a forward stays cheap; at least one merged token.
    pixels = dict(min_pixels=unit * unit, max_pixels=unit * unit * 128)
    if family == "qwen3_vl":
        size = {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}
        image = tf.Qwen2VLImageProcessor(size=size, **common)  # Qwen3-VL's processor uses Qwen2-VL's image processor
        video = tf.Qwen3VLVideoProcessor(size=size, **common)
        return tf.Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=template)
    size = {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}
    image = tf.Qwen2VLImageProcessor(size=size, **common)
    video = tf.Qwen2VLVideoProcessor(size=size, **common)
    cls = tf.Qwen2VLProcessor if family == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    return cls(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=template)


# ------------------------------------------------------------------------------------------------
# the builder
# ------------------------------------------------------------------------------------------------

_VOCAB = 512  # BPE vocabulary (specials + 256 bytes + merges): a 512x64 embedding


def _config(family: str, tokenizer, specials: list[str], layers: int, attn: str):
    cfg = tiny_config(family, layers=layers, attn=attn)
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in specials}
    pad, bos, eos, image, video, vstart, vend = (ids[s] for s in specials[:7])
    has_bos = family in ("llava", "llava_next")
    vocab = len(tokenizer)
    text = cfg.get_text_config()
    text.vocab_size = vocab
    text.pad_token_id, text.eos_token_id = pad, eos
    text.bos_token_id = bos if has_bos else None
    if family in ("llava", "llava_next", "llava_onevision"):
        cfg.image_token_id = image  # also image_token_index (attribute map)
        if family == "llava_onevision":
            cfg.video_token_id = video
    else:
        cfg.image_token_id, cfg.video_token_id = image, video
        cfg.vision_start_token_id, cfg.vision_end_token_id = vstart, vend
    return cfg, dict(pad=pad, bos=bos if has_bos else None, eos=eos)


def save_tiny_checkpoint(
    family: str,
    folder,
    *,
    layers: int = 6,
    attn: str = "sdpa",
    seed: int = 0,
    init_std: float | None = 0.2,
    template_file: str = "jinja",
) -> str:
    """Write a loadable tiny checkpoint of `family` into `folder` (created if needed); return it as str.

    Args:
        family: one of :data:`tokencomp.synthetic.FAMILIES`.
        layers: text decoder layers (recipes must fit this depth).
        attn: attention implementation saved in the config ("eager", "sdpa", "flash_attention_2").
        seed: the weights depend only on it (global RNG untouched).
        init_std: re-draw every weight matrix from N(0, init_std) so that answers depend on the image
            and the prompt (the default init of a tiny model is nearly constant); None keeps the
            transformers init.
        template_file: ``"jinja"`` (chat_template.jinja, transformers 5's layout) or ``"json"``
            (the legacy chat_template.json of transformers-4-era checkpoints).

    Raises:
        UnsupportedModelError: a Qwen family without a working torchvision.
        UsageError: a bad argument.
    """
    if family not in CHECKPOINT_FAMILIES:
        raise UsageError(f"save_tiny_checkpoint: unknown family {family!r}; expected one of {', '.join(CHECKPOINT_FAMILIES)}")
    if template_file not in ("jinja", "json"):
        raise UsageError(f"save_tiny_checkpoint: template_file must be 'jinja' or 'json', got {template_file!r}")
    if family in NEEDS_TORCHVISION:
        why = _torchvision_error(family)
        if why is not None:
            raise UnsupportedModelError(why)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer, specials = _tokenizer(family, _VOCAB)
    template = CHAT_TEMPLATES[family]
    tokenizer.chat_template = template  # hub checkpoints carry it in tokenizer_config.json too
    try:
        cfg, ids = _config(family, tokenizer, specials, layers, attn)
    except ValueError as exc:
        raise UsageError(f"save_tiny_checkpoint: {exc}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FAMILY_SPECS[family].model_class._from_config(cfg, attn_implementation=attn_map(attn))
        if init_std is not None:
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim >= 2:
                        p.normal_(0.0, init_std)
    model.eval()
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = ids["pad"], ids["bos"], ids["eos"]
    processor = _processor(family, cfg, tokenizer, template)

    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if template_file == "json":
        jinja = folder / "chat_template.jinja"
        text = jinja.read_text(encoding="utf-8")
        jinja.unlink()
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": text}, indent=2) + "\n", encoding="utf-8")
    return os.fspath(folder)

