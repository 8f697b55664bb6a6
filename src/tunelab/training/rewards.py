"""Reward sources of the ppo and grpo stages behind one interface: a `RewardScorer` takes a rollout and returns one
float score per completion (the sum over its sources), and each source's mean for the logs.

    scorer = RewardScorer([FunctionReward("examples/rewards.py:brevity")], tokenizer)
    scores, metrics = scorer(rollout, answer_ids)    # scores: [N] float32; metrics: {"rewards/brevity": 0.42}

The sources a config names (`build_reward_scorer`):

* `reward_funcs`: Python functions, `module:function` (importable from the environment or the working directory) or
  `path/to/file.py:function`, with TRL's signature

      def brevity(prompts: list[str], completions: list[str], **kwargs) -> list[float]

  called with the keyword arguments `prompts` and `completions` (decoded; special tokens left out when
  `skip_special_tokens`, the default, says so), `completion_ids` (each completion's tokens, its stop token included)
  and `answers` (the dataset's reference replies, "" where there are none). Each is logged as `rewards/<name>`.
* `reward_model`, as `reward_model_type` says:
  * `lora`: the rm stage's adapter folder (adapter files + value_head.safetensors) on the policy's own base, loaded
    as a second peft adapter named "reward", with a head of its own. Scoring switches to that adapter and back;
    which parameters train, and the policy's outputs, are exactly as before.
  * `full`: a separate model saved by the rm stage (`model/frozen.py::load_full_reward_model`).
  * `api`: an HTTP endpoint speaking LLaMA-Factory's protocol: POST `{"model": "model", "messages": [text, ...]}`,
    each text a prompt and its completion decoded with their special tokens, answered by `{"scores": [...]}`.
  A model's score is its head's value at the last token of prompt + completion. It is logged as
  `rewards/reward_model`.

Several sources are summed. Mistakes (a function that cannot be imported or returns the wrong count, a folder without
a head, a server that does not answer or answers the wrong shape) raise ConfigError naming the key.
"""

import importlib
import importlib.util
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from tunelab.config import Config, ConfigError
from tunelab.model.frozen import load_full_reward_model
from tunelab.model.value_head import VALUE_HEAD_FILE, ValueHeadModel, has_value_head, last_token_scores
from tunelab.training.rollout_types import Rollout

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: The name of the rm adapter beside the policy's own ("default") on the peft model.
REWARD_ADAPTER = "reward"
#: Seconds a reward server may take to answer one batch.
API_TIMEOUT = 300


@dataclass
class RolloutTexts:
    """A rollout as text, one entry per completion: what reward functions and reward servers read."""

    prompts: list[str]
    completions: list[str]
    full: list[str]                   # prompt + completion with every special token, for a reward server
    completion_ids: list[list[int]]
    answers: list[str]


class RewardSource(Protocol):
    name: str

    def __call__(self, rollout: Rollout, texts: RolloutTexts) -> torch.Tensor:
        """One float score per completion."""


def decode(tokenizer: "PreTrainedTokenizerBase", rollout: Rollout, answer_ids: list[list[int]],
           skip_special_tokens: bool = True) -> RolloutTexts:
    """The rollout's prompts, completions (each without its padding) and reference answers as text."""
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.prompt_ids, rollout.prompt_mask)]
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]
    return RolloutTexts(
        prompts=tokenizer.batch_decode(prompts, skip_special_tokens=skip_special_tokens),
        completions=tokenizer.batch_decode(completions, skip_special_tokens=skip_special_tokens),
        full=tokenizer.batch_decode([p + c for p, c in zip(prompts, completions)], skip_special_tokens=False),
        completion_ids=completions,
        answers=tokenizer.batch_decode(answer_ids, skip_special_tokens=True),
    )


