"""The pieces the ppo and grpo stages share, on a tiny random model: sampling with stop tokens and left padding,
completion log-probabilities, the prompt stream, and every reward source behind one interface.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_rollout_rewards.py -q     # a few seconds

Golden values come from independent computations: each sequence alone through a plain forward and log_softmax, the
rm adapter loaded into a fresh model the usual peft way, scores recomputed from the texts the reward server got.
"""


import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import tunelab
from tunelab.config import ConfigError, load_config
from tunelab.model import load_model, load_tokenizer
from tunelab.model.value_head import ValueHeadModel, last_token_scores
from tunelab.training.rewards import (ApiReward, FunctionReward, RewardScorer, decode, load_reward_adapter,
                                      reward_functions)
from tunelab.training.rollout_types import (PromptStream, Rollout, completion_logprobs, completion_mask, generate,
                                            masked_whiten)
from helpers import REPO, make_rm_adapter, prompt_batch, reward_server

PROMPTS = ["Who are you?", "What is the capital of France? Answer in one word.", "Hi"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tokenizer


def sample(model, tokenizer, stop_ids: list[int], seed: int = 0, max_new_tokens: int = 12) -> Rollout:
    config = GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                              eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    torch.manual_seed(seed)
    return generate(model, *prompt_batch(tokenizer), config, chunk_size=2)


# ---- rollouts ----------------------------------------------------------------------------------------------------

def test_completion_mask_ends_at_the_first_stop_token():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [5, 3, 2, 9]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert completion_mask(ids, [2, 3]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


def test_generated_masks_cover_exactly_each_completion(tiny):
    model, tokenizer = tiny
    # A third of the vocabulary as stop tokens, so completions end at different lengths.
    stop_ids = list(range(0, len(tokenizer), 3))
    prompt_ids, prompt_mask = prompt_batch(tokenizer)
    rollout = sample(model, tokenizer, stop_ids)
    assert torch.equal(rollout.prompt_ids, prompt_ids) and torch.equal(rollout.prompt_mask, prompt_mask)
    lengths = rollout.completion_mask.sum(dim=1).tolist()
    assert len(set(lengths)) > 1 and max(lengths) == rollout.completion_ids.shape[1], lengths
    for ids, mask in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)
        # Every kept token but the last is an ordinary token; the last is a stop token unless the budget ran out.
        assert not any(i in stop_ids for i in ids[:n - 1])
        assert ids[n - 1] in stop_ids or n == 12
    assert model.training is False
    # input_ids/attention_mask are prompt + completion; positions count real tokens only.
    row = rollout.attention_mask[1].bool()
    assert rollout.position_ids[1][row].tolist() == list(range(int(row.sum())))


def test_generation_switches_to_eval_mode_and_back(tiny):
    model, tokenizer = tiny
    model.train()
    try:
        sample(model, tokenizer, [tokenizer.eos_token_id], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_completion_logprobs_equal_each_sequence_alone_through_log_softmax(tiny):
    model, tokenizer = tiny
    rollout = sample(model, tokenizer, list(range(0, len(tokenizer), 3)))
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=rollout.position_ids).logits
        kept = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                     position_ids=rollout.position_ids, logits_to_keep=rollout.completion_ids.shape[1] + 1).logits
    ours = completion_logprobs(logits, rollout)
    torch.testing.assert_close(completion_logprobs(kept, rollout), ours)
    hot = completion_logprobs(logits, rollout, temperature=2.0)
    for i in range(len(rollout)):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        completion = rollout.completion_ids[i][rollout.completion_mask[i].bool()]
        alone = torch.cat([prompt, completion]).unsqueeze(0)
        with torch.no_grad():
            row_logits = model(alone).logits[0, len(prompt) - 1:-1]
        for scale, got in ((1.0, ours), (2.0, hot)):
            expected = torch.log_softmax(row_logits / scale, dim=-1).gather(1, completion.unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(got[i, :len(completion)], expected, atol=1e-4, rtol=1e-4)
            assert torch.all(got[i, len(completion):] == 0)


def test_masked_whiten_uses_only_the_masked_values():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (kept - kept.mean()) / kept.std(unbiased=False)
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened[mask.bool()], expected, atol=1e-4, rtol=1e-4)
    assert torch.all(whitened[~mask.bool()] == 0)
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False)[mask.bool()], expected + kept.mean(),
                               atol=1e-4, rtol=1e-4)


