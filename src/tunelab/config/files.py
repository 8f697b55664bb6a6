"""The user's text files, read so that every problem is one error naming the file and the place in it.

    text = read_text(path, DataError)                 # UTF-8 (a leading BOM dropped)
    line = decode_utf8(raw, path, DataError, offset=1024, line=7)   # bytes read from the file at that offset and line
    value = parse_json(text, path, DataError)         # or parse_yaml(text, path); line=N for one line of a .jsonl
    value, end = parse_json(text, path, start=i)      # the JSON value at text[i:] (the first sample of an array)
    utf8_problem(path)                                # where a large file stops being UTF-8, or None

A missing, unreadable or folder path, bytes that are not UTF-8 (line and byte offset), a syntax error (line and
column), nesting deeper than the parsers can follow (where it is deepest) and a key written twice in one object or
mapping (both parsers would keep the last one silently) each raise `error` (ConfigError, or a subclass such as the
data layer's DataError) with one line of text, never a UnicodeDecodeError, RecursionError or OSError.

Only the standard library is imported (PyYAML inside `parse_yaml`): configs are refused before anything heavy loads.
"""

import functools
import json
import json.scanner
import re
import sys
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that cannot run; the message names every problem found."""


#: Bytes read at a time by `utf8_problem`, which checks files too large to hold in memory as text.
CHUNK = 1 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")
#: JSON strings (skipped whole) and brackets, to find where a document nests deepest.
_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def read_text(path: str | Path, error: type[ConfigError] = ConfigError) -> str:
    """The text of a UTF-8 file; `error` names the file when it is missing, a folder, unreadable or not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{path}: {os_problem(err)}") from None
    return decode_utf8(data, path, error).removeprefix("\ufeff")  # Windows editors start UTF-8 with a byte order mark


def decode_utf8(data: bytes, path: str | Path, error: type[ConfigError] = ConfigError, *, offset: int = 0,
                line: int = 1) -> str:
    """`data` as text; `error` names the file, line and byte offset of a byte that is not UTF-8. `offset` and `line`:
    where `data` starts in the file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(_not_utf8(path, data[err.start], offset + err.start, line + data.count(b"\n", 0, err.start),
                              err.reason)) from None


def os_problem(err: OSError) -> str:
    """Why a path cannot be read, in words (after the path)."""
    if isinstance(err, IsADirectoryError):
        return "is a folder, expected a file"
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, PermissionError):
        return "cannot be read: permission denied"
    return f"cannot be read: {err.strerror or err}"


def utf8_problem(path: Path) -> str | None:
    """`file:line: not UTF-8 ...` at the first byte that is not UTF-8, or None: read a chunk at a time, so a data file
    of any size is checked in constant memory."""
    offset, line, carried = 0, 1, b""  # carried: the start of a character the previous chunk cut in two
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            data = carried + chunk
            try:
                data.decode("utf-8")
                carried = b""
            except UnicodeDecodeError as err:
                if not (chunk and err.reason == "unexpected end of data"):
                    return _not_utf8(path, data[err.start], offset + err.start,
                                     line + data.count(b"\n", 0, err.start), err.reason)
                data, carried = data[:err.start], data[err.start:]
            if not chunk:
                return None
            offset, line = offset + len(data), line + data.count(b"\n")


def _not_utf8(path: str | Path, byte: int, offset: int, line: int, reason: str) -> str:
    return (f"{path}:{line}: not UTF-8 text: byte 0x{byte:02x} at byte offset {offset} cannot be decoded ({reason}); "
            f"save the file as UTF-8")


# ---------------------------------------------------------------- JSON


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key, self.start = key, None  # start: just after the `{` of the object holding it


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) < len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return mapping


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def parse_json(text: str, path: str | Path, error: type[ConfigError] = ConfigError, *, line: int | None = None,
               start: int | None = None) -> Any:
    """The JSON document `text`, or with `start` the value at that index and the index after it. `line`: `text` is
    that line of a JSON-lines file (messages count lines from it). A syntax error, a key twice in one object and
    nesting too deep to follow raise `error` naming the file, line and column."""
    try:
        return _DECODER.decode(text) if start is None else _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as err:
        what = "invalid JSON line" if line is not None else "invalid JSON"
        raise error(f"{path}:{line or err.lineno}:{err.colno}: {what}: {err.msg}") from None
    except _DuplicateKey as dup:
        first, second = _duplicate_positions(text, start or 0, dup.key)
        problem = f"key {json.dumps(dup.key, ensure_ascii=False)} appears twice in one object"
        if second is None:
            raise error(f"{path}{f':{line}' if line else ''}: {problem}: keep one") from None
        raise error(f"{_place(path, text, second, line)}: {problem} (first at line {_line(text, first, line)}): "
                    f"keep one") from None
    except RecursionError:
        depth, at = _deepest(text, start or 0)
        raise error(f"{_place(path, text, at, line)}: JSON nested {depth} levels deep, more than can be read (about "
                    f"{sys.getrecursionlimit()}): flatten it") from None
    except ValueError as err:  # the only other one: an integer of more digits than Python converts
        raise error(_value_problem(path, text, line, err, "JSON")) from None


def _value_problem(path: str | Path, text: str, line: int | None, err: ValueError, language: str) -> str:
    """A value the parser read but Python cannot make: an integer of more digits than it converts, or (YAML) a date
    that does not exist."""
    limit = sys.get_int_max_str_digits()
    found = re.search(rf"\d{{{limit + 1},}}", text)
    if found is None:
        return f"{path}{f':{line}' if line else ''}: invalid {language}: {err}"
    return (f"{_place(path, text, found.start(), line)}: a number of more than {limit} digits, which cannot be read: "
            f"write it shorter, or as text")


def _line(text: str, index: int, line: int | None) -> int:
    return (line or 1) + text.count("\n", 0, index)


def _place(path: str | Path, text: str, index: int, line: int | None) -> str:
    column = index - text.rfind("\n", 0, index)
    return f"{path}:{_line(text, index, line)}:{column}"


def _duplicate_positions(text: str, start: int, key: str) -> tuple[int, int | None]:
    """Where `key` first and second stand in the object that holds it twice: decoded again by the pure-Python scanner,
    which, unlike the C one, passes through a method per object that can note where the object starts."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    parse_object = decoder.parse_object

    def noting_start(s_and_end: tuple[str, int], *args: Any) -> Any:
        try:
            return parse_object(s_and_end, *args)
        except _DuplicateKey as dup:
            dup.start = s_and_end[1] if dup.start is None else dup.start  # the innermost object holds the key
            raise

    decoder.parse_object = noting_start
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        decoder.raw_decode(text, start)
    except _DuplicateKey as dup:
        positions = [index for name, index in _members(text, dup.start) if name == key]
        if len(positions) > 1:
            return positions[0], positions[1]
    except RecursionError:  # the Python scanner takes more stack per level than the C one
        pass
    return start, None


