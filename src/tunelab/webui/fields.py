"""The board's form, read from the config schema: every key's widget, its place on the page, and the conversion
between what the widgets hold and a config dict.

Nothing here is a second list of keys. A key added to `config/schema.py` gets a widget from its type (a choice list
for a `Literal`, a checkbox for a bool, a number box for an int or float, a text box for strings and comma lists),
its range and its help, and a place from the group it is declared in (`GROUP_OF`). The values the board produces go
through `load_config` and the rules, exactly as a YAML file does. No gradio here: `board.py` turns these specs into
widgets.
"""

import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal

from tunelab.config import ConfigError, load_config
from tunelab.config.load import coerce
from tunelab.config.method_options import (AdapterVariantOptions, LayerAndLossOptions, OptimizerOptions,
                                           PrecisionOptions)
from tunelab.config.schema import (Config, DataOptions, EvaluationOptions, ExportOptions, GenerationOptions,
                                   InferenceOptions, MethodOptions, ModelOptions, PreferenceOptions, RewardOptions,
                                   TrainingOptions, public_fields)
from tunelab.config.multimodal_options import MultimodalOptions
from tunelab.data import resolve_datasets

#: The top bar: the model and how it is adapted, shared by every tab.
TOP_BAR_KEYS = ("model_name_or_path", "adapter_name_or_path", "finetuning_type", "quantization_bit", "template")
#: Set by the tab that starts a job rather than by a widget: Start trains, Predict predicts.
JOB_KEYS = ("do_train", "do_predict", "predict_with_generate")
#: Keys at the head of the Train tab, in the seed guide's order (its 训练配置 panel first).
TRAIN_HEAD_KEYS = ("stage", "dataset_dir", "dataset", "learning_rate", "num_train_epochs", "max_samples",
                   "lr_scheduler_type", "max_grad_norm", "eval_steps", "save_steps", "optim", "cutoff_len",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "output_dir")
#: Each declared group's section on the board (a tab's accordion); keys named above are placed there instead.
#: The method's groups share one section, split below by method; what no method claims (Adam-mini, Muon, LLaMA Pro,
#: the loss variants, precision) stays in it, as in LLaMA Board's "extra" panel. Within a section, keys follow this
#: table's order of groups (LoRA's own keys before LoRA+ and PiSSA, before the quantization keys), then their
#: declaration order.
GROUP_OF = {MethodOptions: "method", AdapterVariantOptions: "method", OptimizerOptions: "method",
            LayerAndLossOptions: "method", PrecisionOptions: "method", ModelOptions: "model", DataOptions: "data",
            MultimodalOptions: "data",
            PreferenceOptions: "preference", RewardOptions: "reward", InferenceOptions: "generation",
            GenerationOptions: "generation", ExportOptions: "export", EvaluationOptions: "evaluation",
            TrainingOptions: "training"}
#: Method keys split by what they adapt or optimize, by name prefix: a section per method, as LLaMA Board has.
METHOD_SECTIONS = (("lora", ("lora_", "loraplus_", "pissa_", "use_rslora", "use_dora", "create_new_adapter",
                              "additional_target", "quantization_type", "double_quantization")),
                   ("oft", ("oft_", "module_dropout")),
                   ("freeze", ("freeze_",)),
                   ("galore", ("galore_", "use_galore")),
                   ("apollo", ("apollo_", "use_apollo")),
                   ("badam", ("badam_", "use_badam")))
#: Keys chosen from lists the board fills in at run time (known models, earlier adapters, dataset_info.json entries,
#: template names); a value outside the list may still be typed.
CHOOSERS = {"model_name_or_path": "combo", "template": "combo", "optim": "combo",
            "adapter_name_or_path": "multiselect", "dataset": "multiselect", "eval_dataset": "multiselect"}
#: What an unset value looks like in each kind of widget, and in the template list ("auto": the tokenizer's own).
UNSET = {"dropdown": "none", "combo": "", "text": ""}
AUTO_TEMPLATE = "auto"
#: Section -> the tab it belongs to, in the order the tab lays them out.
SECTION_TAB = {"top": "top", "head": "train", "training": "train", "lora": "train", "oft": "train",
               "freeze": "train", "galore": "train", "apollo": "train", "badam": "train", "data": "train",
               "method": "train", "model": "train", "preference": "train", "reward": "train", "generation": "chat",
               "evaluation": "evaluate", "export": "export"}


