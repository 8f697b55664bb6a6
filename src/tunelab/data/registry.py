"""Which datasets a run names, and where and in which format they are: `dataset_info.json` entries and data files.

    specs = resolve_datasets(["alpaca_en_demo", "my/data.jsonl"], "data", stage="sft")

A name is looked up in `{dataset_dir}/dataset_info.json`, whose schema is LLaMA-Factory's (its data/README.md), so a
user's file works as is. Beyond LLaMA-Factory, a name that is not registered may be the path of a data file or folder
(relative to the working directory or to `dataset_dir`); its format is then detected from its first sample
(`spec_for_path`). Or the path of a LLaMA-Factory v1 dataset yaml, which names several datasets
(`read_v1_datasets`; v1 configs name one as `train_dataset`). Hub datasets (`hf_hub_url`, `ms_hub_url`) are read by
`read_hub_dataset`.

Only the standard library is imported here: tunelab checks dataset names and files before torch, transformers or
datasets load. pyarrow (parquet and arrow files) and datasets (hubs) are imported inside the functions that read them.
"""

import difflib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from tunelab.config.files import parse_json, parse_yaml, read_text
from tunelab.config.llamafactory_v1 import HUB, NO_CONVERTER
from tunelab.config.stages import STAGE_SPECS
from tunelab.data.detect import first_record, spec_for_path
from tunelab.data.spec import (COLUMN_KEYS, DATASET_KINDS, ENTRY_KEYS, FORMATTINGS, HUB_ONLY_KEYS, HUBS, KIND_SOURCES,
                               TAG_KEYS, UNSUPPORTED_SOURCES, V1_CONVERTER_COLUMNS, V1_ENTRY_KEYS, V1_PAIR, V1_SPLIT,
                               V1_STREAMING,
                               DataError, DatasetSpec, check_files, count_rows)

#: Entry keys whose value is not a string (a file, folder, repository or name).
NON_TEXT_ENTRY_KEYS = {"ranking", "num_samples", "columns", "tags"}
#: The suffixes of a LLaMA-Factory v1 dataset yaml (v1 itself takes .yaml only).
V1_YAML_SUFFIXES = (".yaml", ".yml")


