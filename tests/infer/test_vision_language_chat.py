"""A trained vision-language model after training: the chat engine, the API (image_url parts), the terminal chat,
the web chat and batch prediction all show it the picture, and it answers about that picture.

The `picture_adapter` fixture (conftest.py) trains a tiny Qwen2-VL LoRA to give each of two pictures its own answer
to the same question, so a reply is right only when the picture reached the model.
"""

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LF_DATA, PICTURE_ANSWERS, PICTURE_QUESTION
from PIL import Image

import tunelab
from tunelab.config import load_config
from tunelab.infer.backends import build_engine
from tunelab.infer.engine import RequestError

PICTURES = LF_DATA / "mllm_demo_data"


@pytest.fixture(scope="module")
def engine(picture_adapter):
    return build_engine(load_config(picture_adapter))


def ask(picture: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(PICTURES / picture)},
                                         {"type": "text", "text": PICTURE_QUESTION}]}]


@pytest.mark.parametrize("picture", sorted(PICTURE_ANSWERS))
def test_the_engine_answers_about_the_picture_it_is_shown(engine, picture):
    [reply] = engine.chat(ask(picture))
    assert reply.text == PICTURE_ANSWERS[picture]
    assert "".join(delta.text for delta in engine.stream(ask(picture))) == reply.text
    # LLaMA-Factory's way: the files beside the messages, a placeholder or none; a path or an image in memory.
    question = [{"role": "user", "content": PICTURE_QUESTION}]
    with Image.open(PICTURES / picture) as image:
        assert engine.chat(question, images=[image])[0].text == reply.text
    assert engine.chat([{"role": "user", "content": "<image>" + PICTURE_QUESTION}],
                       images=[str(PICTURES / picture)])[0].text == reply.text
    # The picture stays in the history: a second turn still sees it.
    follow_up = [*ask(picture), {"role": "assistant", "content": reply.text},
                 {"role": "user", "content": PICTURE_QUESTION}]
    assert engine.chat(follow_up)[0].prompt_tokens > reply.prompt_tokens


@pytest.mark.parametrize("text, call, message", [
    ("<image>Hi", dict(images=["/no/such/picture.png"]), r"/no/such/picture.png: the file does not exist"),
    ("<image>Hi", dict(images=[str(PICTURES / "1.jpg")] * 2), r"the messages hold 1 <image> but 2 images were given"),
    ("<image>Hi", {}, r"the messages hold 1 <image> but 0 images were given"),
    ("Hi", dict(videos=[str(LF_DATA / "mllm_demo.json")]), r"mllm_demo.json: "),
])
def test_media_the_engine_cannot_use_is_a_request_error(engine, text, call, message):
    if "videos" in call:
        pytest.importorskip("av")
    with pytest.raises(RequestError, match=message):
        engine.chat([{"role": "user", "content": text}], **call)


def test_a_text_only_model_refuses_pictures_by_name(tiny_model_dir):
    text_engine = build_engine(load_config({"model_name_or_path": str(tiny_model_dir), "template": "chatml"}))
    with pytest.raises(RequestError, match=r"the request has images, but the model .* is not a vision-language"):
        text_engine.chat(ask("1.jpg"))


