"""Bad configs, generated: whatever a config file or a command-line value holds, loading it either gives a Config or
raises one ConfigError naming the file (or the command line); through the real CLI, exit status 2, one message and no
traceback. Beside the properties, the known cases each have a test with the exact message.

    .venv/bin/python -m pytest tests/config/test_bad_input_properties.py -q --hypothesis-show-statistics

Examples are derandomized (the `ci` profile of tests/conftest.py) and budgeted per test (about 20 s in all).
"""

import dataclasses
import json
import subprocess
import sys
import typing

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tunelab.cli import UsageError, parse_overrides
from tunelab.config import ConfigError, load_config
from tunelab.config.load import PASSTHROUGH_TYPES, SCHEMA_KEYS
from tunelab.config.passthrough import PASSTHROUGH_TRAINING_KEYS
from tunelab.data import DataError, resolve_datasets
from helpers import REPO

#: A config that loads, one `key: value` line each (as a user writes it).
BASE = {"model_name_or_path": "some/model", "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset": "identity", "dataset_dir": str(REPO / "data"), "template": "chatml", "output_dir": "out",
        "learning_rate": 1.0e-4, "num_train_epochs": 3.0, "per_device_train_batch_size": 2}
KEYS = sorted(SCHEMA_KEYS | PASSTHROUGH_TRAINING_KEYS)
#: Values of every YAML/JSON kind, nested a little.
VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=3),
                      max_leaves=6)
#: Names no table of the config layer knows (every known-key table holds lowercase words joined by underscores).
UNKNOWN_KEYS = st.from_regex(r"[a-z]{2,8}_X[a-z0-9]{0,6}", fullmatch=True)


def lines(values: dict) -> list[str]:
    return [f"{key}: {json.dumps(value)}" for key, value in values.items()]


def refusal(path, overrides=()) -> str | None:
    """The message refusing the config file at `path` (with overrides), or None when it loads, read as `tunelab train`
    reads it before torch: the config, then its datasets. Anything but a ConfigError fails the test; a refused config
    names its file (or the command line), a refused dataset names the dataset."""
    try:
        config = load_config(path, overrides)
    except ConfigError as err:
        event("refused: the config")
        assert str(path) in str(err) or "command line: " in str(err), str(err)
        return str(err)
    try:
        resolve_datasets(config.dataset, config.dataset_dir, config.stage)
        resolve_datasets(config.eval_dataset, config.dataset_dir, config.stage)
    except DataError as err:  # a byte changed in `dataset_dir`, say
        event("refused: a dataset")
        assert "dataset " in str(err), str(err)
        return str(err)
    event("loaded")
    return None


def utf8_offset(data: bytes) -> int | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return None


# ---------------------------------------------------------------- generated configs, loaded in process


