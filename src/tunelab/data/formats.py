"""Turn rows of alpaca, sharegpt, openai and plain-text datasets into one internal form.

Chat samples (stage sft) become

    {"messages": [{"role": ..., "content": str}, ...], "system": str | None, "tools": str | None}

where roles alternate prompt side / reply side, starting with the prompt side and ending with a reply:
prompt side `user` or `tool` (a tool's result), reply side `assistant` or `tool_call` (the assistant calling tools;
its content is a JSON list of `{"name", "arguments"}`). `tools` is a JSON list of OpenAI-style function specs
(`{"type": "function", "function": {...}}`). Text samples (stage pt) become `{"text": str}`.

A row that breaks a rule is not converted; the converter names the rule, and `invalid_report` counts the rules per
dataset so the loader can log them (and refuse a dataset where nothing is left). Converters are plain functions of
one row: adding a format is one function and one row of `CONVERTERS`.
"""

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from tunelab.data.registry import DataError, DatasetSpec

PROMPT_ROLES = ("user", "tool")
REPLY_ROLES = ("assistant", "tool_call")

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT_COLUMNS = {"messages": "conversations"}
OPENAI_COLUMNS = {"messages": "messages"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}


class Invalid(Exception):
    """Raised by a converter: the row breaks the rule named in the message."""


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # csv and parquet readers turn a column of numbers ("42") into numbers
    if not isinstance(value, str):
        raise Invalid(f"{what} is not text")
    return value


def _column(row: dict[str, Any], column: str) -> Any:
    if column not in row:
        raise Invalid(f"missing column {column!r}")
    return row[column]


def _optional(row: dict[str, Any], columns: dict[str, str], key: str) -> Any:
    """The value of an optional column declared in `columns` (LLaMA-Factory reads these only when declared)."""
    return _column(row, columns[key]) if key in columns else None


