"""The training stages, one row each: the data a stage reads, what it needs, and the module that runs it.

Every layer reads this table: the schema's allowed `stage` values, the cross-field rules (`rules.py`), the data
layer's choice of processing (`data/registry.py`) and the dispatch to a stage module (`training/run.py`).

Adding a stage: a row here; a module `tunelab/training/stages/<name>.py` with `run(config) -> metrics`; if its data
kind is new, a processor in `data/processing.py` and its sequences in `data/loader.py`; a test
`tests/training/test_stage_<name>.py` that trains it for real steps.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

#: The kinds of training data (the internal form of each is described in data/formats.py).
DataKind = Literal["pt", "sft", "pairwise", "kto", "prompt"]
#: When a stage compares its policy with a frozen reference: never, always, when `pref_loss` is one that does
#: (`schema.REFERENCE_LOSSES`), or when `grpo_beta` > 0.
Reference = Literal["never", "always", "pref_loss", "grpo_beta"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    data: DataKind
    #: The module under tunelab.training.stages that runs it.
    module: str
    reference: Reference = "never"
    #: For the preference stages: the `pref_loss` they train with by default; orpo and simpo are dpo with theirs.
    pref_loss: str | None = None
    #: orpo and simpo are shorthands: their `pref_loss` cannot be changed.
    fixed_loss: bool = False
    #: It has an evaluation loss (`do_eval`, `eval_strategy`).
    evaluates: bool = True
    #: Its loss is the next-token loss over each row: samples may share a row (`packing`), and the evaluation loss
    #: gives a perplexity.
    next_token_loss: bool = False
    #: It generates replies and scores them with `reward_model` or `reward_funcs`.
    rollout: bool = False
    #: The logged metric that tells a user it is learning, shown beside the loss (the web board's second plot).
    metric: str | None = None


STAGE_SPECS: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("pt", "pt", "pt", next_token_loss=True),
    StageSpec("sft", "sft", "sft", next_token_loss=True),
    StageSpec("rm", "pairwise", "rm", metric="rewards/accuracies"),
    StageSpec("dpo", "pairwise", "dpo", reference="pref_loss", pref_loss="sigmoid", metric="rewards/margins"),
    StageSpec("orpo", "pairwise", "dpo", reference="pref_loss", pref_loss="orpo", fixed_loss=True,
              metric="rewards/margins"),
    StageSpec("simpo", "pairwise", "dpo", reference="pref_loss", pref_loss="simpo", fixed_loss=True,
              metric="rewards/margins"),
    StageSpec("kto", "kto", "kto", reference="always", metric="rewards/margins"),
    StageSpec("ppo", "prompt", "ppo", reference="always", evaluates=False, rollout=True, metric="reward"),
    StageSpec("grpo", "prompt", "grpo", reference="grpo_beta", evaluates=False, rollout=True, metric="reward"),
)}
STAGES = tuple(STAGE_SPECS)


def stages_where(wanted: Callable[[StageSpec], bool]) -> str:
    """The stages a property holds for, as messages name them: "`stage: ppo` and `stage: grpo`"."""
    names = [f"`stage: {spec.name}`" for spec in STAGE_SPECS.values() if wanted(spec)]
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