@settings(max_examples=150)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".yaml", ".json"]))
def test_any_bytes_are_a_config_or_one_error_naming_the_file(data, suffix, tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / f"cfg{suffix}"
    path.write_bytes(data)
    message = refusal(path)
    offset = utf8_offset(data)
    if offset is not None:
        assert f"not UTF-8 text: byte 0x{data[offset]:02x} at byte offset {offset} " in message


#: YAML scalars Python may fail to make: a 5000-digit integer, a date that does not exist, nan, tags, aliases.
ODD_SCALARS = ["1" * 5000, "2020-13-45", ".nan", "-.inf", "!!binary AAAA", "*undefined", "&a [*a, *a]", "0x1F",
               "!!set {a, b}", "!!python/name:os.system", "2001-12-14t21:59:43.10-05:00", "'unclosed", "@reserved"]
#: How a good config is broken: (kind, where, the change). Each kind says what the refusal must name.
BROKEN = st.one_of(
    st.tuples(st.just("unknown key"), UNKNOWN_KEYS, VALUES),
    st.tuples(st.just("duplicate key"), st.sampled_from(sorted(BASE)), VALUES),
    # Deep enough to read, and far too deep (about 1 s each for PyYAML, which recurses until it gives up).
    st.tuples(st.just("deep nesting"), st.sampled_from(sorted(set(KEYS) - set(BASE))), st.sampled_from([2, 40, 5000])),
    st.tuples(st.just("bytes"), st.integers(0, 400), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("odd scalar"), st.sampled_from(sorted(set(KEYS) - set(BASE))), st.sampled_from(ODD_SCALARS)),
)
MUTATIONS = st.tuples(st.just("wrong value"), st.sampled_from(KEYS), VALUES) | BROKEN


@settings(max_examples=120)
@given(mutation=MUTATIONS, suffix=st.sampled_from([".yaml", ".json"]))
def test_a_broken_config_is_refused_by_file_and_what_broke(mutation, suffix, tmp_path_factory):
    kind, where, change = mutation
    event(kind)
    path = tmp_path_factory.mktemp("mutated") / f"cfg{suffix}"
    body = lines(BASE)
    if kind in ("wrong value", "unknown key"):
        body.append(f"{where}: {json.dumps(change)}")
    elif kind == "odd scalar":
        body.append(f"{where}: {change}")
    elif kind == "duplicate key":
        body.append(f"{where}: {json.dumps(change)}")
    elif kind == "deep nesting":
        body.append(f"{where}: {'[' * change}{']' * change}")
    text = "\n".join(body) + "\n" if suffix == ".yaml" else "{" + ",\n".join(
        f'"{line.split(": ", 1)[0]}": {line.split(": ", 1)[1]}' for line in body) + "}\n"
    data = text.encode()
    if kind == "bytes":
        data = data[:where] + change + data[where:]
    path.write_bytes(data)
    message = refusal(path)
    if kind == "unknown key":
        assert f"unknown key `{where}`" in message
    elif kind == "duplicate key":
        assert f"appears twice in one {'mapping' if suffix == '.yaml' else 'object'}" in message and where in message
        assert f"(first at line {list(BASE).index(where) + 1})" in message
    elif kind == "deep nesting" and change == 5000:
        assert "nested" in message and "more" in message
    elif kind == "odd scalar" and change == "1" * 5000:
        assert f"{path}:{len(body)}:" in message and "a number of more than 4300 digits" in message
    elif kind == "bytes" and utf8_offset(data) is not None:
        assert f"at byte offset {utf8_offset(data)} " in message


@settings(max_examples=150)
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS) | UNKNOWN_KEYS, st.text(max_size=20)), max_size=4))
def test_command_line_values_are_taken_by_their_key_or_refused_naming_the_command_line(pairs, tmp_path_factory):
    path = tmp_path_factory.mktemp("overrides") / "cfg.yaml"
    path.write_text("\n".join(lines(BASE)) + "\n")
    message = refusal(path, pairs)
    if any(key not in SCHEMA_KEYS and key not in PASSTHROUGH_TRAINING_KEYS for key, _ in pairs):
        assert "command line: unknown key" in message


@settings(max_examples=150)
@given(args=st.lists(st.text(max_size=12) | st.sampled_from(["--", "=", "--x", "a=b", "--lr=1"]), max_size=5))
def test_any_argument_list_is_parsed_or_refused_as_usage(args):
    try:
        pairs = parse_overrides(args)
    except UsageError:
        event("usage error")
        return
    event("parsed")
    assert all(key for key, _ in pairs)


# ---------------------------------------------------------------- the real command line, a few examples


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, errors="replace",
                          timeout=120, cwd=cwd)


@settings(max_examples=4)
@given(mutation=BROKEN, command=st.sampled_from(["train", "data"]))
def test_the_cli_exits_2_with_one_message_and_no_traceback(mutation, command, tmp_path_factory):
    kind, where, change = mutation
    path = tmp_path_factory.mktemp("cli") / "cfg.yaml"
    body = "\n".join(lines(BASE)) + "\n"
    if kind == "bytes":
        data = body.encode()[:where] + change + body.encode()[where:]
    else:
        value = "[" * change + "]" * change if kind == "deep nesting" else change if kind == "odd scalar" else \
            json.dumps(change)
        data = f"{body}{where}: {value}\n".encode()
    path.write_bytes(data)
    message = refusal(path)
    if message is None or str(path) not in message:
        return  # the change left a valid config (or one whose dataset the data tests cover)
    result = run_cli(*(["train"] if command == "train" else ["data", "preview"]), str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("tunelab: error: ") and str(path) in result.stderr


# ---------------------------------------------------------------- the known cases, with their messages


def test_a_yaml_config_that_is_not_utf8_is_named_with_line_and_byte_offset(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"model_name_or_path: m\nlearning_rate: 1e-4 \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: not UTF-8 text: byte 0xff at byte offset 42 cannot be decoded "
                                          r"\(invalid start byte\); save the file as UTF-8$"):
        load_config(path)


@pytest.mark.parametrize("suffix, text, message", [
    (".yaml", "model_name_or_path: m\nlearning_rate: 1e-4\nlearning_rate: 2e-4\n",
     r":3:1: key `learning_rate` appears twice in one mapping \(first at line 2\): keep one$"),
    (".yaml", "model_name_or_path: m\nfsdp_config:\n  version: 2\n  version: 1\n",
     r":4:3: key `version` appears twice in one mapping \(first at line 3\): keep one$"),
    (".json", '{"model_name_or_path": "m",\n "learning_rate": 1e-4,\n "learning_rate": 2e-4}',
     r':3:2: key "learning_rate" appears twice in one object \(first at line 2\): keep one$'),
    (".yaml", "model_name_or_path: m\nlora_target: " + "[" * 5000 + "]" * 5000 + "\n",
     r":2:5013: YAML nested 5000 levels deep, more deeply than can be read: flatten it$"),
    (".json", '{"model_name_or_path": "m", "lora_target": ' + "[" * 5000 + "]" * 5000 + "}",
     r":1:5043: JSON nested 5001 levels deep, more than can be read \(about \d+\): flatten it$"),
])
def test_a_key_written_twice_or_nested_too_deep_is_named_where_it_is(suffix, text, message, tmp_path):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}{message}"):
        load_config(path)