def test_prompt_stream_splits_epochs_across_processes_and_wraps_full_rounds():
    dataset = [{"i": n} for n in range(10)]

    class Rows(list):
        def __getitem__(self, index):
            return [list.__getitem__(self, i)["i"] for i in index] if isinstance(index, list) else \
                list.__getitem__(self, index)

    streams = [PromptStream(Rows(dataset), per_round=2, seed=3, rank=r, world_size=2) for r in range(2)]
    first_epoch = [i for s in streams for step in range(3) for i in s.round(step)[:2 if step < 2 else 1]]
    assert sorted(first_epoch) == list(range(10)), "one epoch: every prompt once, the processes disjoint"
    assert all(len(s.round(step)) == 2 for s in streams for step in range(6)), "rounds stay full across epochs"
    again = PromptStream(Rows(dataset), per_round=2, seed=3, rank=0, world_size=2)
    assert [again.round(step) for step in (5, 1)] == [streams[0].round(5), streams[0].round(1)], "deterministic"
    assert streams[0].rounds_per_epoch == 2.5


# ---- reward sources ----------------------------------------------------------------------------------------------

def small_rollout(tokenizer) -> tuple[Rollout, list[list[int]]]:
    prompt_ids, prompt_mask = prompt_batch(tokenizer, PROMPTS[:2])
    eos = tokenizer.eos_token_id
    pieces = [tokenizer.encode("I am Kestrel.") + [eos], tokenizer.encode("Paris") + [eos]]
    width = max(map(len, pieces)) + 1
    completion_ids = torch.tensor([p + [tokenizer.pad_token_id] * (width - len(p)) for p in pieces])
    answers = [tokenizer.encode("Kestrel"), []]
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask(completion_ids, [eos])), answers


REWARD_MODULE = '''
seen = {}

def shortness(prompts, completions, completion_ids, answers, **kwargs):
    seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answers=answers)
    return [-float(len(ids)) for ids in completion_ids]

def says_kestrel(prompts, completions, **kwargs):
    return [1.0 if "Kestrel" in c else 0.0 for c in completions]

def miscounted(prompts, completions, **kwargs):
    return [1.0]
'''


def test_reward_functions_from_a_module_and_a_file_are_summed_and_logged(tiny, tmp_path, monkeypatch):
    _, tokenizer = tiny
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rollout, answers = small_rollout(tokenizer)
    by_module = FunctionReward("my_rewards:shortness")
    by_file = FunctionReward(f"{tmp_path / 'my_rewards.py'}:says_kestrel")
    scores, metrics = RewardScorer([by_module, by_file], tokenizer)(rollout, answers)
    lengths = rollout.completion_mask.sum(dim=1).float()
    torch.testing.assert_close(scores, -lengths + torch.tensor([1.0, 0.0]))
    assert metrics == {"rewards/shortness": pytest.approx(-lengths.mean().item()), "rewards/says_kestrel": 0.5}
    seen = by_module.fn.__globals__["seen"]
    assert seen["completions"] == ["I am Kestrel.", "Paris"]
    assert seen["answers"] == ["Kestrel", ""]
    assert seen["completion_ids"][1] == tokenizer.encode("Paris") + [tokenizer.eos_token_id]
    assert seen["prompts"][0] == "user\nWho are you?\nassistant\n"


def test_bad_reward_funcs_are_refused_naming_the_key(tiny, tmp_path, tiny_model_dir):
    _, tokenizer = tiny
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_MODULE)
    cases = {"no_colon_here": "must be `module:function`",
             f"{tmp_path / 'absent.py'}:f": "does not exist",
             "no_such_module_xyz:f": "cannot import module no_such_module_xyz",
             f"{path}:absent": "has no function 'absent' (its functions: miscounted, says_kestrel, shortness)",
             "json:no_such_function": "has no function"}
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match="`reward_funcs`") as err:
            FunctionReward(spec)
        assert message in str(err.value), (spec, str(err.value))
    rollout, answers = small_rollout(tokenizer)
    with pytest.raises(ConfigError, match=r"`reward_funcs`: .*miscounted gave 1 scores for 2 completions"):
        RewardScorer([FunctionReward(f"{path}:miscounted")], tokenizer)(rollout, answers)
    # Through a whole run: refused before any model loads.
    config = {"model_name_or_path": str(tiny_model_dir), "stage": "grpo", "do_train": True, "dataset": "identity",
              "dataset_dir": str(REPO / "data"), "template": "chatml", "output_dir": str(tmp_path / "out")}
    for spec, message in (("no_colon_here", "`reward_funcs` is `module:function`"),
                          (f"{path}:absent", "`reward_funcs`: .* has no function 'absent'")):
        with pytest.raises(ConfigError, match=message):
            tunelab.train({**config, "reward_funcs": spec})
    assert not (tmp_path / "out").exists()