def read_dataset_info(dataset_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Parse `{dataset_dir}/dataset_info.json`, naming the position of a syntax error, a byte that is not UTF-8 and a
    key written twice (a dataset registered twice, or a key twice in one entry)."""
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.exists():
        raise DataError(f"{path}: not found (`dataset_dir` must be the folder holding dataset_info.json)")
    info = parse_json(read_text(path, DataError), path, DataError)
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected an object mapping dataset names to entries")
    return path, info


def resolve_datasets(names: list[str] | None, dataset_dir: str | Path, stage: str | None = None) -> list[DatasetSpec]:
    """A spec per name: its dataset_info.json entry, or the data file it names (one per entry of a v1 dataset yaml).
    With `stage`, each dataset must be of a kind the stage trains on. Every problem found is raised at once, as one
    DataError."""
    if not names:
        return []
    info_path = Path(dataset_dir) / "dataset_info.json"
    # Needed only for names that are not paths; then a missing file is one of the problems reported.
    info = read_dataset_info(dataset_dir)[1] if info_path.exists() else {}
    problems: list[str] = []
    specs: list[DatasetSpec] = []
    for name in names:
        try:
            found = _specs_for_name(name, info, info_path, Path(dataset_dir))
        except DataError as err:
            problems.append(str(err))
            continue
        for spec in found:
            try:
                if stage is not None:
                    check_stage(spec, stage)
                specs.append(spec)
            except DataError as err:
                problems.append(str(err))
    if problems:
        raise DataError("\n".join(dict.fromkeys(problems)))  # an unknown stage is one problem, not one per name
    return specs


def data_kind(stage: str) -> str:
    """The kind of data a training stage reads (a key of `processing.PROCESSORS`)."""
    if stage not in STAGE_SPECS:
        raise DataError(f"stage {stage!r} has no data format; expected one of {', '.join(STAGE_SPECS)}")
    return STAGE_SPECS[stage].data


def check_stage(spec: DatasetSpec, stage: str) -> None:
    """Refuse a dataset whose kind the stage cannot train on (a preference dataset for sft, ...)."""
    accepted = KIND_SOURCES[data_kind(stage)]
    if spec.kind not in accepted:
        wanted = " or ".join(DATASET_KINDS[kind] for kind in accepted)
        raise DataError(f"dataset {spec.name!r} ({spec.where}) is {DATASET_KINDS[spec.kind]}; stage {stage} "
                        f"trains on {wanted}")


def _specs_for_name(name: str, info: dict[str, Any], info_path: Path, dataset_dir: Path) -> list[DatasetSpec]:
    if name in info:
        return [_make_spec(name, info[name], info_path)]
    for candidate in (Path(name), dataset_dir / name):
        if candidate.is_file() and candidate.suffix.lower() in V1_YAML_SUFFIXES:
            return read_v1_datasets(candidate)
        if candidate.exists():
            return [spec_for_path(candidate, name=name)]
    if not info_path.is_file():
        raise DataError(f"dataset {name!r}: not a file or folder, and there is no {info_path} to look it up in "
                        f"(`dataset_dir` must be the folder holding dataset_info.json)")
    close = difflib.get_close_matches(name, list(info), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
        f"; registered: {', '.join(sorted(info)[:20])}"
    raise DataError(f"{info_path}: no dataset named {name!r} (and no such file){hint}")


def _make_spec(name: str, entry: Any, info_path: Path) -> DatasetSpec:
    where = f"{info_path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with `file_name` or `hf_hub_url`")
    _check_keys(entry, ENTRY_KEYS, where, "key")
    for key in sorted(ENTRY_KEYS - NON_TEXT_ENTRY_KEYS):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise DataError(f"{where}: `{key}` must be a string, got {entry[key]!r}")
    columns, tags = entry.get("columns"), entry.get("tags")
    _check_keys({} if columns is None else columns, COLUMN_KEYS, where, "`columns` key")
    _check_keys({} if tags is None else tags, TAG_KEYS, where, "`tags` key")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: `formatting: {formatting}` is not one of {', '.join(FORMATTINGS)}")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: `ranking` must be true or false, got {ranking!r}")
    if ranking and not {"chosen", "rejected"} <= set(columns or {}):
        raise DataError(f"{where}: `ranking: true` needs `columns.chosen` and `columns.rejected` (the better and "
                        f"the worse reply)")
    if tags is not None and formatting != "alpaca" and not {"role_tag", "content_tag"} <= set(tags):
        raise DataError(f"{where}: `tags` needs `role_tag` and `content_tag` (a `tags` object replaces the default "
                        f"tags, as in LLaMA-Factory)")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise DataError(f"{where}: `num_samples` must be a positive integer, got {num_samples!r}")
    common = dict(name=name, info_path=info_path, formatting=formatting, ranking=ranking, num_samples=num_samples,
                  columns=columns, tags=tags, subset=entry.get("subset"),
                  split=entry.get("split", "train"), folder=entry.get("folder"))

    hub = _pick_hub(entry)
    if hub is not None:
        return DatasetSpec(hub=hub, hub_url=entry[f"{hub}_hub_url"], **common)
    if not entry.get("file_name"):
        for key, reason in UNSUPPORTED_SOURCES.items():
            if entry.get(key):
                raise DataError(f"{where}: {reason} (`{key}`); download the data and point `file_name` at it")
        raise DataError(f"{where}: needs `file_name` (a file or folder inside {info_path.parent}) or `hf_hub_url`")
    for key in HUB_ONLY_KEYS:
        if entry.get(key):
            raise DataError(f"{where}: `{key}` applies to hub datasets; a local file has none")
    if common["split"] != "train":
        raise DataError(f"{where}: local files have only a `train` split, got `split: {common['split']}`")
    spec = DatasetSpec(path=info_path.parent / entry["file_name"], **common)
    check_files(spec, where)
    return spec


def _pick_hub(entry: dict[str, Any]) -> str | None:
    """LLaMA-Factory's choice: ModelScope when USE_MODELSCOPE_HUB is set or it is the only hub, else Hugging Face."""
    if entry.get("ms_hub_url") and (_env_flag("USE_MODELSCOPE_HUB") or not entry.get("hf_hub_url")):
        return "ms"
    return "hf" if entry.get("hf_hub_url") else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _check_keys(mapping: Any, known: set[str], where: str, what: str) -> None:
    if not isinstance(mapping, dict):
        raise DataError(f"{where}: expected an object of {what}s, got {type(mapping).__name__}")
    for key, value in mapping.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(sorted(known))})"
            raise DataError(f"{where}: unknown {what} `{key}`{hint}")
        if what != "key" and not isinstance(value, str):
            raise DataError(f"{where}: {what} `{key}` must name a column or tag as a string, got {value!r}")


# ---------------------------------------------------------------- LLaMA-Factory v1 dataset yamls


def read_v1_datasets(path: Path) -> list[DatasetSpec]:
    """The datasets a LLaMA-Factory v1 dataset yaml lists (`name: {path, source: local, converter, size, ...}`).

    Each entry is a data file read with the columns its converter reads, `path` relative to the working directory
    (v1's loader hands it to `datasets.load_dataset` as it is), and `size` / `weight` as its `num_samples`. What
    tunelab would read differently is refused: every problem at once, each naming the yaml, the entry and the key.
    """
    entries = parse_yaml(read_text(path, DataError), path, DataError)
    if not isinstance(entries, dict) or not entries:
        raise DataError(f"{path}: expected dataset names mapped to entries (a LLaMA-Factory v1 dataset yaml), got "
                        f"{entries!r}")
    problems: list[str] = []
    specs = [_v1_spec(str(name), entry, path, problems) for name, entry in entries.items()]
    if problems:
        raise DataError("\n".join(problems))
    return specs


