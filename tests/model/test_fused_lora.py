"""The fused LoRA forward (model/fused_lora.py) computes what peft's LoRA layers compute, with the same gradients,
and steps aside wherever it would not: adapters disabled (dpo's reference), dropout, a bias on lora_B."""

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.model.fused_lora import fuse_lora_layers


def lora_model(**lora) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, mlp_bias=True)
    # init_lora_weights=False: B is not zero, so the adapter changes the output and A gets gradients.
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False, **lora))


def forward_and_gradients(model, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    (logits * torch.linspace(-1, 1, 64)).sum().backward()   # the backward pass outside autocast, as the Trainer's
    return logits.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_layers_give_peft_outputs_and_gradients():
    peft_model = lora_model()
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_layers(fused) == 14   # q, k, v, o, gate, up, down in 2 layers
    expected_logits, expected = forward_and_gradients(peft_model, autocast=False)
    logits, got = forward_and_gradients(fused, autocast=False)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert got.keys() == expected.keys() and len(got) == 28
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5 * scale, msg=name)

    # Under bf16 autocast both round differently (the fused layer rounds base + adapter once, peft twice): each is
    # compared with float32, and the fused one must be as close to it as peft's.
    peft_logits, peft_grads = forward_and_gradients(peft_model, autocast=True)
    fused_logits, fused_grads = forward_and_gradients(fused, autocast=True)
    assert (fused_logits - expected_logits).abs().max() <= 1.5 * (peft_logits - expected_logits).abs().max()
    errors = {"fused": [], "peft": []}
    for name in expected:
        scale = float(expected[name].abs().max())
        for kind, grads in (("fused", fused_grads), ("peft", peft_grads)):
            errors[kind].append(float((grads[name] - expected[name]).abs().max()) / scale)
    assert max(errors["fused"]) < 0.1, errors
    assert sum(errors["fused"]) <= 1.5 * sum(errors["peft"]), errors


def test_fused_lora_steps_aside_where_peft_computes_otherwise():
    fused = lora_model()
    fuse_lora_layers(fused)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    base = copy.deepcopy(fused.get_base_model())
    for module in base.modules():   # the plain model: the adapters' layers as their base layers alone
        for name, child in module.named_children():
            if hasattr(child, "base_layer"):
                setattr(module, name, child.base_layer)
    with fused.disable_adapter():   # how dpo and ASFT score with the reference (the adapter off)
        torch.testing.assert_close(fused(input_ids=ids).logits, base(input_ids=ids).logits)
    assert not torch.allclose(fused(input_ids=ids).logits, base(input_ids=ids).logits)

    for lora in ({"lora_dropout": 0.5}, {"lora_bias": True}):
        plain = lora_model(**lora)
        fused = copy.deepcopy(plain)
        fuse_lora_layers(fused)
        torch.manual_seed(3)
        expected = plain(input_ids=ids).logits
        torch.manual_seed(3)
        torch.testing.assert_close(fused(input_ids=ids).logits, expected, rtol=0, atol=0, msg=str(lora))