def data_url(picture: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode((PICTURES / picture).read_bytes()).decode()


def image_request(url: str, role: str = "user") -> dict:
    return {"model": "pictures", "messages": [{"role": role, "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PICTURE_QUESTION}]}]}


@pytest.fixture(scope="module")
def api(engine):
    from fastapi.testclient import TestClient

    from tunelab.api.app import ApiSettings, create_app

    return TestClient(create_app(engine, ApiSettings(model_name="pictures", media_dir=PICTURES)))


def test_the_api_takes_data_urls_and_files_under_its_media_dir(api):
    for url, picture in ((data_url("1.jpg"), "1.jpg"), ((PICTURES / "2.jpg").as_uri(), "2.jpg")):
        response = api.post("/v1/chat/completions", json=image_request(url))
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == PICTURE_ANSWERS[picture]


@pytest.mark.parametrize("url, role, message", [
    ("https://example.com/cat.png", "user", "the server fetches no URLs; send the image as a base64 data URL"),
    ("file:///etc/passwd", "user", "/etc/passwd is outside the folder the server allows"),
    ((PICTURES / ".." / "dataset_info.json").as_uri(), "user", "is outside the folder the server allows"),
    ((PICTURES / "missing.jpg").as_uri(), "user", "missing.jpg does not exist"),
    ("data:image/png;base64,bm90IGFuIGltYWdl", "user", "the data URL holds no image PIL can decode"),
    ("data:image/png;base64,***", "user", "the data URL's payload is not valid base64"),
    ("data:text/plain,hello", "user", "expected a data URL of the form data:image/<type>;base64,<data>"),
    ("data:image/png;base64,AAAA", "system", "only user messages may hold images"),
])
def test_the_api_refuses_media_it_must_not_read_with_400(api, url, role, message):
    request = image_request(url, role)
    if role == "system":
        request["messages"].append({"role": "user", "content": "Hi"})
    response = api.post("/v1/chat/completions", json=request)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == "messages.0.content.0"


def test_without_a_media_dir_the_api_refuses_every_file_url(engine):
    from fastapi.testclient import TestClient

    from tunelab.api.app import ApiSettings, create_app

    client = TestClient(create_app(engine, ApiSettings(model_name="pictures")))
    response = client.post("/v1/chat/completions", json=image_request((PICTURES / "1.jpg").as_uri()))
    assert response.status_code == 400 and "start the server with API_MEDIA_DIR" in response.json()["error"]["message"]


def test_the_terminal_chat_attaches_a_picture_to_the_next_message(picture_adapter, tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text(json.dumps(picture_adapter))
    session = f"/image {PICTURES / '2.jpg'}\n{PICTURE_QUESTION}\n/image {tmp_path / 'none.png'}\nexit\n"
    result = subprocess.run([sys.executable, "-m", "tunelab", "chat", str(config)], input=session, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "`/image PATH`" in result.stdout
    assert f"Assistant: {PICTURE_ANSWERS['2.jpg']}" in result.stdout
    assert f"[not attached: {tmp_path / 'none.png'} is not a file]" in result.stdout


def test_the_web_chat_takes_uploaded_pictures(engine):
    pytest.importorskip("gradio")
    from tunelab.webui.chat import build_chat_page

    page = build_chat_page(engine)
    assert page.multimodal
    upload = {"text": PICTURE_QUESTION, "files": [str(PICTURES / "1.jpg")]}
    *_, reply = page.fn(upload, [], "", 12, 1.0, 1.0)
    assert reply == PICTURE_ANSWERS["1.jpg"]
    # A later turn: gradio hands the earlier picture back as a file part of the history.
    history = [{"role": "user", "content": [{"type": "file", "file": {"path": str(PICTURES / "2.jpg")}}]},
               {"role": "user", "content": [{"type": "text", "text": PICTURE_QUESTION}]},
               {"role": "assistant", "content": [{"type": "text", "text": PICTURE_ANSWERS["2.jpg"]}]}]
    *_, again = page.fn({"text": PICTURE_QUESTION, "files": []}, history, "", 12, 1.0, 1.0)
    assert isinstance(again, str) and again


def test_batch_prediction_shows_each_prompt_its_picture(picture_adapter, tmp_path):
    """Left-padded batches of prompts with different pictures and lengths predict what each prompt predicts alone."""
    data = json.loads((LF_DATA / "mllm_demo.json").read_text())[:2]
    folder = tmp_path / "data"
    folder.mkdir()
    trained_on = Path(picture_adapter["dataset_dir"])
    samples = json.loads((trained_on / "pictures.json").read_text())[:2] + data
    (folder / "eval.json").write_text(json.dumps(samples))
    info = json.loads((trained_on / "dataset_info.json").read_text())
    info = {"eval": {**info["pictures"], "file_name": "eval.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    predictions = {}
    for batch in (1, 4):
        out = tmp_path / f"batch{batch}"
        tunelab.train({**picture_adapter, "stage": "sft", "do_train": False, "do_predict": True,
                       "predict_with_generate": True, "eval_dataset": "eval", "dataset_dir": str(folder),
                       "media_dir": str(LF_DATA), "output_dir": str(out), "per_device_eval_batch_size": batch,
                       "report_to": "none"})
        predictions[batch] = [json.loads(line) for line in (out / "generated_predictions.jsonl").open()]
    assert [p["predict"] for p in predictions[1]] == [p["predict"] for p in predictions[4]]
    assert [p["predict"] for p in predictions[4][:2]] == list(PICTURE_ANSWERS.values())
    assert [p["prompt"].count("<|vision_start|>") for p in predictions[4]] == [len(s["images"]) for s in samples]


def test_the_export_answers_the_same_with_its_own_chat_template_in_plain_transformers(picture_adapter, tmp_path):
    """The merged folder, prompted by its saved chat template with an image part (as processors and vLLM prompt)
    and fed by its own image processor, gives the engine's answer."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    from tunelab.data.media import VISION_FAMILIES, fitted_size
    from tunelab.model.export import export_model

    folder = export_model(load_config({**picture_adapter, "export_dir": str(tmp_path / "merged")}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    # The size tunelab's image_max_pixels gave the picture in training (LLaMA-Factory's resize).
    with Image.open(PICTURES / "2.jpg") as image:
        picture = image.convert("RGB").resize(
            fitted_size(*image.size, picture_adapter["image_max_pixels"], 32 * 32, VISION_FAMILIES["qwen2_vl"]))
    pixels = processor(images=[picture], return_tensors="pt")
    tokens = int(pixels["image_grid_thw"].prod()) // processor.merge_size ** 2
    text = tokenizer.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": PICTURE_QUESTION}]}], tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * tokens)   # what the processor's expansion does
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                mm_token_type_ids=(input_ids == image_id).long(), do_sample=False, max_new_tokens=12,
                                **pixels)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert answer == PICTURE_ANSWERS["2.jpg"]


def test_the_api_takes_a_video_by_file_url_only(api):
    pytest.importorskip("av")
    video = PICTURES / "1.mp4"
    request = {"model": "pictures", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video.as_uri()}}, {"type": "text", "text": "What happens?"}]}],
        "max_tokens": 2}
    response = api.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > 20   # the video's tokens are in the prompt
    request["messages"][0]["content"][0]["video_url"]["url"] = data_url("1.jpg")
    response = api.post("/v1/chat/completions", json=request)
    assert response.status_code == 400 and "a video must be a file:// URL" in response.json()["error"]["message"]