def _v1_spec(name: str, entry: Any, yaml_path: Path, problems: list[str]) -> DatasetSpec | None:
    """One entry as a spec, or None with its problems appended."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        problems.append(f"{yaml_path}: `{name}` (v1): expected an entry with a `path`, got {entry!r}")
        return None
    found = _v1_entry_problems(name, entry, yaml_path)
    if found:
        problems.extend(found)
        return None
    converter, size, weight = entry["converter"], entry.get("size"), entry.get("weight")
    spec = DatasetSpec(name=name, info_path=None, formatting=converter, path=Path(entry["path"]))
    try:
        check_files(spec, f"{yaml_path}: `{name}.path` (relative to the working directory, as v1 reads it)")
        first = first_record(spec.files()[0])
        core = next(iter(V1_CONVERTER_COLUMNS[converter].values()))
        if core not in first:
            raise DataError(f"{yaml_path}: `{name}.converter: {converter}`: sample 0 of {spec.files()[0]} has no "
                            f"`{core}` column, which v1's {converter} converter reads")
        # v1 draws `size` samples at random with replacement, then weight x as many again from those. tunelab's
        # num_samples takes the same number, as a seeded subset without replacement (whole copies of the dataset
        # first when larger): the same count and share of the mix, though v1 may draw a sample twice where
        # tunelab has rows to spare. v1 also counts a multi-turn conversation once per assistant turn, tunelab once.
        count = size if weight is None else int((size if size is not None else count_rows(spec)) * weight)
        if count is not None and count < 1:
            raise DataError(f"{yaml_path}: `{name}.weight: {weight}` leaves no samples of the dataset")
    except DataError as err:
        problems.append(str(err))
        return None
    columns = {key: column for key, column in V1_CONVERTER_COLUMNS[converter].items() if column in first}
    return replace(spec, columns=columns, num_samples=count)


def _v1_entry_problems(name: str, entry: dict[str, Any], yaml_path: Path) -> list[str]:
    """What is wrong with an entry's keys, or what tunelab would read otherwise than v1."""
    problems: list[str] = []

    def refuse(key: str, value: Any, reason: str) -> None:
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        problems.append(f"{yaml_path}: `{name}.{key}: {shown}` (v1) is a LLaMA-Factory setting tunelab does not "
                        f"support ({reason})")

    def invalid(key: str, message: str) -> None:
        problems.append(f"{yaml_path}: `{name}.{key}` (v1): {message}")

    for key in entry:
        if key not in V1_ENTRY_KEYS:
            close = difflib.get_close_matches(str(key), V1_ENTRY_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(V1_ENTRY_KEYS)})"
            problems.append(f"{yaml_path}: unknown key `{name}.{key}` of a v1 dataset entry{hint}")
    source, converter, split = entry.get("source", "hf_hub"), entry.get("converter"), entry.get("split", "train")
    if source != "local":
        refuse("source", source, HUB)
    if converter is None or converter == "pair":
        refuse("converter", converter, NO_CONVERTER if converter is None else V1_PAIR)
    elif not isinstance(converter, str) or converter not in V1_CONVERTER_COLUMNS:
        invalid("converter", f"got {converter!r}; expected one of: alpaca, sharegpt, pair")
    if split != "train":
        refuse("split", split, V1_SPLIT)
    if entry.get("streaming", False) is not False:
        refuse("streaming", entry["streaming"], V1_STREAMING)
    size, weight = entry.get("size"), entry.get("weight")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        invalid("size", f"got {size!r}; expected a positive integer")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
        invalid("weight", f"got {weight!r}; expected a positive number")
    return problems


# ---------------------------------------------------------------- hubs


def read_hub_dataset(spec: DatasetSpec, cache_dir: str | None = None, token: str | None = None,
                     streaming: bool = False) -> Any:
    """The rows of a hub dataset (`datasets.Dataset`, or `IterableDataset` when streaming); DataError when the hub
    cannot be reached, saying why."""
    hub = HUBS[spec.hub]
    prefix = f"dataset {spec.name!r} is on the {hub} ({spec.hub_url})"
    if spec.hub == "ms":
        try:
            from modelscope import MsDataset
        except ImportError:
            raise DataError(f"{prefix}, which needs the `modelscope` package: install it, or give the entry an "
                            f"`hf_hub_url`") from None
        load, kwargs = MsDataset.load, dict(dataset_name=spec.hub_url, subset_name=spec.subset, use_streaming=streaming)
    else:
        offline = next((name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _env_flag(name)), None)
        if offline is not None:
            raise DataError(f"{prefix}, which is not reachable: {offline} is set. Download it and point `file_name` "
                            f"at the files, or unset {offline} on a machine with network access")
        from datasets import load_dataset

        load, kwargs = load_dataset, dict(path=spec.hub_url, name=spec.subset, streaming=streaming)
    try:
        rows = load(data_dir=spec.folder, split=spec.split, cache_dir=cache_dir, token=token, **kwargs)
    except Exception as err:  # connection errors come in many types (OSError, requests, huggingface_hub, ...)
        raise DataError(f"{prefix} and could not be loaded (hub not reachable, or no such dataset, subset or "
                        f"split): {err}") from err
    # ModelScope wraps a `datasets` dataset; everything after this point reads the `datasets` one.
    return rows.to_hf_dataset() if hasattr(rows, "to_hf_dataset") else rows
