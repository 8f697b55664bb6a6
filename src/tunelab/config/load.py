"""Read a config from YAML, JSON, a dict and `key=value` overrides, and validate it against the schema.

Everything here is pure Python (no torch, no transformers), so a bad config is refused in well under a second,
before any model or dataset is touched. Every problem found is reported at once, each naming where it came from
(the file or the command line), the key, the value, and what was expected.
"""

import difflib
import math
import types
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Literal

from tunelab.config.llamafactory import DECIDED_BY_TUNELAB, SAME_AS_TUNELAB, UNSUPPORTED
from tunelab.config.llamafactory_v1 import V1_ONLY_KEYS, is_v1_config, translate_v1
from tunelab.config.packages import missing_packages
from tunelab.config.distributed import deepspeed_settings
from tunelab.config.files import ConfigError, parse_json, parse_yaml, read_text
from tunelab.config.passthrough import (IGNORED_TRAINING_KEYS, MOVED_INTO_FSDP_CONFIG, PASSTHROUGH_TRAINING_KEYS,
                                        RENAMED_TRAINING_KEYS)
from tunelab.config.rules import check_rules
from tunelab.config.schema import Config, public_fields

#: LLaMA-Factory keys tunelab knows but does not implement yet: accepted while off, refused when switched on.


SCHEMA_KEYS = frozenset(f.name for f in public_fields())

#: The passed-through TrainingArguments keys that take a number or a switch, with their type (a test compares them with
#: transformers): transformers stores `weight_decay: abc` as it is, and the optimizer fails on it after the model loads.
PASSTHROUGH_TYPES = {
    **dict.fromkeys("adam_beta1 adam_beta2 adam_epsilon eval_delay label_smoothing_factor neftune_noise_alpha "
                    "weight_decay".split(), float),
    **dict.fromkeys("data_seed dataloader_prefetch_factor ddp_bucket_cap_mb eval_accumulation_steps local_rank "
                    "save_total_limit torch_empty_cache_steps".split(), int),
    **dict.fromkeys("auto_find_batch_size average_tokens_across_devices bf16_full_eval dataloader_drop_last "
                    "dataloader_persistent_workers dataloader_pin_memory ddp_broadcast_buffers "
                    "ddp_find_unused_parameters disable_tqdm eval_do_concat_batches eval_on_start fp16_full_eval "
                    "full_determinism greater_is_better hub_always_push hub_private_repo ignore_data_skip "
                    "load_best_model_at_end log_on_each_node logging_first_step logging_nan_inf_filter "
                    "prediction_loss_only push_to_hub save_on_each_node skip_memory_metrics tf32 torch_compile "
                    "use_cpu use_liger_kernel".split(), bool),
}


def load_config(source: str | Path | dict[str, Any], overrides: list[tuple[str, str]] = ()) -> Config:
    """Build a validated Config from a YAML/JSON file path or a dict, then apply command-line overrides.

    A LLaMA-Factory v1 config (`model`, `train_dataset`, ...) is read as the tunelab keys it means
    (`config/llamafactory_v1.py`); overrides are tunelab keys either way.

    `overrides` are (key, raw string) pairs as typed on the command line; their values are parsed by the key's
    declared type, so `eval_strategy=no` stays the string "no".
    """
    if isinstance(source, dict):
        origin, values = "config", dict(source)
    else:
        origin, values = str(source), read_config_file(Path(source))
    problems: list[str] = []
    where = dict.fromkeys(values, origin)
    if is_v1_config(values):
        # LLaMA-Factory's v1 format: read as the tunelab keys it means, each message naming its v1 key.
        v1 = translate_v1(values, origin)
        values, where, problems = v1.values, v1.where, v1.problems
    accepted: dict[str, tuple[str, Any]] = {}
    for key, value in values.items():
        _accept(str(key), value, where[key], accepted, problems, from_text=False)
    for key, raw in overrides:
        _accept(key, raw, "command line", accepted, problems, from_text=True)

    declared = {f.name: f for f in public_fields()}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, (where, value) in accepted.items():
        if key in declared:
            try:
                kwargs[key] = coerce(value, declared[key].type, from_text=isinstance(value, str))
                _check_range(kwargs[key], declared[key].metadata)
            except ValueError as err:
                problems.append(f"{where}: `{key}`: {err}")
        elif key in PASSTHROUGH_TYPES:
            try:
                extra[key] = coerce(value, PASSTHROUGH_TYPES[key] | None, from_text=isinstance(value, str))
            except ValueError as err:
                problems.append(f"{where}: `{key}`: {err}")
        else:
            extra[key] = _parse_text(value) if where == "command line" else value
    _move_into_fsdp_config(extra, accepted, problems)
    if extra.get("deepspeed"):
        try:
            deepspeed_settings(extra["deepspeed"])
        except ValueError as err:
            problems.append(f"{accepted['deepspeed'][0]}: `deepspeed`: {err}")
    if problems:
        raise ConfigError(_format(problems))
    config = Config(**kwargs, extra_training_args=extra)
    problems = check_rules(config) or missing_packages(config)
    if problems:
        raise ConfigError(_format([f"{origin}: {p}" for p in problems]))
    return config


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a .yaml/.yml/.json config file into a dict, naming the file and position of any syntax error, byte that
    is not UTF-8 or key written twice."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    text = read_text(path)
    data = parse_json(text, path) if path.suffix == ".json" else parse_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _accept(key: str, value: Any, where: str, accepted: dict, problems: list[str], *, from_text: bool) -> None:
    """Record one key/value, or explain why the key is not accepted."""
    if key in RENAMED_TRAINING_KEYS:
        key = RENAMED_TRAINING_KEYS[key]
    if key in IGNORED_TRAINING_KEYS or key in DECIDED_BY_TUNELAB:
        return
    if key in SCHEMA_KEYS or key in PASSTHROUGH_TRAINING_KEYS or key in MOVED_INTO_FSDP_CONFIG:
        accepted[key] = (where, value)
    elif key in UNSUPPORTED:
        parsed = _parse_text(value) if from_text else value
        if parsed not in (None, False, 0, "", [], "none", *SAME_AS_TUNELAB.get(key, ())):
            problems.append(f"{where}: `{key}` is a LLaMA-Factory option tunelab does not support "
                            f"({UNSUPPORTED[key]}): remove it or set it to false/null")
    else:
        candidates = sorted(SCHEMA_KEYS | PASSTHROUGH_TRAINING_KEYS)
        # Only a close match is a likely typo; a distant one (use_muon -> use_cpu) misleads.
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
        hint = f" (did you mean `{close[0]}`?)" if close else " (see `tunelab help keys`)"
        if key in V1_ONLY_KEYS:  # not a typo: on the command line, or in a config that also holds v0 keys
            hint = " (see `tunelab help keys`); it is a LLaMA-Factory v1 key, read only in a v1 config (no v0 keys)"
        problems.append(f"{where}: unknown key `{key}`{hint}")