def from_alpaca(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    columns = {**ALPACA_COLUMNS, **spec.columns}
    instruction = _text(_column(row, columns["prompt"]), "instruction")
    query = _text(row.get(columns["query"]), "input")
    response = _text(_column(row, columns["response"]), "response")
    messages = []
    for turn in _optional(row, columns, "history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise Invalid("history entry is not a [prompt, response] pair")
        messages += [{"role": "user", "content": _text(turn[0], "history prompt")},
                     {"role": "assistant", "content": _text(turn[1], "history response")}]
    # LLaMA-Factory's rule: the user turn is instruction and input joined by a newline, empty parts left out.
    prompt = "\n".join(part for part in (instruction, query) if part)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return _chat(messages, _optional(row, columns, "system"), _optional(row, columns, "tools"))


def from_sharegpt(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    return _from_messages(row, {**SHAREGPT_COLUMNS, **spec.columns}, {**SHAREGPT_TAGS, **spec.tags})


def from_openai(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    return _from_messages(row, {**OPENAI_COLUMNS, **spec.columns}, {**OPENAI_TAGS, **spec.tags})


def _from_messages(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
    """A list of role-tagged messages (sharegpt and openai differ only in their default column and tag names)."""
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["observation_tag"]: "tool",
             tags["function_tag"]: "tool_call", tags["system_tag"]: "system"}
    turns = _column(row, columns["messages"])
    if not isinstance(turns, list):
        raise Invalid(f"column {columns['messages']!r} is not a list of messages")
    system = _optional(row, columns, "system")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise Invalid("a message is not an object")
        tag = turn.get(tags["role_tag"])
        if tag not in roles:
            raise Invalid(f"unknown role {tag!r}")
        role = roles[tag]
        if role == "assistant" and turn.get("tool_calls"):  # OpenAI style: an assistant message calling tools
            messages.append({"role": "tool_call", "content": _tool_calls_from_openai(turn["tool_calls"])})
            continue
        content = _text(turn.get(tags["content_tag"]), "message content")
        if role == "system" and not messages:  # a leading system turn is the system prompt
            system = content
            continue
        messages.append({"role": role, "content": content})
    return _chat(messages, system, _optional(row, columns, "tools"))


def from_text(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    text = _text(_column(row, spec.columns.get("prompt", "text")), "text")
    if not text.strip():
        raise Invalid("empty text")
    return {"text": text}


#: formatting (dataset_info.json) -> converter for chat samples. Plain text (stage pt) reads one column instead.
CONVERTERS: dict[str, Callable[[dict, DatasetSpec], dict]] = {
    "alpaca": from_alpaca, "sharegpt": from_sharegpt, "openai": from_openai,
}


def _chat(messages: list[dict[str, str]], system: Any, tools: Any) -> dict[str, Any]:
    """Check the turn order and the replies, and normalise tool calls and tool specs to canonical JSON."""
    if any(m["role"] == "system" for m in messages):
        raise Invalid("system message after the first turn")
    for i, message in enumerate(messages):
        if message["role"] not in (PROMPT_ROLES if i % 2 == 0 else REPLY_ROLES):
            raise Invalid("roles not alternating user/assistant")
    if not messages or len(messages) % 2:
        raise Invalid("conversation does not end with an assistant reply")
    for message in messages:
        if message["role"] == "assistant" and not message["content"].strip():
            raise Invalid("empty response")
        if message["role"] == "tool_call":
            message["content"] = _canonical_tool_calls(message["content"])
    system = _text(system, "system prompt") or None
    return {"messages": messages, "system": system, "tools": _canonical_tools(tools)}


def _parsed_json(value: Any, what: str) -> Any:
    """A JSON string parsed (datasets store tool calls and schemas either way); anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise Invalid(f"{what} is not valid JSON") from None


def _canonical_tool_calls(content: Any) -> str:
    calls = _parsed_json(content, "function call")
    if isinstance(calls, dict):
        calls = [calls]
    if not calls or not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        raise Invalid("function call is not valid JSON")
    return json.dumps([{"name": c["name"], "arguments": c.get("arguments", {})} for c in calls], ensure_ascii=False)


def _tool_calls_from_openai(tool_calls: Any) -> list[dict[str, Any]]:
    calls = []
    for call in tool_calls if isinstance(tool_calls, list) else []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        # The OpenAI API sends arguments as a JSON string.
        arguments = _parsed_json(function.get("arguments", {}), "function call")
        calls.append({"name": function.get("name"), "arguments": arguments})
    return calls


def _canonical_tools(tools: Any) -> str | None:
    if tools in (None, "", []):
        return None
    tools = _parsed_json(tools, "tools")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise Invalid("tools are not valid JSON")
    if not tools:
        return None
    wrapped = [t if "type" in t else {"type": "function", "function": t} for t in tools]
    return json.dumps(wrapped, ensure_ascii=False)


def convert_batch(batch: dict[str, list], *, spec: DatasetSpec, stage: str) -> dict[str, list]:
    """`datasets.map(batched=True)` function: convert every row, recording in `_rule` why a row was refused."""
    convert = from_text if stage == "pt" else CONVERTERS[spec.formatting]
    empty = {"text": ""} if stage == "pt" else {"messages": [], "system": None, "tools": None}
    out: dict[str, list] = {key: [] for key in (*empty, "_rule")}
    for values in zip(*batch.values()):
        row = dict(zip(batch.keys(), values))
        try:
            sample, rule = convert(row, spec), ""
        except Invalid as err:
            sample, rule = empty, str(err)
        for key in empty:
            out[key].append(sample[key])
        out["_rule"].append(rule)
    return out


def features(stage: str):
    """The Arrow schema of the internal form (declared, so datasets with and without system prompts concatenate)."""
    from datasets import Features, List, Value

    if stage == "pt":
        return Features({"text": Value("string"), "_rule": Value("string")})
    return Features({"messages": List({"role": Value("string"), "content": Value("string")}),
                     "system": Value("string"), "tools": Value("string"), "_rule": Value("string")})


def invalid_report(spec: DatasetSpec, rules: list[str], rows: list[int] | None = None) -> tuple[int, str]:
    """Count the refused rows per rule: (number refused, one line per rule with the first offending row).

    `rows` maps positions in `rules` to rows of the file (when the dataset was sampled).
    """
    counts = Counter(rule for rule in rules if rule)
    first = {}
    for index, rule in enumerate(rules):
        if rule and rule not in first:
            first[rule] = rows[index] if rows is not None else index
    lines = [f"{rule}: {count} (first: {spec.where} row {first[rule]})" for rule, count in counts.most_common()]
    return sum(counts.values()), "; ".join(lines)


def check_not_empty(spec: DatasetSpec, rules: list[str], stage: str, rows: list[int] | None = None) -> None:
    """Refuse a dataset where no row survived, saying which rules removed how many."""
    refused, detail = invalid_report(spec, rules, rows)
    if refused == len(rules):
        usage = (f"as stage pt text (column {spec.columns.get('prompt', 'text')!r})" if stage == "pt"
                 else f"as `formatting: {spec.formatting}`")
        raise DataError(f"dataset {spec.name!r} ({spec.where}): none of its {len(rules)} samples is usable "
                        f"{usage}: {detail or 'the dataset is empty'}")