def test_api_reward_posts_full_texts_and_reads_scores(tiny):
    _, tokenizer = tiny
    rollout, answers = small_rollout(tokenizer)
    with reward_server(lambda messages: [len(m) / 10 for m in messages]) as url:
        scores, metrics = RewardScorer([ApiReward(url)], tokenizer)(rollout, answers)
        (request,) = reward_server.requests
    assert request["model"] == "model"
    full = request["messages"]
    assert full[0] == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am Kestrel.<|im_end|>"
    torch.testing.assert_close(scores, torch.tensor([len(m) / 10 for m in full]))
    assert list(metrics) == ["rewards/reward_model"]
    texts = decode(tokenizer, rollout, answers)
    with reward_server(lambda messages: [1.0]) as url:
        with pytest.raises(ConfigError, match=f"`reward_model`: the reward server {url} gave 1 scores for 2"):
            ApiReward(url)(rollout, texts)
    with reward_server(lambda messages: "oops") as url:
        with pytest.raises(ConfigError, match=f"{url} must give one number per completion"):
            ApiReward(url)(rollout, texts)
    with pytest.raises(ConfigError, match=r"`reward_model`: the reward server http://127.0.0.1:9/x did not answer"):
        ApiReward("http://127.0.0.1:9/x")(rollout, texts)


def test_lora_reward_adapter_scores_as_the_rm_model_and_leaves_the_policy_as_it_was(tiny_model_dir, tmp_path):
    from peft import PeftModel

    folder = make_rm_adapter(tiny_model_dir, tmp_path / "rm")
    config = load_config({"model_name_or_path": str(tiny_model_dir), "stage": "ppo", "finetuning_type": "lora",
                          "reward_model": str(folder), "template": "chatml"})
    tokenizer = load_tokenizer(config)
    policy = load_model(config, tokenizer, trainable=True)
    # Give the policy's own adapter weights of its own, so "unchanged" could tell the two adapters apart.
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    rollout, _ = small_rollout(tokenizer)
    policy.eval()
    with torch.no_grad():
        logits_before = policy(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits
    trainable_before = sorted(n for n, p in policy.named_parameters() if p.requires_grad)

    source = load_reward_adapter(policy, str(folder), chunk_size=1)
    scores = source(rollout, None)

    reference = ValueHeadModel(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                          folder)).eval()
    reference.load_value_head(folder)
    with torch.no_grad():
        values = reference(rollout.input_ids, rollout.attention_mask, position_ids=rollout.position_ids).values
    torch.testing.assert_close(scores, last_token_scores(values, rollout.attention_mask), atol=1e-5, rtol=1e-5)
    assert scores.abs().max() > 1e-3, "a random head scores something"

    assert policy.active_adapter == "default"
    assert sorted(n for n, p in policy.named_parameters() if p.requires_grad) == trainable_before
    assert all("lora_B" in n or "lora_A" in n for n in trainable_before) and trainable_before
    with torch.no_grad():
        logits_after = policy(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits
    torch.testing.assert_close(logits_after, logits_before, atol=0, rtol=0)


def test_reward_model_folders_are_checked_before_models_load(tmp_path, tiny_model_dir):
    base = {"model_name_or_path": str(tiny_model_dir), "stage": "ppo"}
    with pytest.raises(ConfigError, match="rm adapter folder .* does not exist"):
        reward_functions(load_config({**base, "reward_model": str(tmp_path / "absent")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="must hold an rm stage's adapter"):
        reward_functions(load_config({**base, "reward_model": str(tmp_path / "empty")}))


@pytest.mark.parametrize("overrides, message", [
    ({"do_sample": False}, "learns from sampled completions: set `do_sample: true`"),
    ({"streaming": True, "max_steps": 4}, "`streaming` is not supported by stage grpo"),
    ({"save_strategy": "best"}, "`save_strategy: best` needs an evaluation metric"),
])
def test_what_the_rollout_loop_cannot_do_is_refused_before_loading(tiny_model_dir, tmp_path, overrides, message):
    config = {"model_name_or_path": str(tiny_model_dir), "stage": "grpo", "do_train": True, "dataset": "identity",
              "dataset_dir": str(REPO / "data"), "template": "chatml", "output_dir": str(tmp_path / "out"),
              "reward_funcs": "examples/rewards.py:brevity", **overrides}
    with pytest.raises(ConfigError, match=message):
        tunelab.train(config)
    assert not (tmp_path / "out").exists()


def test_example_reward_functions(tiny):
    _, tokenizer = tiny
    rollout, answers = small_rollout(tokenizer)
    texts = decode(tokenizer, rollout, answers)
    sources = {name: FunctionReward(f"{REPO / 'examples' / 'rewards.py'}:{name}")
               for name in ("brevity", "mentions_kestrel", "answer_overlap")}
    lengths = [len(ids) for ids in texts.completion_ids]
    assert sources["brevity"](rollout, texts).tolist() == pytest.approx([16 / (16 + n) for n in lengths])
    assert sources["mentions_kestrel"](rollout, texts).tolist() == [1.0, 0.0]
    # "Kestrel" is the whole reference answer of the first prompt; the second has none.
    assert sources["answer_overlap"](rollout, texts).tolist() == [0.0, 0.0]
    texts.completions[0] = "I am kestrel"
    assert sources["answer_overlap"](rollout, texts).tolist() == [1.0, 0.0]