def _members(text: str, index: int) -> list[tuple[str, int]]:
    """The keys of the valid JSON object whose `{` precedes `index`, each with where it stands."""
    members, plain = [], json.JSONDecoder()
    index = _WHITESPACE.match(text, index).end()
    while text[index] == '"':
        key, end = json.decoder.scanstring(text, index + 1)
        members.append((key, index))
        value_start = _WHITESPACE.match(text, _WHITESPACE.match(text, end).end() + 1).end()  # past the colon
        after = _WHITESPACE.match(text, plain.raw_decode(text, value_start)[1]).end()
        index = _WHITESPACE.match(text, after + 1).end() if text[after] == "," else after
    return members


def _deepest(text: str, start: int = 0) -> tuple[int, int]:
    """How deep the brackets of `text` nest, and where the deepest one opens."""
    depth = deepest = where = 0
    for token in _BRACKETS.finditer(text, start):
        if token.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, token.start()
        elif token.group() in "]}":
            depth -= 1
    return deepest, where


# ---------------------------------------------------------------- YAML


def parse_yaml(text: str, path: str | Path, error: type[ConfigError] = ConfigError) -> Any:
    """The YAML document `text` (safe types only); `error` names the file, line and column of a syntax error, of a key
    written twice in one mapping, and says when the nesting is deeper than can be read."""
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_loader())
    except _DuplicateYamlKey as dup:
        raise error(f"{path}:{dup.mark.line + 1}:{dup.mark.column + 1}: key `{dup.key}` appears twice in one "
                    f"mapping (first at line {dup.first.line + 1}): keep one") from None
    except yaml.reader.ReaderError as err:  # a character YAML refuses: `position` counts characters
        raise error(f"{_place(path, text, err.position, None)}: invalid YAML: {err.reason} (character "
                    f"U+{err.character:04X})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise error(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
    except RecursionError:
        depth, at = _deepest(text)
        where = f"{_place(path, text, at, None)}: YAML nested {depth} levels deep" if depth else f"{path}: YAML nested"
        raise error(f"{where}, more deeply than can be read: flatten it") from None
    except ValueError as err:  # from a constructor: an integer longer than Python converts, a date like 2024-13-01
        raise error(_value_problem(path, text, None, err, "YAML")) from None


class _DuplicateYamlKey(Exception):
    def __init__(self, key: Any, first: Any, mark: Any) -> None:
        super().__init__(key)
        self.key, self.first, self.mark = key, first, mark


@functools.cache
def _unique_key_loader() -> type:
    """PyYAML's safe loader, refusing a key that a mapping holds twice (it would keep the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden key by key
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key, which the safe loader refuses with its own message
                    continue
                if first is not key_node.start_mark:
                    raise _DuplicateYamlKey(key, first, key_node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader
