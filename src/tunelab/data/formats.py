"""Turn rows of alpaca, sharegpt, openai and plain-text datasets into one internal form.

A chat sample, whatever its file looked like:

    {"messages": [{"role": ..., "content": str}, ...],   # the conversation (without the system prompt)
     "system": str | None, "tools": str | None,          # tools: a JSON list of {"type": "function", "function": ...}
     "chosen": message | None, "rejected": message | None,   # preference datasets: the two replies to `messages`
     "kto_tag": bool | None,                             # KTO datasets: whether the last reply is desirable
     "images": [str], "videos": [str], "audios": [str]}  # resolved file paths (or URLs), one per placeholder

Roles alternate prompt side / reply side, starting with the prompt side: prompt side `user` or `tool` (a tool's
result), reply side `assistant` or `tool_call` (the assistant calling tools; its content is a JSON list of
`{"name", "arguments"}`). What the conversation ends with depends on the stage's data kind (config/stages.py):

    sft (sft)                       ends with the reply; every reply is trained
    pairwise (rm, dpo, orpo, simpo) ends on the prompt side; `chosen` and `rejected` answer it
    kto (kto)                       ends with the reply that `kto_tag` judges
    prompt (ppo, grpo)              ends on either side (a final reply is the reference answer)

A pre-training sample (stage pt) is `{"text": str}`. A row that cannot become a sample is not converted: its rule
(validation.RULES) is recorded instead, and `validation.check_dataset` reports them per dataset. Adding a format is
one converter function and one row of `CONVERTERS`.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.data.detect import TEXT_COLUMN
from tunelab.data.gc_paused import gc_paused
from tunelab.data.registry import check_stage, data_kind
from tunelab.data.spec import DataError, DatasetSpec
from tunelab.data.validation import MEDIA_PLACEHOLDERS, REPLY_ROLES, Invalid, check_sample

#: The `columns` keys each formatting reads; a declared one must be a column of the file.
COLUMNS_READ = {
    "alpaca": ("prompt", "query", "response", "history", "system", "tools", "images", "videos", "audios", "chosen",
               "rejected", "kto_tag"),
    "sharegpt": ("messages", "system", "tools", "images", "videos", "audios", "chosen", "rejected", "kto_tag"),
}
COLUMNS_READ["openai"] = COLUMNS_READ["sharegpt"]
#: The columns without which a formatting reads nothing (alpaca replies too, unless they are chosen/rejected).
CORE_COLUMNS = {"alpaca": ("prompt",), "sharegpt": ("messages",), "openai": ("messages",)}
#: tag key -> the internal role of messages with that tag
ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool", "function_tag": "tool_call",
             "system_tag": "system"}
#: Media given as these are not checked for existence (they are fetched when the sample is processed).
URL_PREFIXES = ("http://", "https://", "data:")
#: kto_tag values from text columns (csv) that mean true or false.
KTO_WORDS = {"true": True, "false": False, "1": True, "0": False}


#: Column of the converted rows: the fields of a valid row whose numbers were read as text ("; "-separated), for
#: the warning of `validation.check_dataset`.
NUMBERS_COLUMN = "_numbers_as_text"
#: The fields of the row being converted whose numbers `_text` read as text; `convert_batch` empties it per row.
#: Module state rather than a parameter of every converter: only `_text` adds to it, only `convert_batch` reads it.
_numbers_read: list[str] = []


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # The rule: a number where text belongs is read as its text, and counted for a warning. csv and parquet
        # readers make a column of numbers ("42") numbers, and a JSON file may hold a number as a reply.
        _numbers_read.append(what)
        return str(value)
    if not isinstance(value, str):
        raise Invalid("not text", f"{what} is {type(value).__name__}")
    return value


def _column(row: dict[str, Any], spec: DatasetSpec, key: str) -> Any:
    """The value of the column holding `key`; None where the dataset has no such column (it is then not read)."""
    column = spec.column(key)
    return row.get(column) if column is not None else None


def _required(row: dict[str, Any], spec: DatasetSpec, key: str) -> Any:
    value = _column(row, spec, key)
    if value is None:
        raise Invalid("missing value", spec.column(key))
    return value


def from_alpaca(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    messages = []
    history = _column(row, spec, "history")
    if history is not None and not isinstance(history, list):
        raise Invalid("bad history", f"history is {type(history).__name__}")
    for turn in history or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise Invalid("bad history", f"entry {turn!r:.60}")
        messages += [{"role": "user", "content": _text(turn[0], "a history prompt")},
                     {"role": "assistant", "content": _text(turn[1], "a history response")}]
    # LLaMA-Factory's rule: the user turn is instruction and input joined by a newline, empty parts left out.
    parts = (_text(_column(row, spec, "prompt"), "the instruction"), _text(_column(row, spec, "query"), "the input"))
    messages.append({"role": "user", "content": "\n".join(part for part in parts if part)})
    response = _column(row, spec, "response") if not spec.ranking else None
    if response is not None:  # no response: a prompt-only sample (ppo), or "assistant turn missing"
        messages.append({"role": "assistant", "content": _text(response, "the response")})
    pair = [{"role": "assistant", "content": _text(_required(row, spec, key), key)}
            for key in ("chosen", "rejected")] if spec.ranking else None
    return _sample(row, spec, messages, _column(row, spec, "system"), pair)


def from_messages(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """sharegpt and openai: a list of role-tagged messages (the two differ in their default columns and tags)."""
    tag = spec.tag
    roles = {tag(key): role for key, role in ROLE_TAGS.items() if tag(key) is not None}
    turns = _required(row, spec, "messages")
    if not isinstance(turns, list):
        raise Invalid("malformed messages", f"column {spec.column('messages')!r} holds {type(turns).__name__}")
    messages = [_message(turn, roles, spec) for turn in turns]
    system = _column(row, spec, "system")
    if messages and messages[0]["role"] == "system":  # a leading system turn is the system prompt
        system = messages.pop(0)["content"]
    if any(m["role"] == "system" for m in messages):
        raise Invalid("system turn not first")
    pair = [_reply(_required(row, spec, key), roles, spec, key) for key in ("chosen", "rejected")] \
        if spec.ranking else None
    return _sample(row, spec, messages, system, pair)


def _message(turn: Any, roles: dict[str, str], spec: DatasetSpec) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise Invalid("malformed messages", f"a message is {type(turn).__name__}")
    tag = turn.get(spec.tag("role_tag"))
    if not isinstance(tag, str) or tag not in roles:  # a list or an object cannot even be looked up
        raise Invalid("unknown role", f"{tag!r:.60}")
    role = roles[tag]
    if role == "assistant" and turn.get("tool_calls"):  # OpenAI style: an assistant message calling tools
        return {"role": "tool_call", "content": canonical_tool_calls(turn["tool_calls"])}
    content = _text(turn.get(spec.tag("content_tag")), f"the content of a {tag} message")
    return {"role": role, "content": canonical_tool_calls(content) if role == "tool_call" else content}


def _reply(value: Any, roles: dict[str, str], spec: DatasetSpec, key: str) -> dict[str, str]:
    """A preference reply: one message, or a conversation whose last message is the reply."""
    if isinstance(value, list) and value:
        value = value[-1]
    reply = _message(value, roles, spec)
    if reply["role"] not in REPLY_ROLES:
        raise Invalid("not a reply", f"{key} is a {reply['role']} message")
    return reply


def canonical_tool_calls(value: Any) -> str:
    """Tool calls (a call or a list; OpenAI's `{"function": ...}` wrapping and JSON-text arguments accepted) as
    canonical JSON: a list of {"name", "arguments"} with object arguments. Raises `Invalid` naming the problem."""
    calls = _parsed_json(value, "invalid tool call")
    calls = calls if isinstance(calls, list) else [calls]
    canonical = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None  # OpenAI wraps it in "function"
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Invalid("invalid tool call", "a call without a function name")
        arguments = _parsed_json(function.get("arguments", {}), "invalid tool call")  # the OpenAI API sends text
        if not isinstance(arguments, dict):
            raise Invalid("invalid tool call", f"arguments of {function['name']!r} are not an object")
        canonical.append({"name": function["name"], "arguments": arguments})
    if not canonical:
        raise Invalid("invalid tool call", "no call")
    return json.dumps(canonical, ensure_ascii=False)


def _tools(value: Any) -> str | None:
    if value in (None, "", []):
        return None
    tools = _parsed_json(value, "invalid tools")
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise Invalid("invalid tools", "not a list of function specs")
    if not tools:
        return None
    wrapped = [t if "type" in t else {"type": "function", "function": t} for t in tools]
    return json.dumps(wrapped, ensure_ascii=False)


def _parsed_json(value: Any, rule: str) -> Any:
    """A JSON string parsed (datasets store tool calls and schemas either way); anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise Invalid(rule, f"not JSON ({err.msg} at column {err.colno})") from None


def _kto_tag(row: dict[str, Any], spec: DatasetSpec) -> bool | None:
    if spec.column("kto_tag") is None:
        return None
    value = _column(row, spec, "kto_tag")
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if word not in KTO_WORDS:
        raise Invalid("kto tag not boolean", repr(value))
    return KTO_WORDS[word]


def _media(row: dict[str, Any], spec: DatasetSpec, key: str) -> list[str]:
    value = _column(row, spec, key)
    items = [] if value is None else value if isinstance(value, list) else [value]
    return [_media_path(item, spec.media_dir, key) for item in items]


def _media_path(item: Any, media_dir: Path | None, key: str) -> str:
    if not isinstance(item, str):
        raise Invalid("media not a path", f"{key} holds {type(item).__name__}")
    if item.startswith(URL_PREFIXES):
        return item
    # As in LLaMA-Factory: relative to media_dir (dataset_dir) first, then as written (to the working directory).
    candidates = [media_dir / item] if media_dir is not None else []
    for candidate in [*candidates, Path(item)]:
        if candidate.is_file():
            return str(candidate)
    raise Invalid("media file not found", str(candidates[0] if candidates else item))


def _sample(row: dict[str, Any], spec: DatasetSpec, messages: list[dict[str, str]], system: Any,
            pair: list[dict[str, str]] | None) -> dict[str, Any]:
    """The internal form, from the parts every chat format shares."""
    chosen, rejected = pair or (None, None)
    return {"messages": messages, "system": _text(system, "the system prompt") or None,
            "tools": _tools(_column(row, spec, "tools")), "chosen": chosen, "rejected": rejected,
            "kto_tag": _kto_tag(row, spec), **{key: _media(row, spec, key) for key in MEDIA_PLACEHOLDERS}}


def text_column(spec: DatasetSpec) -> str | None:
    """The column of pre-training text: `columns.prompt` (as in LLaMA-Factory), or `text` without a `columns` object."""
    return spec.columns.get("prompt") if spec.columns is not None else TEXT_COLUMN


def from_text(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    text = _text(row[text_column(spec)], "the text")
    if not text.strip():
        raise Invalid("empty text")
    return {"text": text}


#: formatting (dataset_info.json) -> converter for chat samples. Plain text (stage pt) reads one column instead.
CONVERTERS: dict[str, Callable[[dict, DatasetSpec], dict]] = {
    "alpaca": from_alpaca, "sharegpt": from_messages, "openai": from_messages,
}
EMPTY_TEXT = {"text": ""}
EMPTY_CHAT = {"messages": [], "system": None, "tools": None, "chosen": None, "rejected": None, "kto_tag": None,
              "images": [], "videos": [], "audios": []}


@gc_paused
def convert_batch(batch: dict[str, list], *, spec: DatasetSpec, stage: str) -> dict[str, list]:
    """`datasets.map(batched=True)` function: convert every row, recording in `_rule` why a row was refused.

    Raises DataError when the dataset cannot serve the stage, or lacks a column it needs (a problem of the whole
    file, not of one sample)."""
    check_stage(spec, stage)
    kind = data_kind(stage)
    check_columns(spec, list(batch), kind)
    convert = from_text if kind == "pt" else CONVERTERS[spec.formatting]
    media = tuple(key for key in MEDIA_PLACEHOLDERS if spec.column(key))
    empty = EMPTY_TEXT if kind == "pt" else EMPTY_CHAT
    out: dict[str, list] = {key: [] for key in (*empty, "_rule", NUMBERS_COLUMN)}
    for values in zip(*batch.values()):
        row = dict(zip(batch, values))
        _numbers_read.clear()
        try:
            sample = convert(row, spec)
            if kind != "pt":
                check_sample(sample, kind, media)
            rule = ""
        except Invalid as err:
            sample, rule = empty, str(err)
        for key in empty:
            out[key].append(sample[key])
        out["_rule"].append(rule)
        out[NUMBERS_COLUMN].append("" if rule else "; ".join(dict.fromkeys(_numbers_read)))
    return out


def check_columns(spec: DatasetSpec, available: list[str], kind: str) -> None:
    """Refuse a dataset whose file lacks a column its format needs or its entry declares."""
    where = f"dataset {spec.name!r} ({spec.where})"
    if kind == "pt":
        needed = {"prompt": text_column(spec)}
    else:
        declared = spec.columns or {}  # the defaults of the other columns are optional (an `input` column may lack)
        needed = {key: declared[key] for key in COLUMNS_READ[spec.formatting] if key in declared}
        core = CORE_COLUMNS[spec.formatting]
        if spec.formatting == "alpaca" and kind in ("sft", "kto") and not spec.ranking:
            core += ("response",)
        needed.update({key: spec.column(key) for key in core})
    for key, column in needed.items():
        if column is None:
            raise DataError(f"{where}: its `columns` object names no `{key}` column; as in LLaMA-Factory, a `columns` "
                            f"object replaces the default columns, so name every column the dataset uses")
        if column not in available:
            source = f"`columns.{key}`" if spec.columns is not None else f"the default column for `{key}`"
            raise DataError(f"{where}: no column {column!r} ({source}); its columns are {', '.join(available)}. Name "
                            f"the right column under `columns` in dataset_info.json")


def features(stage: str) -> Any:
    """The Arrow schema of the internal form (declared, so datasets with and without system prompts concatenate)."""
    from datasets import Features, List, Value

    internal = {"_rule": Value("string"), NUMBERS_COLUMN: Value("string")}
    if data_kind(stage) == "pt":
        return Features({"text": Value("string"), **internal})
    message = {"role": Value("string"), "content": Value("string")}
    return Features({"messages": List(message), "system": Value("string"), "tools": Value("string"),
                     "chosen": message, "rejected": message, "kto_tag": Value("bool"),
                     **{key: List(Value("string")) for key in MEDIA_PLACEHOLDERS}, **internal})