def _move_into_fsdp_config(extra: dict[str, Any], accepted: dict, problems: list[str]) -> None:
    """`fsdp_transformer_layer_cls_to_wrap: X` -> `fsdp_config: {transformer_layer_cls_to_wrap: X}`, as transformers
    5 reads it."""
    for old, new in MOVED_INTO_FSDP_CONFIG.items():
        if old not in extra:
            continue
        fsdp_config = extra.setdefault("fsdp_config", {})
        if not isinstance(fsdp_config, dict):
            problems.append(f"{accepted[old][0]}: `{old}` goes into `fsdp_config` as `{new}`, but `fsdp_config` is "
                            f"{fsdp_config!r}: write `{new}` in that file instead")
            continue
        fsdp_config.setdefault(new, extra.pop(old))


def coerce(value: Any, annotation: Any, *, from_text: bool = False) -> Any:
    """Turn a YAML/JSON/command-line value into the declared type, or raise ValueError saying what was expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and str(value).lower() in ("null", "none")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, from_text=from_text)
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value.strip()):
                return choice
        allowed = ", ".join(str(a) for a in args)
        raise ValueError(f"got {value!r}; expected one of: {allowed}")
    if origin is list:
        (item_type,) = args
        items = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        noun = "strings" if item_type is str else "numbers"
        if not isinstance(items, list):
            raise ValueError(f"got {value!r}; expected a list of {noun} or a comma-separated string")
        try:
            return [coerce(item, item_type, from_text=isinstance(item, str)) for item in items]
        except ValueError:
            raise ValueError(f"got {value!r}; expected a list of {noun} or a comma-separated string") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ValueError(f"got {value!r}; expected true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"got {value!r}; expected an integer")
    if annotation is float:
        number = None
        try:
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                number = float(value.strip() if isinstance(value, str) else value)
        except (ValueError, OverflowError):  # not a number, or an integer too large for a float
            pass
        if number is None:
            raise ValueError(f"got {value!r:.80}; expected a number")
        if not math.isfinite(number):  # nan or inf would train on without a word
            raise ValueError(f"got {value!r}; expected a finite number")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"got {value!r}; expected a string")
    raise TypeError(f"schema type {annotation!r} has no coercion rule")


def coerce_key(key: str, value: Any) -> Any:
    """`value` (from JSON, not text) as the schema key `key` takes it: converted to its type and checked against its
    range; ValueError saying what was expected otherwise. Front ends check per-request settings with it."""
    declared = {f.name: f for f in public_fields()}[key]
    value = coerce(value, declared.type)
    _check_range(value, declared.metadata)
    return value


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False,
               "off": False}


def _check_range(value: Any, meta: typing.Mapping[str, Any]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and (value < low or (meta.get("exclusive_minimum") and value == low)):
        bound = "greater than" if meta.get("exclusive_minimum") else "at least"
        raise ValueError(f"got {value!r}; expected a value {bound} {low:g}")
    if high is not None and value > high:
        raise ValueError(f"got {value!r}; expected a value at most {high:g}")


def _parse_text(value: Any) -> Any:
    """Give a command-line string the type YAML would (numbers, booleans, null) for keys the schema does not type."""
    if not isinstance(value, str):
        return value
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except (yaml.YAMLError, RecursionError):  # not YAML (or nested past the parser's depth): the text as typed
        return value
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def _format(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems)


def describe_keys() -> str:
    """A plain-text table of every key, its type, default and help, grouped as declared."""
    lines = []
    for f in public_fields():
        default = f.default_factory() if f.default is MISSING else f.default
        type_name = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")
        lines.append(f"{f.name:32} {type_name:40.40} default={default!r}\n    {f.metadata['help']}")
    return "\n".join(lines)
