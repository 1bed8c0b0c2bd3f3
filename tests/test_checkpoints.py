"""tokencomp.checkpoints.save_tiny_checkpoint: folders the Auto classes load, offline, in seconds."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tokencomp
from tokencomp import testing as T
from tokencomp.synthetic.checkpoints import CHAT_TEMPLATES, NEEDS_TORCHVISION, save_tiny_checkpoint
from tokencomp.synthetic.llava import anyres_token_count

try:
    import torchvision  # noqa: F401

    HAVE_TORCHVISION = True
except Exception:  # missing, or PyPI's CUDA wheel next to a CPU torch
    HAVE_TORCHVISION = False

LAYERS = 4
RECIPE = {"schedule": {"stages": [{"layer": 1, "keep": 0.5}]}}


def _family_param(family):
    marks = []
    if family in NEEDS_TORCHVISION:
        marks.append(pytest.mark.skipif(not HAVE_TORCHVISION, reason=f"{family}'s processor needs torchvision"))
    return pytest.param(family, marks=marks)


FAMILIES = [_family_param(f) for f in T.FAMILIES]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made = {}

    def get(family, template_file="jinja"):
        key = (family, template_file)
        if key not in made:
            made[key] = save_tiny_checkpoint(
                family, tmp_path_factory.mktemp(f"{family}-{template_file}"), layers=LAYERS, template_file=template_file
            )
        return made[key]

    return get


def _load(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def _image(h=90, w=130, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _prompt(processor, text="What is shown in this image?"):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)


def _expected_image_tokens(model, size):
    family = model.config.model_type
    if family == "llava":
        return (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    if family in ("llava_next", "llava_onevision"):
        return anyres_token_count(model.config, size, False)[1]
    return None  # Qwen: the processor's smart_resize decides; the forward checks consistency


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_classes_load_and_generate(family, checkpoint):
    import transformers

    folder = checkpoint(family)
    model, processor = _load(folder)
    expected_model = type(T.build_tiny(family, layers=1))
    assert type(model) is expected_model
    assert type(processor).__name__ == {
        "llava": "LlavaProcessor",
        "llava_next": "LlavaNextProcessor",
        "llava_onevision": "LlavaOnevisionProcessor",
        "qwen2_vl": "Qwen2VLProcessor",
        "qwen2_5_vl": "Qwen2_5_VLProcessor",
        "qwen3_vl": "Qwen3VLProcessor",
    }[family]
    assert isinstance(processor.tokenizer, transformers.PreTrainedTokenizerFast)
    assert model.config.get_text_config().num_hidden_layers == LAYERS

    # vocabulary and special ids agree between tokenizer and config
    tok = processor.tokenizer
    cfg = model.config
    assert cfg.get_text_config().vocab_size == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert tok.convert_ids_to_tokens(cfg.image_token_id) == processor.image_token
    if getattr(cfg, "video_token_id", None) is not None:
        assert tok.convert_ids_to_tokens(cfg.video_token_id) == processor.video_token
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id

    # the family's chat template, on the processor and on the tokenizer (as hub checkpoints have it)
    assert processor.chat_template == CHAT_TEMPLATES[family] == tok.chat_template
    prompt = _prompt(processor)
    assert "What is shown in this image?" in prompt and processor.image_token in prompt

    size = (90, 130)
    inputs = processor(images=_image(*size), text=prompt, return_tensors="pt")
    n_image = int((inputs["input_ids"] == cfg.image_token_id).sum())
    assert n_image > 1
    if _expected_image_tokens(model, size) is not None:
        assert n_image == _expected_image_tokens(model, size)
    if family in ("llava", "llava_next"):
        assert inputs["input_ids"][0, 0] == tok.bos_token_id  # Llama-style tokenizer adds <s>

    with torch.no_grad():
        vanilla = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with tokencomp.apply(model, RECIPE) as handle:
            compressed = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            table = handle.stats.vision_tokens_per_layer
    assert vanilla.shape[1] == compressed.shape[1] == inputs["input_ids"].shape[1] + 4
    assert table[0][0] == n_image and table[0][1] == n_image // 2
    assert isinstance(processor.batch_decode(vanilla[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0], str)


@pytest.mark.parametrize("family", [_family_param(f) for f in ("llava", "llava_next", "llava_onevision", "qwen2_vl")])
def test_padded_batch_matches_single(family, checkpoint):
    """Two prompts of different lengths and image sizes, left-padded: each row equals its lone run."""
    model, processor = _load(checkpoint(family))
    prompts = [_prompt(processor, "What?"), _prompt(processor, "Describe the picture in detail, please.")]
    images = [_image(90, 130, 0), _image(120, 100, 1)] if family != "llava" else [_image(seed=0), _image(seed=1)]
    assert processor.tokenizer.padding_side == "left"
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0  # really padded
    with torch.no_grad(), tokencomp.apply(model, RECIPE):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for i in range(2):
            one = processor(images=images[i], text=prompts[i], return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=3, do_sample=False)[:, one["input_ids"].shape[1]:]
            assert torch.equal(out[i], alone[0])


def test_files_as_transformers_saves_them(checkpoint):
    from pathlib import Path

    folder = Path(checkpoint("llava"))
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert "chat_template.json" not in names
    assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATES["llava"]
    proc = json.loads((folder / "processor_config.json").read_text())
    assert proc["processor_class"] == "LlavaProcessor"
    assert proc["image_processor"]["image_processor_type"] == "CLIPImageProcessor"


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_legacy_chat_template_json_layout(family, checkpoint):
    from pathlib import Path

    folder = Path(checkpoint(family, "json"))
    names = {p.name for p in folder.iterdir()}
    assert "chat_template.json" in names and "chat_template.jinja" not in names
    assert json.loads((folder / "chat_template.json").read_text())["chat_template"] == CHAT_TEMPLATES[family]
    _, processor = _load(folder)
    assert processor.chat_template == CHAT_TEMPLATES[family]
    _, ref = _load(checkpoint(family))
    assert _prompt(processor) == _prompt(ref)


def test_llava_templates_render_the_real_layouts(checkpoint):
    _, llava = _load(checkpoint("llava"))
    assert _prompt(llava, "Hi?") == "USER: <image>\nHi? ASSISTANT:"
    _, nxt = _load(checkpoint("llava_next"))
    assert _prompt(nxt, "Hi?") == "[INST] <image>\nHi? [/INST]"
    # string content renders no image: the reason integrations must build list content
    assert llava.apply_chat_template([{"role": "user", "content": "<image>\nHi?"}], add_generation_prompt=True) == "USER: ASSISTANT:"


def test_weights_depend_only_on_seed(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = save_tiny_checkpoint("llava", tmp_path / "a", layers=2, seed=3)
    assert torch.equal(torch.rand(1), before)  # global RNG untouched
    b = save_tiny_checkpoint("llava", tmp_path / "b", layers=2, seed=3)
    c = save_tiny_checkpoint("llava", tmp_path / "c", layers=2, seed=4)
    wa, wb, wc = (load_file(f"{d}/model.safetensors") for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.skipif(HAVE_TORCHVISION, reason="torchvision works here")
@pytest.mark.parametrize("family", NEEDS_TORCHVISION)
def test_families_needing_torchvision_say_so(family, tmp_path):
    with pytest.raises(tokencomp.UnsupportedModelError, match="needs torchvision.*pip install torchvision"):
        save_tiny_checkpoint(family, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(tokencomp.UsageError, match="unknown family"):
        save_tiny_checkpoint("llama", tmp_path)
    with pytest.raises(tokencomp.UsageError, match="template_file"):
        save_tiny_checkpoint("llava", tmp_path, template_file="yaml")
    with pytest.raises(ValueError, match="layers"):
        save_tiny_checkpoint("llava", tmp_path / "y", layers=0)


def test_reexported_from_testing():
    assert T.save_tiny_checkpoint is save_tiny_checkpoint
