"""The model side of vision-language fine-tuning on tiny random Qwen2-VL and Qwen2.5-VL models with their real
tokenizers and image processors: loading, what each method and the freeze_* keys train, a reward model's
scores, gradient checkpointing.

    .venv/bin/python -m pytest tests/model/test_vision_language.py -q      # about 70 s on 2 CPU cores

The batches (vl_inputs.py) are built from LLaMA-Factory's demo image, the model folder's own image processor and the
tokenizer (each image placeholder expanded to its patch count), independently of tunelab's data side. What the
freeze_* keys must leave trainable is recomputed with LLaMA-Factory's own rules (`misc.py`, `adapter.py`, `visual.py`:
substring matches on its registered module names), written out here.
"""

import hashlib

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from tunelab.config import ConfigError, load_config
from tunelab.model import count_parameters, load_model, load_tokenizer
from tunelab.model.loader import model_class
from tunelab.model.value_head import ValueHeadModel
from helpers import train_steps
from vl_inputs import image_batch

FAMILIES = ["tiny_qwen2_vl_dir", "tiny_qwen2_5_vl_dir"]
# LLaMA-Factory's registration of qwen2_vl and qwen2_5_vl (model_utils/visual.py), copied as data.
LF_TOWER, LF_PROJECTOR, LF_LANGUAGE = ["visual.patch_embed", "visual.blocks"], ["visual.merger"], ["language_model",
                                                                                                  "lm_head"]
LF_LORA_CONFLICT = ["patch_embed"]


@pytest.fixture(params=FAMILIES)
def vl_dir(request):
    return request.getfixturevalue(request.param)


def load(folder, trainable: bool = True, **keys):
    config = load_config({"model_name_or_path": str(folder), **keys})
    return load_model(config, load_tokenizer(config), trainable=trainable)


def fingerprints(model) -> dict[str, str]:
    """Each weight's bytes, hashed: equal fingerprints mean bit-identical weights."""
    return {name: hashlib.sha256(param.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, param in model.named_parameters()}


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def with_lora(model) -> set[str]:
    """The modules that carry a LoRA adapter, by their names in the base model."""
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if hasattr(module, "lora_A") and not name.endswith(("lora_A", "lora_B"))}


# --- LLaMA-Factory's rules, re-stated ---

def lf_forbidden(keys: dict) -> list[str]:
    """visual.py get_forbidden_modules."""
    return ((LF_TOWER if keys.get("freeze_vision_tower", True) else [])
            + (LF_PROJECTOR if keys.get("freeze_multi_modal_projector", True) else [])
            + (LF_LANGUAGE if keys.get("freeze_language_model", False) else []))


def lf_full(names: list[str], keys: dict) -> set[str]:
    """adapter.py _setup_full_tuning: every parameter whose name contains no forbidden key."""
    return {name for name in names if not any(key in name for key in lf_forbidden(keys))}


def lf_freeze(names: list[str], keys: dict, layers: list[int]) -> set[str]:
    """adapter.py _setup_freeze_tuning with freeze_trainable_modules: all."""
    wanted = [f".{index}." for index in layers]
    if not keys.get("freeze_multi_modal_projector", True):
        wanted += LF_PROJECTOR
    return {name for name in names
            if any(key in name for key in wanted) and not any(key in name for key in lf_forbidden(keys))}


def lf_lora(model, keys: dict) -> set[str]:
    """misc.py find_all_linear_modules, then visual.py patch_target_modules: the modules LoRA `all` adapts."""
    skipped = ["lm_head"] + LF_PROJECTOR + (LF_TOWER if keys.get("freeze_vision_tower", True) else [])
    suffixes = {name.split(".")[-1] for name, module in model.named_modules()
                if not any(key in name for key in skipped) and "Linear" in type(module).__name__}
    forbidden = lf_forbidden(keys) + LF_LORA_CONFLICT
    return {name for name, _ in model.named_modules()
            if any(suffix in name for suffix in suffixes) and not any(key in name for key in forbidden)}


# --- loading ---

def test_loads_as_an_image_text_model_which_the_causal_lm_class_refuses(vl_dir):
    model = load(vl_dir, trainable=False)
    assert type(model).__name__ in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    assert count_parameters(model) == (0, sum(p.numel() for p in model.parameters()))
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(vl_dir)