@dataclass(frozen=True)
class FieldSpec:
    """One config key as the board shows it."""

    key: str
    widget: str                      # dropdown, checkbox, number, text, combo, multiselect
    default: Any
    help: str
    section: str
    choices: tuple[Any, ...] = ()    # dropdown: the allowed values (None first when the key may be unset)
    integer: bool = False            # number: whole numbers only
    minimum: float | None = None
    maximum: float | None = None
    annotation: Any = None

    @property
    def unset(self) -> str | None:
        return AUTO_TEMPLATE if self.key == "template" else UNSET.get(self.widget)

    def to_widget(self, value: Any) -> Any:
        """A config value as this field's widget holds it."""
        if self.widget == "multiselect":
            # A YAML may list them, or name them in one comma-separated string.
            items = value.split(",") if isinstance(value, str) else value or []
            return [str(item).strip() for item in items if str(item).strip()]
        if self.widget in UNSET:
            if value is None:
                return self.unset
            return ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        return value

    def from_widget(self, raw: Any) -> Any:
        """The typed config value of what the widget holds; ValueError with the CLI's wording when it cannot be."""
        if raw is None or raw == [] or (isinstance(raw, str) and raw.strip() in ("", self.unset)):
            return None
        if self.widget == "number" and isinstance(raw, float) and self.integer and raw.is_integer():
            raw = int(raw)
        return coerce(raw, self.annotation, from_text=isinstance(raw, str))


def _section_of(key: str, group: str) -> str:
    if key in TOP_BAR_KEYS:
        return "top"
    if key in TRAIN_HEAD_KEYS:
        return "head"
    if group in ("method", "model"):
        for section, prefixes in METHOD_SECTIONS:
            if key.startswith(prefixes):
                return section
    return group


def _declaring_class(key: str) -> type:
    for cls in GROUP_OF:
        if key in {f.name for f in fields(cls)}:
            return cls
    raise KeyError(f"config key {key!r} is declared in no group of GROUP_OF")


def _spec(f: Any) -> FieldSpec:
    annotation = f.type
    default = f.default_factory() if f.default is MISSING else f.default
    inner = annotation
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if optional:
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    meta = f.metadata
    section = _section_of(f.name, GROUP_OF[_declaring_class(f.name)])
    common = dict(key=f.name, default=default, help=meta["help"], section=section, minimum=meta.get("minimum"),
                  maximum=meta.get("maximum"), annotation=annotation)
    if f.name in CHOOSERS:
        return FieldSpec(widget=CHOOSERS[f.name], **common)
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        return FieldSpec(widget="dropdown", choices=((None,) if optional else ()) + choices, **common)
    if inner is bool and not optional:
        return FieldSpec(widget="checkbox", **common)
    if inner in (int, float) and not optional:
        return FieldSpec(widget="number", integer=inner is int, **common)
    # Strings, comma lists, and optional bools and numbers (which may be left empty) are typed as on the command
    # line.
    return FieldSpec(widget="text", **common)


def _place(spec: FieldSpec) -> tuple[int, int, int]:
    """Where a key sits: its section, its pinned place in the top bar or the Train tab's head, its group's order."""
    pinned = TOP_BAR_KEYS + TRAIN_HEAD_KEYS
    return (SECTIONS.index(spec.section), pinned.index(spec.key) if spec.key in pinned else len(pinned),
            list(GROUP_OF).index(_declaring_class(spec.key)))


#: Sections in the order YAML files the board writes list their keys (tabs lay them out in SECTION_TAB's order).
SECTIONS = ("top", "head", "method", "lora", "oft", "freeze", "galore", "apollo", "badam", "data", "model",
            "training", "preference", "reward", "generation", "evaluation", "export")
FIELDS: dict[str, FieldSpec] = {
    spec.key: spec for spec in sorted((_spec(f) for f in public_fields() if f.name not in JOB_KEYS), key=_place)}


def config_from_widgets(values: dict[str, Any], more_keys: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config dict of the board's widgets: each key that differs from its default, typed, in schema order, then
    the `more keys` the user typed. Raises ConfigError naming every key whose widget holds an unreadable value."""
    config: dict[str, Any] = {}
    problems = []
    for key, raw in values.items():
        spec = FIELDS[key]
        try:
            value = spec.from_widget(raw)
        except ValueError as err:
            problems.append(f"`{key}`: {err}")
            continue
        if value != spec.default:
            config[key] = value
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems))
    config.update(more_keys or {})
    return config


def widgets_from_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A loaded YAML as widget values (every board key, defaults where the YAML is silent) and the keys the board
    has no widget for (passed through under `more keys`)."""
    values = {key: spec.to_widget(config.get(key, spec.default)) for key, spec in FIELDS.items()}
    rest = {key: value for key, value in config.items() if key not in FIELDS and key not in JOB_KEYS}
    return values, rest


def validate(config: dict[str, Any]) -> Config:
    """The checks `tunelab train` makes before anything loads: the schema, the rules, the dataset names and files."""
    checked = load_config(config)
    resolve_datasets(checked.dataset, checked.dataset_dir, checked.stage)
    resolve_datasets(checked.eval_dataset, checked.dataset_dir, checked.stage)
    return checked


def keys_named(message: str) -> list[str]:
    """The board keys an error message names (between backticks), so each widget can show its own problem."""
    import re

    return [key for key in dict.fromkeys(re.findall(r"`(\w+)`", message)) if key in FIELDS]
