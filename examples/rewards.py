"""Example reward functions for `reward_funcs` (stage grpo, or ppo beside its reward model).

    reward_funcs: examples/rewards.py:brevity                 # a file path (relative to where tunelab runs) ...
    reward_funcs: my_package.rewards:brevity,examples/rewards.py:mentions_kestrel    # ... or an importable module

A reward function takes TRL's arguments and returns one float per completion:

* `prompts`, `completions`: the decoded prompts (one per completion, repeated for a group) and completions;
* keyword arguments: `completion_ids` (each completion's token ids, its stop token included) and `answers` (the
  dataset's reference reply of each prompt, "" where it has none). Accept `**kwargs` so later additions do no harm.

Several functions are summed; each one's mean is logged as `rewards/<name>` in trainer_log.jsonl.
"""


def brevity(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kwargs) -> list[float]:
    """Shorter is better: 1 for an empty reply, falling towards 0 as it grows (0.5 at 16 tokens)."""
    return [16 / (16 + len(ids)) for ids in completion_ids]


def mentions_kestrel(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1 when the reply gives the assistant's name from data/identity.json, Kestrel; else 0."""
    return [1.0 if "kestrel" in completion.lower() else 0.0 for completion in completions]


def answer_overlap(prompts: list[str], completions: list[str], answers: list[str], **kwargs) -> list[float]:
    """The share of the reference answer's words that the reply uses (0 when the data has no answer)."""
    scores = []
    for completion, answer in zip(completions, answers):
        wanted = set(answer.lower().split())
        scores.append(len(wanted & set(completion.lower().split())) / len(wanted) if wanted else 0.0)
    return scores