def test_remote_code_models_load_with_the_auto_class_they_register():
    from transformers import PretrainedConfig, Qwen2Config, Qwen2VLConfig

    assert model_class(Qwen2VLConfig()) is AutoModelForImageTextToText
    assert model_class(Qwen2Config()) is AutoModelForCausalLM
    # A remote-code model with a vision part that registers only the causal LM class (trust_remote_code).
    remote = PretrainedConfig(vision_config={"hidden_size": 8}, auto_map={"AutoModelForCausalLM": "m.Model"})
    assert model_class(remote) is AutoModelForCausalLM
    remote.auto_map["AutoModelForImageTextToText"] = "m.Model"
    assert model_class(remote) is AutoModelForImageTextToText


def test_eager_and_sdpa_attention_give_the_same_logits_on_an_image(vl_dir):
    batch = {k: v for k, v in image_batch(vl_dir).items() if k != "labels"}
    eager, sdpa = load(vl_dir, trainable=False, flash_attn="eager"), load(vl_dir, trainable=False, flash_attn="sdpa")
    assert eager.config.vision_config._attn_implementation == "eager"
    assert sdpa.config.vision_config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits, sdpa(**batch).logits, atol=1e-4, rtol=1e-4)


def test_rope_scaling_keeps_the_multimodal_rope_sections(tiny_qwen2_vl_dir):
    model = load(tiny_qwen2_vl_dir, trainable=False, rope_scaling="linear", cutoff_len=8192)
    rope = model.config.text_config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["mrope_section"]) == ("linear", 2.0, [2, 3, 3])
    with torch.no_grad():
        assert torch.isfinite(model(**image_batch(tiny_qwen2_vl_dir)).loss)


def test_bf16_lora_loads_the_base_in_bf16_and_trains_float32_adapters(tiny_qwen2_5_vl_dir):
    model = load(tiny_qwen2_5_vl_dir, finetuning_type="lora", bf16=True)
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    assert {dtypes[name] for name in trainable(model)} == {torch.float32}
    assert {dtype for name, dtype in dtypes.items() if "visual" in name} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**image_batch(tiny_qwen2_5_vl_dir)).loss
    loss.backward()
    assert torch.isfinite(loss)


# --- what trains ---

@pytest.mark.parametrize("method", ["full", "freeze", "lora", "oft"])
def test_each_method_learns_and_leaves_the_vision_parts_bit_identical(vl_dir, method):
    keys = {"finetuning_type": method, "freeze_trainable_layers": 1, "oft_block_size": 16}
    model = load(vl_dir, **keys)
    names = [name for name, _ in model.named_parameters()]
    if method == "full":
        assert trainable(model) == lf_full(names, keys)
    elif method == "freeze":
        assert trainable(model) == lf_freeze(names, keys, layers=[1])
    else:
        assert all("language_model.layers." in name for name in trainable(model))
    before = fingerprints(model)
    values = train_steps(model, image_batch(vl_dir), steps=5, lr=1e-3 if method == "full" else 1e-2)
    after = fingerprints(model)

    assert 9.0 < values[0] < 16.0, values  # about ln(151657) = 11.9 for a random model
    assert values[-1] < values[0] - 1.0, values
    frozen = set(names) - trainable(model)
    assert {name for name in frozen if before[name] != after[name]} == set()
    assert {name for name in trainable(model) if before[name] == after[name]} == set()
    assert any("visual.blocks" in name for name in frozen) and any("visual.merger" in name for name in frozen)


@pytest.mark.parametrize("keys", [{}, {"freeze_vision_tower": False}, {"freeze_language_model": True,
                                                                       "freeze_vision_tower": False}])
def test_lora_all_adapts_what_llamafactory_adapts_and_saves_no_frozen_tower_keys(vl_dir, keys, tmp_path):
    model = load(vl_dir, finetuning_type="lora", **keys)
    assert with_lora(model) == lf_lora(AutoModelForImageTextToText.from_pretrained(vl_dir), keys)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    in_tower = {name for name in saved if "visual" in name}
    assert bool(in_tower) == (keys.get("freeze_vision_tower") is False)
    assert not any("patch_embed" in name or "merger" in name for name in saved)
    assert any("language_model" in name for name in saved) != keys.get("freeze_language_model", False)