def as_scores(values: Any, expected: int, source: str) -> torch.Tensor:
    """`values` as a float32 tensor of `expected` finite numbers, or a ConfigError naming `source`."""
    try:
        scores = torch.as_tensor(values, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{source} must give one number per completion; got {str(values)[:200]} ({err})") from None
    if scores.numel() != expected:
        raise ConfigError(f"{source} gave {scores.numel()} scores for {expected} completions")
    if not torch.isfinite(scores).all():
        raise ConfigError(f"{source} gave a score that is not a finite number: {scores.tolist()}")
    return scores


class FunctionReward:
    """A Python reward function named by one `reward_funcs` entry."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fn = load_reward_function(spec)
        self.name = getattr(self.fn, "__name__", spec.rsplit(":", 1)[-1])

    def __call__(self, rollout: Rollout, texts: RolloutTexts) -> torch.Tensor:
        values = self.fn(prompts=texts.prompts, completions=texts.completions, completion_ids=texts.completion_ids,
                         answers=texts.answers)
        return as_scores(values, len(texts.completions), f"`reward_funcs`: {self.spec}")


def load_reward_function(spec: str) -> Callable[..., Any]:
    """The function `module:function` or `path/file.py:function` names."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"`reward_funcs`: {spec!r} must be `module:function` or `path/to/file.py:function`")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"`reward_funcs`: {spec!r}: the file {where} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"tunelab_rewards_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:  # the user's file: any error it raises is theirs to see
            raise ConfigError(f"`reward_funcs`: {spec!r}: running {where} failed: {err!r}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ConfigError(f"`reward_funcs`: {spec!r}: cannot import module {where} ({err}); for a file, write "
                              f"`path/to/file.py:{name}`") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"`reward_funcs`: {spec!r}: {where} has no function {name!r} (its functions: "
                          f"{', '.join(found) or 'none'})")
    return fn


class ApiReward:
    """`reward_model_type: api`: a reward server at a URL."""

    name = "reward_model"

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, rollout: Rollout, texts: RolloutTexts) -> torch.Tensor:
        source = f"`reward_model`: the reward server {self.url}"
        request = urllib.request.Request(
            self.url, data=json.dumps({"model": "model", "messages": texts.full}).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json", "Authorization": "Bearer EMPTY"})
        try:
            with urllib.request.urlopen(request, timeout=API_TIMEOUT) as response:
                body = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError) as err:
            raise ConfigError(f"{source} did not answer: {err}") from err
        try:
            scores = json.loads(body)["scores"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f'{source} must answer {{"scores": [...]}}; it answered {body[:200]!r}') from None
        return as_scores(scores, len(texts.full), source)


class ModelReward:
    """A value-head model scoring prompt + completion; `switch` is entered around each scoring (the lora adapter)."""

    name = "reward_model"

    def __init__(self, model: ValueHeadModel, chunk_size: int,
                 switch: Callable[[], Any] = nullcontext) -> None:
        self.model = model
        self.chunk_size = chunk_size
        self.switch = switch

    @torch.no_grad()
    def __call__(self, rollout: Rollout, texts: RolloutTexts) -> torch.Tensor:
        scores = []
        with self.switch():
            for start in range(0, len(rollout), self.chunk_size):
                part = rollout[start:start + self.chunk_size]
                values = self.model(part.input_ids, part.attention_mask, position_ids=part.position_ids).values
                scores.append(last_token_scores(values, part.attention_mask))
        return torch.cat(scores).float()


