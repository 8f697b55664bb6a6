"""`reply_logprobs` (the output head applied at the scored positions only, in chunks recomputed in the backward pass)
scores what whole logits score, with the same gradients, on a tiny Llama with Qwen's 151,936-word vocabulary: 27
positions per chunk there, so the rows below take several chunks. Tolerance 1e-5 (gradients: 1e-5 relative, or 1e-6
of the tensor's largest entry): the head multiplies fewer rows at a time, which changes only the float32 summation
order inside the matrix products."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from tunelab.data.processing import IGNORE_INDEX
from tunelab.training.logprobs import (head_token_logprobs, hidden_states_out, mean_reply_logits, reply_logprobs,
                                       sequence_logprobs, token_logprobs)

QWEN_VOCAB = 151_936


def rows(vocab: int) -> dict[str, torch.Tensor]:
    """4 rows of 48 tokens: prompts of different lengths (not scored), then replies; the last row left-padded."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (4, 48), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[3, :6] = 0
    labels = input_ids.clone()
    for row, prompt in enumerate((10, 20, 5, 30)):
        labels[row, :prompt] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tiny_llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def scored_with_whole_logits(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    sums, counts = sequence_logprobs(logits, batch["labels"])
    return sums, counts, mean_reply_logits(logits, batch["labels"])


def gradients(model, score) -> dict[str, torch.Tensor]:
    model.zero_grad()
    sums = score()[0]
    (sums * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method, tied", [("full", False), ("full", True), ("lora", False)])
def test_reply_logprobs_equal_whole_logits_with_the_same_gradients(method, tied):
    model = tiny_llama(tied)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = rows(QWEN_VOCAB)
    chunked, whole = reply_logprobs(model, batch), scored_with_whole_logits(model, batch)
    torch.testing.assert_close(chunked.sums, whole[0], rtol=1e-5, atol=1e-5)
    assert chunked.counts.tolist() == whole[1].tolist() == [38, 28, 43, 18]
    torch.testing.assert_close(chunked.mean_logits, whole[2], rtol=1e-5, atol=1e-6)
    expected = gradients(model, lambda: scored_with_whole_logits(model, batch))
    got = gradients(model, lambda: reply_logprobs(model, batch))
    assert got.keys() == expected.keys() and got
    for name in expected:
        # A tied head's gradient is summed with the embedding lookup's, in another order: noise near 1e-7 of its
        # largest entry.
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    # The head is back in its place afterwards.
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


def test_soft_capped_logits_keep_the_whole_logits_path():
    """Gemma 2 caps its logits (tanh): head(hidden) alone would score something else, so nothing is swapped."""
    config = Gemma2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config)
    with hidden_states_out(model) as head:
        assert head is None
    batch = rows(1000)
    torch.testing.assert_close(reply_logprobs(model, batch).sums, scored_with_whole_logits(model, batch)[0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logprobs_from_the_head_equal_whole_logits(temperature):
    """ppo and grpo score completions per token at the sampling temperature: `head_token_logprobs` gives
    token_logprobs(logits / temperature) with the same gradients."""
    model = get_peft_model(tiny_llama(False), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = rows(QWEN_VOCAB)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    weights = torch.randn(batch["labels"].shape, generator=torch.Generator().manual_seed(1))

    def whole():
        return token_logprobs(model(**inputs, use_cache=False).logits / temperature, batch["labels"])

    def chunked():
        with hidden_states_out(model) as head:
            hidden = model(**inputs, use_cache=False).logits
        return head_token_logprobs(hidden, head, batch["labels"], temperature)

    torch.testing.assert_close(chunked(), whole(), rtol=1e-5, atol=1e-5)
    expected = gradients(model, lambda: ((whole() * weights).sum(dim=1),))
    got = gradients(model, lambda: ((chunked() * weights).sum(dim=1),))
    assert got.keys() == expected.keys() and got
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_per_token_logprobs_from_a_head_with_bias(autocast):
    """A Linear head with a bias, in float32 and under bfloat16 autocast (`bf16: true`), the last chunk of 27
    positions padded to a whole one there: the values and gradients of autograd through whole logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, QWEN_VOCAB)
    hidden = torch.randn(2, 90, 32, requires_grad=True)
    labels = torch.randint(0, QWEN_VOCAB, (2, 90))
    labels[0, :7] = IGNORE_INDEX
    weights = torch.randn(2, 90)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        chunked = head_token_logprobs(hidden, head, labels, 0.7)
        whole = token_logprobs(head(hidden).float() / 0.7, labels)
    # The backward pass outside autocast, as the Trainer runs it.
    got = torch.autograd.grad((chunked * weights).sum(), [hidden, *head.parameters()])
    expected = torch.autograd.grad((whole * weights).sum(), [hidden, *head.parameters()])
    tolerance = 1e-2 if autocast else 1e-5   # bfloat16 gradients of the logits, summed in other orders
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-4 if autocast else 1e-5)
    for name, g, e in zip(("hidden", "weight", "bias"), got, expected):
        torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance * float(e.abs().max()), msg=name)
    # Each position's gradient over the vocabulary sums to 0 (a softmax sums to 1), and so does the bias's, unless
    # the backward pass took its softmax from logits other than the forward's.
    assert abs(float(got[2].sum())) < 1e-5 * float(got[2].abs().sum())
