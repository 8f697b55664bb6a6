"""Optional packages a config needs, checked when it loads: a missing one is named, with what installs it, before
anything slow (tokenizing, loading a model) starts. Only `importlib.util.find_spec` runs here; nothing is imported.
"""

import importlib.util
from collections.abc import Callable
from typing import NamedTuple

from tunelab.config.schema import Config


class Need(NamedTuple):
    what: str                          # the config's words for what needs the package
    applies: Callable[[Config], bool]
    modules: tuple[str, ...]           # importable names
    install: str


def _tracker(name: str) -> Need:
    return Need(f"`report_to: {name}`", lambda c: name in c.report_to, (name,),
                "pip install 'tunelab[tensorboard]'" if name == "tensorboard" else f"pip install {name}")


NEEDS = (
    Need("`quantization_bit` (QLoRA)", lambda c: c.quantization_bit is not None, ("bitsandbytes",),
         "pip install 'tunelab[quantization]'"),
    Need("an 8-bit optimizer (`optim: ..._bnb_...`)", lambda c: "bnb" in c.optim, ("bitsandbytes",),
         "pip install 'tunelab[quantization]'"),
    Need("GaLore (`use_galore`, `optim: galore_...`)", lambda c: c.use_galore or "galore" in c.optim,
         ("galore_torch",), "pip install 'tunelab[methods]'"),
    Need("APOLLO (`use_apollo`, `optim: apollo_...`)", lambda c: c.use_apollo or "apollo" in c.optim,
         ("apollo_torch",), "pip install 'tunelab[methods]'"),
    Need("`use_badam`", lambda c: c.use_badam, ("badam",), "pip install 'tunelab[methods]'"),
    Need("`use_adam_mini`", lambda c: c.use_adam_mini, ("adam_mini",), "pip install 'tunelab[methods]'"),
    Need("`deepspeed`", lambda c: bool(c.extra_training_args.get("deepspeed")), ("deepspeed",),
         "pip install 'tunelab[deepspeed]'"),
    Need("`do_predict` (BLEU and ROUGE scores)", lambda c: c.do_predict, ("jieba", "nltk", "rouge_chinese"),
         "pip install 'tunelab[metrics]'"),
    Need("`infer_backend: vllm`", lambda c: c.infer_backend == "vllm", ("vllm",),
         "pip install 'tunelab[vllm]' (on a machine with a GPU)"),
    *(_tracker(name) for name in ("tensorboard", "wandb", "mlflow", "swanlab")),
)


def missing_packages(config: Config) -> list[str]:
    """One message per need of the config whose package is not installed."""
    problems = []
    for need in NEEDS:
        if need.applies(config):
            absent = [module for module in need.modules if importlib.util.find_spec(module) is None]
            if absent:
                names = ", ".join(f"`{module}`" for module in absent)
                problems.append(f"{need.what} needs the {names} package{'s' if len(absent) > 1 else ''}, which "
                                f"{'are' if len(absent) > 1 else 'is'} not installed: {need.install}")
    return problems
