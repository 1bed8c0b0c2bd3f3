"""Construction of the toy VLM: word-level tokenizer, LlavaProcessor, LlavaForConditionalGeneration.

The prompt format lives in ONE place: :data:`CHAT_TEMPLATE`, saved with the processor (so
``processor.apply_chat_template`` renders it) and used by training through :func:`render`.

    USER: <image> what colour is the circle ? ASSISTANT: red </s> USER: ... ASSISTANT:
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from .scenes import SIZE, vocabulary

__all__ = ["PATCH", "SPECIALS", "CHAT_TEMPLATE", "build_tokenizer", "build_processor", "build_config",
           "build_model", "render", "pixel_values"]

PATCH = 6  #: 96 / 6 = 16 x 16 = 256 vision tokens per image
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.25, 0.25, 0.25]

# LLaVA-1.5 style conversation; one user turn may carry the image, assistant turns end with </s>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}"
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " </s> "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = SPECIALS + ["USER:", "ASSISTANT:"] + vocabulary()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    return fast


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


def build_config(tokenizer, *, hidden: int = 128, layers: int = 12, heads: int = 4,
                 intermediate: int = 320) -> transformers.LlavaConfig:
    vision = transformers.CLIPVisionConfig(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=PATCH,
        projection_dim=96,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(SIZE // PATCH) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    return cfg


def build_model(tokenizer, seed: int = 0, **kw) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = build_config(tokenizer, **kw)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def render(processor, turns, add_generation_prompt: bool = False) -> str:
    """The prompt text of `turns` = [(question, answer or None), ...] with the image in turn one."""
    messages = []
    for k, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def pixel_values(images) -> torch.Tensor:
    """Fast path of the processor's image pipeline for SIZE x SIZE uint8 arrays (used in training).

    Equal to ``CLIPImageProcessor`` for images already at SIZE (resize and crop are no-ops);
    tests check the equality.
    """
    x = torch.from_numpy(np.stack(images)).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std