@pytest.mark.parametrize(("method", "keys", "trains"), [
    ("full", {"freeze_language_model": True, "freeze_vision_tower": False}, "tower"),
    ("full", {"freeze_language_model": True, "freeze_multi_modal_projector": False}, "projector"),
    ("freeze", {"freeze_language_model": True, "freeze_multi_modal_projector": False}, "projector"),
])
def test_freeze_language_model_leaves_only_what_llamafactory_leaves(vl_dir, method, keys, trains):
    model = load(vl_dir, finetuning_type=method, freeze_trainable_layers=1, **keys)
    names = [name for name, _ in model.named_parameters()]
    expected = lf_full(names, keys) if method == "full" else lf_freeze(names, keys, layers=[1])
    assert trainable(model) == expected
    assert all(("visual.merger" in name) == (trains == "projector") for name in expected)
    before = fingerprints(model)
    train_steps(model, image_batch(vl_dir), steps=1, lr=1e-3)
    changed = {name for name, value in fingerprints(model).items() if before[name] != value}
    assert changed == expected


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_all_three_parts_frozen_is_refused(tiny_qwen2_vl_dir, method):
    with pytest.raises(ConfigError, match="nothing left to train|no linear layer is left"):
        load(tiny_qwen2_vl_dir, finetuning_type=method, freeze_language_model=True)


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_freeze_vision_tower_false_makes_the_tower_train(tiny_qwen2_vl_dir, method):
    model = load(tiny_qwen2_vl_dir, finetuning_type=method, freeze_trainable_layers=1, freeze_vision_tower=False)
    before = fingerprints(model)
    # Two steps: LoRA B starts at zero, so A gets its first gradient in the second.
    train_steps(model, image_batch(tiny_qwen2_vl_dir), steps=2, lr=1e-3)
    changed = {name for name, value in fingerprints(model).items() if before[name] != value}
    tower = {name for name in before if ".visual.blocks." in name or ".visual.patch_embed." in name}
    # tunelab's choice for freeze (vision.py): the whole tower, where LLaMA-Factory's substring match trains the
    # tower blocks whose index equals a trained decoder layer's. LoRA adapts the blocks' linear layers only.
    expected = {name for name in tower if "lora_" in name} if method == "lora" else tower
    assert expected and changed & tower == expected
    assert not any("visual.merger" in name for name in changed)


def test_lora_with_an_unfrozen_projector_trains_it_in_full_beside_the_adapter(tiny_qwen2_vl_dir, tmp_path):
    model = load(tiny_qwen2_vl_dir, finetuning_type="lora", freeze_multi_modal_projector=False)
    merger = {name for name in trainable(model) if "visual.merger" in name}
    assert merger and all("modules_to_save" in name for name in merger)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {name for name in saved if "merger" in name} and not any("visual.blocks" in name for name in saved)


def test_explicit_lora_targets_skip_the_frozen_tower(tiny_qwen2_5_vl_dir):
    # Qwen2.5-VL's tower blocks have gate_proj, up_proj and down_proj, as the language model's layers do.
    model = load(tiny_qwen2_5_vl_dir, finetuning_type="lora", lora_target="gate_proj,down_proj")
    assert with_lora(model) and all("language_model.layers." in name for name in with_lora(model))


def test_a_text_model_warns_that_the_vision_keys_change_nothing(tiny_model_dir, caplog):
    model = load(tiny_model_dir, finetuning_type="full", freeze_language_model=True)
    assert trainable(model) == {name for name, _ in model.named_parameters()}
    assert "freeze_language_model: true" in caplog.text and "has no vision part" in caplog.text


# --- a reward model's scores ---

def test_a_value_head_scores_the_image_not_just_its_placeholder_tokens(vl_dir):
    scorer = ValueHeadModel(load(vl_dir, finetuning_type="lora", stage="rm"))
    inputs = [{k: v for k, v in image_batch(vl_dir, image).items() if k != "labels"} for image in ("1.jpg", "2.jpg")]
    with torch.no_grad():
        # Scores come from the model without its head; the full forward (with logits) is the reference.
        scores = [scorer(**batch).values for batch in inputs]
        reference = scorer(**inputs[0], return_logits=True).values
    torch.testing.assert_close(scores[0], reference, atol=1e-5, rtol=1e-5)
    assert (scores[0] - scores[1]).abs().max() > 1e-3, "another image must change the scores"


# --- gradient checkpointing ---

def test_gradient_checkpointing_gives_the_same_loss_and_gradients(vl_dir):
    batch = image_batch(vl_dir)
    results = []
    for disabled in (True, False):
        torch.manual_seed(0)  # the same random LoRA A matrices in both models
        model = load(vl_dir, finetuning_type="lora", freeze_vision_tower=False,
                     disable_gradient_checkpointing=disabled)
        checkpointed = {name for name, module in model.named_modules() if getattr(module, "gradient_checkpointing",
                                                                                    False)}
        for layers in ("visual.blocks.", "language_model.layers."):
            assert any(layers in name for name in checkpointed) != disabled
        model.train()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, plain_grads), (checkpointed_loss, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert any("visual.blocks" in name for name in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
