"""The distributed engine a config names: its DeepSpeed JSON read and checked when the config loads, so a missing or
broken file is reported with the YAML's other problems, before anything slow.

    settings = deepspeed_settings("examples/deepspeed/ds_z3_config.json")   # the JSON as a dict; ValueError says why
    zero_stage(config)                                                      # 3, or None without DeepSpeed
"""

from pathlib import Path
from typing import Any

from tunelab.config.files import parse_json, read_text


def deepspeed_settings(value: Any) -> dict[str, Any]:
    """The DeepSpeed config given as `deepspeed:` (a JSON file's path, relative to the folder the run starts from, as
    transformers reads it; or the settings inline). ValueError naming the file, line and column of a problem."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected the path of a DeepSpeed JSON file or its settings as a mapping, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{value} does not exist (a relative path is read from {Path.cwd()}); tunelab ships the usual "
                         f"files in its examples/deepspeed/ (ds_z0_config.json ... ds_z3_offload_config.json)")
    settings = parse_json(read_text(path), value)  # ConfigError (a ValueError) naming the line and column
    if not isinstance(settings, dict):
        raise ValueError(f"{value}: expected a JSON object of DeepSpeed settings")
    return settings


def zero_stage(config: Any) -> int | None:
    """The ZeRO stage of the config's DeepSpeed settings (0 when they name none), or None without DeepSpeed."""
    value = config.extra_training_args.get("deepspeed")
    if not value:
        return None
    try:
        stage = deepspeed_settings(value).get("zero_optimization", {}).get("stage", 0)
    except (ValueError, AttributeError):
        return None   # reported when the config loaded
    return stage if isinstance(stage, int) else None
