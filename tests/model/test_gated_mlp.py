"""The gated MLP (model/gated_mlp.py) gives the outputs and gradients of the model's own, bit for bit, keeping one
[tokens, intermediate] tensor per layer less for the backward pass; MLPs of another shape or activation run as
they are."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tunelab.model.gated_mlp import fuse_gated_mlps

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def llama(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES))
    # init_lora_weights=False: B is not zero, so the adapters change the output and all get gradients.
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)) if lora \
        else model


def run(model: torch.nn.Module, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Logits, the gradients of the trained weights, and the bytes autograd keeps for the backward pass."""
    model.zero_grad()
    kept: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits.float()
    (logits * torch.linspace(-1, 1, 64)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_gated_mlps_give_the_same_outputs_and_gradients_in_less_memory(lora, autocast):
    model = llama(lora)
    fused = copy.deepcopy(model)
    assert fuse_gated_mlps(fused) == 2
    expected_logits, expected, expected_bytes = run(model, autocast)
    logits, got, kept_bytes = run(fused, autocast)
    assert torch.equal(logits, expected_logits)
    assert got.keys() == expected.keys() and got
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # silu(gate(x)) is no longer kept: 3 x 11 tokens x 48 wide, in each of the 2 layers.
    element = 2 if autocast else 4
    assert expected_bytes - kept_bytes == 2 * 3 * 11 * 48 * element


def test_only_silu_mlps_of_the_llama_shape_are_fused():
    assert fuse_gated_mlps(Qwen2ForCausalLM(Qwen2Config(**SIZES))) == 2     # its MLP copies Llama's forward
    # Gemma's MLP has Llama's forward but a GELU gate: left as it is.
    gemma = GemmaForCausalLM(GemmaConfig(**SIZES, head_dim=8))
    assert fuse_gated_mlps(gemma) == 0
    mlp = gemma.model.layers[0].mlp
    assert "forward" not in vars(mlp)


@pytest.mark.parametrize("method", ["lora", "full", "freeze"])
def test_a_model_loaded_for_training_runs_the_gated_mlps(tiny_model_dir, method):
    from tunelab.config import load_config
    from tunelab.model import load_model, load_tokenizer

    config = load_config({"model_name_or_path": str(tiny_model_dir), "finetuning_type": method})
    model = load_model(config, load_tokenizer(config), trainable=True)
    mlps = [module for name, module in model.named_modules() if name.endswith(".mlp")]
    assert mlps and all("forward" in vars(mlp) for mlp in mlps)
    # For inference the model's own forward stays.
    plain = load_model(config, load_tokenizer(config), trainable=False)
    assert not any("forward" in vars(module) for name, module in plain.named_modules() if name.endswith(".mlp"))
