"""Message content given as a list of parts (images, videos, text), as the saved Jinja of a vision-language template
takes it from processors, vLLM and the OpenAI API, against the real Qwen2-VL and Qwen2.5-VL tokenizers' own chat
templates.

    .venv/bin/python -m pytest tests/data/test_template_media.py -q

The reference is always the tokenizer's own chat template (../shared/tokenizers, see SOURCES.md), rendered by
transformers' `apply_chat_template`; ours is rendered by the same machinery, given as `chat_template`, or saved with
the tokenizer by `prepare_tokenizer` and loaded back as a serving engine loads it. Text conversations are compared
token for token in test_template_parity.py.
"""

import copy
from dataclasses import replace
from functools import cache

import pytest
from jinja2.exceptions import TemplateError as JinjaError

from tunelab.config import load_config
from tunelab.data import TEMPLATES, get_template
from tunelab.data.media import VISION_FAMILIES
from helpers import TOKENIZERS

needs_tokenizers = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason="../shared/tokenizers is not present")
VL_FOLDERS = ["qwen2-vl-instruct", "qwen2.5-vl-instruct"]

IMAGE = {"type": "image"}
VIDEO = {"type": "video"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def media_parts(messages: list[dict]) -> int:
    return sum(not isinstance(m["content"], str) and "text" not in part for m in messages for part in m["content"])


#: name -> messages, every way a client writes parts: bare `type`, the file under its own key, `image_url` (OpenAI)
CONVERSATIONS = {
    "image then text": [{"role": "user", "content": [IMAGE, text("What is this?")]}],
    "text then image": [{"role": "user", "content": [text("Describe: "), {"type": "image", "image": "cat.jpg"}]}],
    "video": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, text("What happens?")]}],
    "several images": [{"role": "user", "content": [
        IMAGE, text("and "), {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}}, text(" and "),
        {"image": "c.jpg"}, text("\nWhich differ?")]}],
    "images and a video": [{"role": "user", "content": [VIDEO, IMAGE, text("Is the picture from the clip?")]}],
    "text strings only": [{"role": "user", "content": "Hi there."},
                          {"role": "assistant", "content": "Hello! How can I help?"},
                          {"role": "user", "content": "  Spaces stay \n"}],
    "text parts only": [{"role": "user", "content": [text("Hi"), text(" there.")]}],
    "system message": [{"role": "system", "content": "You describe pictures in one line."},
                       {"role": "user", "content": [IMAGE, text("What is this?")]}],
    "system as parts": [{"role": "system", "content": [text("You describe pictures.")]},
                        {"role": "user", "content": [IMAGE]}],
    "several turns": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [IMAGE, text("What is this?")]},
                      {"role": "assistant", "content": "A cat."},
                      {"role": "user", "content": [VIDEO, text("And in this clip?")]},
                      {"role": "assistant", "content": [text("The same cat, "), text("sleeping.")]},
                      {"role": "user", "content": "你好，还有吗？"}],
}


@cache
def tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / folder)


def qwen2_vl(tok):
    return get_template(load_config({"model_name_or_path": "m", "template": "qwen2_vl"}), tok)