@contextmanager
def same_trainable(model: torch.nn.Module) -> Iterator[None]:
    """Restore afterwards exactly which of `model`'s parameters train (parameters added inside stay frozen)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    try:
        yield
    finally:
        for param in model.parameters():
            param.requires_grad_(id(param) in trainable)


@contextmanager
def adapter_active(model: "PreTrainedModel", name: str) -> Iterator[None]:
    """Run a peft model with adapter `name`, then switch back to its previous adapter.

    peft's `set_adapter` also marks the adapter it activates trainable and the others frozen: `same_trainable` puts
    the flags back, so nothing about training changes.
    """
    previous = model.active_adapter
    with same_trainable(model):
        model.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter(previous)


def load_reward_adapter(policy: "PreTrainedModel", folder: str, chunk_size: int) -> ModelReward:
    """`reward_model_type: lora`: the rm adapter in `folder` beside the policy's own adapter, with its own head."""
    with same_trainable(policy):
        try:
            policy.load_adapter(folder, adapter_name=REWARD_ADAPTER, is_trainable=False)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"`reward_model`: cannot load the rm adapter in {folder} onto the policy: {err}") from err
    scorer = ValueHeadModel(policy)
    scorer.load_value_head(folder)
    # Only the head: the rest of `scorer` is the policy itself, which trains.
    scorer.v_head.requires_grad_(False)
    logger.info("reward model: the rm adapter %s, as a second adapter on the policy", folder)
    return ModelReward(scorer, chunk_size, switch=lambda: adapter_active(policy, REWARD_ADAPTER))


def reward_functions(config: Config) -> list[FunctionReward]:
    """The `reward_funcs` sources, imported now, and a check of `reward_model` that needs no model: both fail before
    any model loads."""
    functions = [FunctionReward(spec) for spec in config.reward_funcs or []]
    folder = config.reward_model
    if folder is not None and config.reward_model_type == "lora":
        if not Path(folder).is_dir():
            raise ConfigError(f"`reward_model`: the rm adapter folder {folder} does not exist")
        if not (Path(folder) / "adapter_config.json").is_file() or not has_value_head(folder):
            raise ConfigError(f"`reward_model` (reward_model_type: lora): {folder} must hold an rm stage's adapter "
                              f"(adapter_config.json and {VALUE_HEAD_FILE}); train one with `stage: rm`")
    return functions


def build_reward_scorer(config: Config, tokenizer: "PreTrainedTokenizerBase", policy: "PreTrainedModel",
                        functions: list[FunctionReward], chunk_size: int) -> "RewardScorer":
    """Every source the config names: `functions` (from `reward_functions`) and the reward model, if any."""
    sources: list[RewardSource] = list(functions)
    if config.reward_model_type == "api" and config.reward_model:
        sources.append(ApiReward(config.reward_model))
    elif config.reward_model_type == "full" and config.reward_model:
        sources.append(ModelReward(load_full_reward_model(config, tokenizer), chunk_size))
    elif config.reward_model:
        sources.append(load_reward_adapter(policy, config.reward_model, chunk_size))
    return RewardScorer(sources, tokenizer, config.skip_special_tokens)


class RewardScorer:
    """The sum of its sources' scores, each source's mean logged as `rewards/<name>`."""

    def __init__(self, sources: list[RewardSource], tokenizer: "PreTrainedTokenizerBase",
                 skip_special_tokens: bool = True) -> None:
        if not sources:
            raise ConfigError("no reward source: set `reward_funcs` or `reward_model`")
        self.sources = sources
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens

    def place_models(self, place: Callable[[torch.nn.Module], torch.nn.Module], policy: torch.nn.Module) -> None:
        """Hand each reward model of its own to `place`, which returns it ready to run beside the policy; a reward
        adapter on the policy's own base moves with the policy."""
        for source in self.sources:
            if isinstance(source, ModelReward) and source.model.pretrained_model is not policy:
                source.model = place(source.model)

    def __call__(self, rollout: Rollout, answer_ids: list[list[int]]) -> tuple[torch.Tensor, dict[str, float]]:
        texts = decode(self.tokenizer, rollout, answer_ids, self.skip_special_tokens)
        device = rollout.completion_ids.device
        total = torch.zeros(len(rollout), device=device)
        metrics = {}
        for source in self.sources:
            scores = source(rollout, texts).to(device)
            total += scores
            metrics[f"rewards/{source.name}"] = scores.mean().item()
        return total, metrics