def test_yaml_merge_keys_may_still_override_what_they_merge(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model_name_or_path: m\ngradient_checkpointing_kwargs: &defaults {use_reentrant: false, a: 1}\n"
                    "lr_scheduler_kwargs:\n  <<: *defaults\n  a: 2\n")
    assert load_config(path).extra_training_args["lr_scheduler_kwargs"] == {"use_reentrant": False, "a": 2}


def test_a_folder_a_byte_order_mark_and_a_forbidden_character(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: is a folder, expected a file$"):
        load_config(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"\xef\xbb\xbfmodel_name_or_path: m\n")   # Windows editors write UTF-8 with a BOM
    assert load_config(path).model_name_or_path == "m"
    path.write_text("model_name_or_path: m\x00\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1:22: invalid YAML: special characters are not allowed "
                                          r"\(character U\+0000\)$"):
        load_config(path)


def test_passed_through_training_keys_take_their_type_or_are_refused_by_key():
    assert load_config(BASE, [("weight_decay", "0.01"), ("push_to_hub", "no")]).extra_training_args == {
        "weight_decay": 0.01, "push_to_hub": False}
    with pytest.raises(ConfigError, match=r"command line: `weight_decay`: got 'abc'; expected a number"):
        load_config(BASE, [("weight_decay", "abc")])
    with pytest.raises(ConfigError, match=r"config: `adam_beta2`: got \{'x': 1\}; expected a number"):
        load_config({**BASE, "adam_beta2": {"x": 1}})


def test_the_types_of_passed_through_keys_are_those_of_transformers():
    from transformers import TrainingArguments

    declared = {f.name: f.type for f in dataclasses.fields(TrainingArguments)}
    for key, kind in PASSTHROUGH_TYPES.items():
        assert key in PASSTHROUGH_TRAINING_KEYS
        assert declared[key] in (kind, kind | None, typing.Optional[kind]), (key, declared[key])


@pytest.mark.parametrize("value, message", [
    (float("nan"), "got nan; expected a finite number"), ("-inf", "got '-inf'; expected a finite number"),
    (10**400, "got 1000000000"), (True, "got True; expected a number")])
def test_a_number_that_is_not_finite_is_refused(value, message):
    with pytest.raises(ConfigError, match=rf"config: `learning_rate`: {message}"):
        load_config({**BASE, "learning_rate": value})


def test_a_deepspeed_file_nested_too_deep_is_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": ' + "[" * 3000 + "]" * 3000 + "}")
    with pytest.raises(ConfigError, match=rf"config: `deepspeed`: {path}:1:3022: JSON nested 3001 levels deep"):
        load_config({**BASE, "deepspeed": str(path)})


def test_yaml_read_as_the_safe_loader_reads_it():
    """The loader that refuses duplicate keys reads everything else as yaml.safe_load does."""
    from tunelab.config.files import parse_yaml

    text = ("a: 1\nb: [1, 2.5, null, true, 1e-4, 1.0e-4]\nc: {d: x, e: 2020-01-01}\nf: !!str 5\n"
            "g: &g {h: [1]}\ni: *g\nj: |\n  two\n  lines\n")
    assert parse_yaml(text, "x.yaml") == yaml.safe_load(text)