def own(tok, messages, generation: bool, **kwargs) -> str:
    """The reference: the text the tokenizer's own chat template renders."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)


@needs_tokenizers
@pytest.mark.parametrize("folder", VL_FOLDERS)
@pytest.mark.parametrize("generation", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_qwen2_vl_jinja_renders_parts_as_the_own_template(folder, generation, name):
    tok = tokenizer(folder)
    messages = CONVERSATIONS[name]
    ours = own(tok, messages, generation, chat_template=qwen2_vl(tok).jinja)
    assert ours == own(tok, messages, generation)
    assert ours.count("<|vision_start|>") == media_parts(messages)  # every part was written, none dropped


@needs_tokenizers
def test_saved_tokenizer_renders_parts_as_the_own_template(tmp_path):
    """The exported path: the chat_template.jinja a run saves, loaded back as a serving engine loads the folder."""
    from transformers import AutoTokenizer

    tok = copy.deepcopy(tokenizer("qwen2-vl-instruct"))
    qwen2_vl(tok).prepare_tokenizer(tok)
    tok.save_pretrained(tmp_path)
    served = AutoTokenizer.from_pretrained(tmp_path)
    assert served.chat_template == qwen2_vl(tok).jinja  # ours, not the own template carried along
    for messages in CONVERSATIONS.values():
        for generation in (True, False):
            assert own(served, messages, generation) == own(tokenizer("qwen2-vl-instruct"), messages, generation)


def test_markup_is_the_data_layers_vision_block():
    """What training text holds for an image (the data layer's block, its pad once per vision token) is what the
    served prompt holds once the processor has repeated the markup's pad token: the two tables agree."""
    template = TEMPLATES["qwen2_vl"]
    for name in ("qwen2_vl", "qwen2_5_vl"):
        family = VISION_FAMILIES[name]
        assert template.image_markup == family.block(family.image_token, 1)
        assert template.video_markup == family.block(family.video_token, 1)


@needs_tokenizers
def test_parts_render_as_the_training_text_of_their_blocks():
    """The Python rendering (training) never gets parts: the data layer has put each file's vision block into the
    text (data/media; one pad token here, where it writes one per vision token). A conversation in parts renders as
    that training text."""
    tok = tokenizer("qwen2-vl-instruct")
    family = VISION_FAMILIES["qwen2_vl"]
    image, video = family.block(family.image_token, 1), family.block(family.video_token, 1)
    parts = [{"role": "system", "content": [text("Be brief.")]},
             {"role": "user", "content": [IMAGE, text("What is this?")]},
             {"role": "assistant", "content": "A cat."},
             {"role": "user", "content": [VIDEO, IMAGE, text("And here?")]},
             {"role": "assistant", "content": [text("The same cat.")]}]
    trained = [{"role": "user", "content": image + "What is this?"},
               {"role": "assistant", "content": "A cat."},
               {"role": "user", "content": video + image + "And here?"},
               {"role": "assistant", "content": "The same cat."}]
    template = qwen2_vl(tok)
    pieces = template.render_pieces(tok, trained, "Be brief.", None)
    assert "".join(pieces) == own(tok, parts, False, chat_template=template.jinja)
    assert "".join(pieces[:-1]) == own(tok, parts[:-1], True, chat_template=template.jinja)


@needs_tokenizers
def test_parts_it_cannot_write_fail_loudly():
    tok = tokenizer("qwen2-vl-instruct")
    messages = CONVERSATIONS["images and a video"]
    # Qwen2-VL's own template numbers the files ("Picture 1: ") when asked; ours refuses rather than ignore it.
    assert "Picture 1: " in own(tok, messages, True, add_vision_id=True)
    with pytest.raises(JinjaError, match="does not number images"):
        own(tok, messages, True, chat_template=qwen2_vl(tok).jinja, add_vision_id=True)
    images_only = replace(TEMPLATES["qwen2_vl"], name="images_only", video_markup="")
    assert own(tok, CONVERSATIONS["several images"], True, chat_template=images_only.jinja) == \
        own(tok, CONVERSATIONS["several images"], True)
    with pytest.raises(JinjaError, match="template images_only takes no video"):
        own(tok, messages, True, chat_template=images_only.jinja)


def test_vllm_sees_a_template_that_takes_parts():
    # vLLM decides a template takes parts ("openai" content format) when a loop reads `message['content']`; otherwise
    # it flattens the parts to text its own way (newlines between them) before rendering.
    assert "{%- for part in message['content'] -%}" in TEMPLATES["qwen2_vl"].jinja


@pytest.mark.parametrize("name", [name for name, t in TEMPLATES.items() if not (t.image_markup or t.video_markup)])
def test_text_only_templates_are_unchanged(name):
    """Rows without media markup keep the Jinja and the recorded definition they had before parts existed (string
    content; their rendering is compared with Python in test_templates.py), so tokenizers trained before still match
    their row."""
    template = TEMPLATES[name]
    assert "content_text" not in template.jinja
    assert not {"image_markup", "video_markup"} & set(template.definition())
