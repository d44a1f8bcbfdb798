"""Reading and validating JSONL datasets. No torch, no tokenizer: the API validates uploads with it.

Five formats, detected from the first row and then required of every row:
  chat               {"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0|1}, ...]}
                     (content may also be OpenAI's text parts: [{"type": "text", "text": str}, ...]), and
                     OpenAI's tool calling: "tools" on the row, "tool_calls" on assistant messages, role "tool"
  prompt_completion  {"prompt": str, "completion": str}
  alpaca             {"instruction": str, "input"?: str, "output": str}
  text               {"text": str}
  preference         a prompt and two answers, the preferred first (method dpo), as OpenAI's DPO files have it:
                       {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": str}],
                        "non_preferred_output": [{"role": "assistant", "content": str}]}
                     or as trl's: {"prompt": str | [messages], "chosen": str | [one assistant message],
                                   "rejected": str | [one assistant message]}
Every format but `text` becomes a conversation (user turn → assistant turn), so one chat template
and one loss-masking rule serve them all; a preference row is its prompt conversation (ending with a
user turn) and the two answers to it. Other keys on a row (ids, metadata) are ignored. Tool calling is
read in chat rows only (_tools, _tool_calls; OpenAI's legacy form, "functions" and "function_call", as
today's: _from_legacy_functions); elsewhere it is refused (_refuse_tools, _message).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.training.spec import DECODER_WITHOUT_REPEATS, RepeatedKey, excerpt

FORMATS = ("chat", "prompt_completion", "alpaca", "text", "preference")
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 20  # enough to see a pattern without flooding an API answer

_FORMAT_KEYS = {  # detection order: the first whose keys are all present wins
    "chat": ("messages",),
    "preference": ("input", "preferred_output", "non_preferred_output"),  # OpenAI's
    "preference_trl": ("prompt", "chosen", "rejected"),  # trl's: the same format
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
_FORMAT_SHAPES = {
    "chat": '{"messages": [{"role": ..., "content": ...}]}',
    "prompt_completion": '{"prompt": ..., "completion": ...}',
    "alpaca": '{"instruction": ..., "input": ..., "output": ...}',
    "text": '{"text": ...}',
    "preference": '{"input": ..., "preferred_output": ..., "non_preferred_output": ...} '
                  '| {"prompt": ..., "chosen": ..., "rejected": ...}',
}


@dataclass(frozen=True)
class ToolCall:
    """One call an assistant message makes: OpenAI's {"id", "type": "function", "function": {"name", "arguments"}}."""

    name: str
    arguments: dict  # OpenAI sends a JSON text; chat templates render a mapping (transformers' convention, vLLM's too)
    id: str | None = None


@dataclass(frozen=True)
class Message:
    role: str  # ROLES, or "tool": a tool's result, shown as context
    content: str  # "" for an assistant message that only calls tools
    weight: int = 1  # 0 = an assistant turn shown as context but not learned
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # a tool message's: the call it answers

    def for_template(self) -> dict:
        """The message as chat templates take it (apply_chat_template's, and vLLM's at inference)."""
        message: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments},
                                      **({"id": c.id} if c.id is not None else {})} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def said(self) -> str:
        """Its text and its calls (name and arguments), as a reader reads them and repeats are compared."""
        calls = " ".join(f"{c.name}({json.dumps(c.arguments, ensure_ascii=False, sort_keys=True)})"
                         for c in self.tool_calls)
        return f"{self.content} {calls}".strip() if calls else self.content


@dataclass(frozen=True)
class Example:
    line: int
    messages: tuple[Message, ...] = ()  # every format but text
    text: str | None = None  # text format: the whole string is learned
    # preference format: the preferred and the other answer to `messages` (which ends with a user turn)
    chosen: str | None = None
    rejected: str | None = None
    # chat rows that call tools: the tools they are shown, as OpenAI's {"type": "function", "function": {...}}
    tools: tuple[dict, ...] = ()

    def template_tools(self) -> list[dict] | None:
        """The row's tools as a chat template takes them (None: the template renders no tools section)."""
        return list(self.tools) or None

    def prompt(self) -> tuple[Message, ...] | None:
        """What the row asks: its messages before its last assistant turn (a preference row: all of them,
        its answers are apart). None for a text row, which asks nothing. The eval report prompts with it."""
        if self.text is not None:
            return None
        if self.chosen is not None:
            return self.messages
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")  # a chat row ends with one
        return self.messages[:last]

    def chars(self) -> int:
        """The characters of its text, messages and answers: what tokenizing it costs."""
        return (len(self.text or "") + sum(len(m.content) for m in self.messages) + len(self.chosen or "")
                + len(self.rejected or "") + (len(json.dumps(self.tools)) if self.tools else 0)
                + sum(len(json.dumps(c.arguments)) for m in self.messages for c in m.tool_calls))


@dataclass(frozen=True)
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class DataError(ValueError):
    """A dataset with bad lines. Lists the first errors with their line numbers and how many there were."""

    def __init__(self, errors: list[LineError], total: int, source: str = "dataset"):
        self.errors = errors
        self.total = total
        more = f"\n  ... and {total - len(errors)} more" if total > len(errors) else ""
        super().__init__(
            f"{source}: {total} invalid line{'s' if total != 1 else ''}:\n"
            + "\n".join(f"  {e}" for e in errors)
            + more
        )


@dataclass
class Dataset:
    format: str
    examples: list[Example] = field(default_factory=list)


class DatasetValidator:
    """Validates a dataset line by line, so a caller can stream a multi-GB upload through it.

    feed() each raw line (bytes, without needing the newline stripped); finish() tells the verdict.
    The first valid row fixes the format; a later row in another format is an error on its line.
    """

    def __init__(self, keep_examples: bool = True):
        self.format: str | None = None
        self.rows = 0
        self.chars = 0
        self.errors: list[LineError] = []
        self.error_count = 0
        self.examples: list[Example] | None = [] if keep_examples else None
        self._line = 0
        self._not_jsonl: str | None = None  # what the file is instead, where its first line shows it
        self._tools: dict[str, tuple[dict, ...]] = {}  # each distinct "tools" of the rows kept, once

    def feed(self, raw: bytes) -> None:
        self._line += 1
        if self._not_jsonl:
            return  # said once, on line 1: its lines are no rows to list one by one
        if self._line == 1:
            raw = raw.removeprefix(_UTF8_BOM)
            self._not_jsonl = _not_jsonl(raw)
            if self._not_jsonl:
                return self._error(self._not_jsonl)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._error(f"not valid UTF-8 (byte {exc.start + 1} of the line): save the file as UTF-8")
        if not text.strip():
            return  # blank lines (a trailing newline, spacing) carry nothing
        try:
            obj = read_json(text)
        except ValueError as exc:
            return self._error(str(exc))
        if not isinstance(obj, dict):
            return self._error(f"expected a JSON object, got {_json_kind(obj)}")
        fmt = detect_format(obj)
        if fmt is None:
            return self._error(_missing_key(obj, self.format) or _unknown_row(obj, self.format))
        if self.format is not None and fmt != self.format:
            return self._error(
                f"this row is in {fmt} format but the file is {self.format} "
                f"(set by its first row); every row must be {_FORMAT_SHAPES[self.format]}"
            )
        try:
            example = _PARSERS[fmt](obj, self._line)
        except ValueError as exc:
            return self._error(str(exc))
        self.format = self.format or fmt
        self.rows += 1
        self.chars += example.chars()
        if self.examples is not None:
            if example.tools:
                # Most tool-calling sets show every row the same tools: one copy for all, not one per row (a
                # hundred thousand rows of a few KB of definitions each are gigabytes of dicts in the trainer).
                tools = self._tools.setdefault(json.dumps(example.tools, sort_keys=True), example.tools)
                example = dataclasses.replace(example, tools=tools)
            self.examples.append(example)

    def skip_line(self, message: str, head: bytes = b"") -> None:
        """Count a line the caller could not even read whole (one longer than it will buffer). `head`, the
        line's start, tells a first line that is no JSONL at all (rows dumped as one JSON array) from a long row."""
        self._line += 1
        if self._line == 1:
            self._not_jsonl = _not_jsonl(head.removeprefix(_UTF8_BOM))
            if self._not_jsonl:
                return self._error(self._not_jsonl)
        if not self._not_jsonl:
            self._error(message)

    def _error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(self._line, message))

    def finish(self, source: str = "dataset") -> Dataset:
        """Return the dataset, or raise DataError with the first bad lines."""
        if self.error_count:
            raise DataError(self.errors, self.error_count, source)
        if not self.rows:
            raise DataError([LineError(max(self._line, 1), "the file has no rows")], 1, source)
        return Dataset(format=self.format or "", examples=self.examples or [])


# What a file saved "as UTF-8" by Notepad or Excel starts with; the text after it is UTF-8 all the same.
_UTF8_BOM = b"\xef\xbb\xbf"
_SAVE_AS_JSONL = "JSONL is UTF-8 text, one JSON object per line"
_NOT_JSONL = (  # how a file's first line starts, and what the file is then
    ((b"\xff\xfe", b"\xfe\xff"), "the file is UTF-16 (a byte order mark of UTF-16)"),
    ((b"\x1f\x8b",), "the file is gzip-compressed: upload it uncompressed"),
    ((b"PK\x03\x04",), "the file is a zip archive (an .xlsx workbook is one): upload the JSONL file itself"),
)


def _not_jsonl(first_line: bytes) -> str | None:
    """What a file is instead of JSONL, told by its first line, or None: one error for the file, not one per line."""
    for starts, what in _NOT_JSONL:
        if first_line.startswith(starts):
            return f"{what}; {_SAVE_AS_JSONL}"
    if b"\x00" in first_line:  # UTF-8 JSON never holds a NUL byte; UTF-16 without its mark holds one per ASCII character
        return f"the file is UTF-16, or not text: it holds NUL bytes; {_SAVE_AS_JSONL}"
    if first_line.lstrip().startswith(b"["):
        return (f"the file is one JSON array, not JSONL: {_SAVE_AS_JSONL} (no [ ] around them, no commas between); "
                "in Python: for row in rows: print(json.dumps(row), file=out)")
    # A line of `{` alone is never a row: this is pretty-printed JSON (rows written with indent=, or another JSON
    # file, a job spec, given as the dataset), whose every line would otherwise be an error of its own.
    if first_line.strip() == b"{":
        return (f"the file is pretty-printed JSON (an object spread over several lines), not JSONL: {_SAVE_AS_JSONL}; "
                "in Python: for row in rows: print(json.dumps(row), file=out) (no indent=)")
    return None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # the escapes of d800-dfff: only these can leave half a pair


def read_json(text: str) -> Any:
    """A JSON text as Python values, or ValueError saying why not and how to mend it: what does not parse,
    and what Python's parser takes that would break a later reader (a key given twice, half a surrogate pair,
    nesting or a number too deep or too long to read). A row is read with it, and a call's arguments in it."""
    try:
        value = DECODER_WITHOUT_REPEATS.decode(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno}){_json_error_hint(text, exc)}") from None
    except RepeatedKey as exc:
        raise ValueError(str(exc)) from None
    # Valid JSON that Python's parser still refuses, with other exceptions than a decode error.
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply to read (about 1000 levels at most)") from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise ValueError(f"a number too long to read (more than {sys.get_int_max_str_digits()} digits)") from None
    if _SURROGATE_ESCAPE.search(text) and _lone_surrogate(value):
        raise ValueError("a \\uXXXX escape of half a surrogate pair (\\ud800-\\udfff without its other half) "
                         "is no character: no tokenizer can read it; write the character itself, or both halves")
    return value


def _lone_surrogate(obj: Any) -> bool:
    """Whether a key or string of the row holds half a surrogate pair: Python's parser takes the
    escape and makes a string that UTF-8, the tokenizer and the database's JSON reader all refuse."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_kind(value: Any) -> str:
    """A value's type as JSON names it: Python's names (NoneType, dict, int) mean nothing to whoever wrote the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"a number ({excerpt(value)})"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"  # all json.loads makes besides


def _json_error_hint(text: str, exc: json.JSONDecodeError) -> str:
    """What a line that is not JSON most likely is, where its error alone does not say."""
    if text.startswith("\ufeff"):  # line 1's is skipped (feed): a later one came with a file joined to the first
        return ("; the line starts with a byte order mark (U+FEFF): files saved with one were joined into this one; "
                "remove it")
    if exc.msg == "Extra data":
        if "\r" in text[:exc.pos]:  # no JSON string holds a raw \r: before the extra data, it broke lines
            return "; the file's lines end with \\r alone (old Mac line ends): save it with \\n or \\r\\n line ends"
        if text[exc.pos:].strip() == ",":  # rows cut out of a JSON array by hand keep the comma between them
            return "; the line ends with a comma: JSONL has none between rows, one JSON object per line"
        return "; the line goes on after its JSON value: one JSON object per line"
    if exc.msg.startswith("Expecting property name") and text.lstrip().startswith("{'"):
        return ("; its keys are in single quotes, as Python prints a dict (str(row), print(row)): JSON needs double "
                "quotes; write each row with json.dumps(row)")
    return ""


def detect_format(row: dict) -> str | None:
    for fmt, keys in _FORMAT_KEYS.items():
        if all(k in row for k in keys):
            return fmt.removesuffix("_trl")
    return None


# ShareGPT's rows, axolotl's and LLaMA-Factory's common format: said how to write them, not only that they are no format.
_SHAREGPT = ('ShareGPT rows ("conversations" of {"from", "value"}) are chat rows here: {"messages": [{"role", "content"}]}, '
             'from "human" as role "user" and "gpt" as "assistant"')
_SHAREGPT_ROLES = ("human", "gpt")


def _missing_key(row: dict, file_format: str | None) -> str | None:
    """What a row that is almost a row of a format lacks (one of its keys), or None. Once the first row set the
    file's format only that format counts: a chat file's {"prompt": ...} row is no prompt/completion row to finish."""
    for fmt, keys in _FORMAT_KEYS.items():
        if file_format is not None and fmt.removesuffix("_trl") != file_format:
            continue
        present = [k for k in keys if k in row]
        if not present or len(present) != len(keys) - 1 or present == ["prompt", "completion"]:
            continue
        absent = next(k for k in keys if k not in row)
        if fmt.startswith("preference"):
            if absent == keys[0]:  # the prompt: trl's "implicit prompt" rows carry it inside each answer
                return (f'a preference row needs the conversation its answers reply to: "{absent}" is missing (it has '
                        f'{", ".join(present)}); where each answer holds the whole conversation, put the turns before '
                        f'the answer in "{absent}" and keep only the last assistant message in each answer')
            return f'a preference row needs both answers: "{absent}" is missing (it has {", ".join(present)})'
        # Said as the field left out, not as "unknown format" with six shapes to compare the row against.
        return f'"{absent}" is missing: such a row is {_FORMAT_SHAPES[fmt]} (this one has {", ".join(present)})'
    return None


def _unknown_row(row: dict, file_format: str | None) -> str:
    """Why a row is in no format: the shape its rows have (the file's, once its first row set it, else every format's),
    and the key meant where one is misspelt ("message" for "messages")."""
    # A key with a control character (NUL, an escape sequence) is shown escaped, not sent to a terminal as is.
    keys = excerpt(", ".join(k if k.isprintable() else repr(k) for k in sorted(row)), quote=False) or "none"
    formats = [f for f in _FORMAT_KEYS if file_format is None or f.removesuffix("_trl") == file_format]
    known = sorted({k for f in formats for k in _FORMAT_KEYS[f]})
    meant = next((f'"{excerpt(k, quote=False)}" looks like a misspelt "{m[0]}"; ' for k in row
                  if isinstance(k, str) and k not in known and (m := difflib.get_close_matches(k, known, n=1, cutoff=0.8))), "")
    if "conversations" in row:
        return f"unknown format (keys: {keys}); {_SHAREGPT}"
    if file_format is not None:
        return (f"unknown format (keys: {keys}); {meant}the file is {file_format} (set by its first row): "
                f"every row must be {_FORMAT_SHAPES[file_format]}")
    return f"unknown format (keys: {keys}); {meant}expected one of {' | '.join(_FORMAT_SHAPES.values())}"


def read_jsonl(path: str | Path) -> Dataset:
    """Read and validate a whole JSONL file; raises DataError naming bad lines."""
    validator = DatasetValidator()
    with open(path, "rb") as f:
        for raw in _lines(f):
            validator.feed(raw)
    return validator.finish(source=str(path))


def _lines(f) -> Iterator[bytes]:
    # Split on \n only: a \r or U+2028 inside a JSON string is data, not a line break.
    yield from (line.rstrip(b"\r\n") for line in f)


def _text(obj: dict, key: str, *, required: bool = True, where: str = "") -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if key not in obj:  # left out, which "got null" misnamed: the row has no such field to correct
        raise ValueError(f'{where}"{key}" is missing')
    if not isinstance(value, str):
        raise ValueError(f'{where}"{key}" must be a string, got {_json_kind(value)}')
    if required and not value.strip():
        raise ValueError(f'{where}"{key}" is empty')
    return value


# OpenAI's tool-calling fields outside chat rows. A row trained without them teaches another answer than the
# row's: the model learns to answer without the tools it was shown, or to say an answer's text without the
# call it made. Empty ones (`"tools": []`) change nothing.
_TOOL_ROW_KEYS = ("tools", "functions")
_NO_TOOLS = ("tool calling is trained from chat rows (method sft) only, as OpenAI's tools and tool_calls; "
             "leave out preference rows that call tools, and the tool definitions of rows whose answers do not")
MAX_TOOLS = 128  # OpenAI's limit on a request's tools
# How deep a tool's parameters or a call's arguments may nest: far past any function's (JSON Schema nests a few
# levels a property), and far below the ~1,000 where rendering them (tojson) would fail mid-training.
MAX_TOOL_NESTING = 64
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name


def _refuse_tools(obj: dict, where: str) -> None:
    """ValueError where a row (or a preference row's input) holds tool definitions."""
    for key in _TOOL_ROW_KEYS:
        if obj.get(key):
            raise ValueError(f'{where}"{key}": {_NO_TOOLS}')


def _message(m: dict, i: int, where: str, *, tools: bool = False) -> tuple[str, str]:
    """A message's role and text, as every format's messages must have them: a known role, the system
    message first alone, text content; with `tools` (a chat row's), role "tool" too and an assistant's
    content may be empty where it calls tools (_tool_calls reads the calls), else no tool calling."""
    role = m.get("role")
    if role == "function" or m.get("function_call"):  # a chat row's were read as today's form (_from_legacy_functions)
        what = f"role {excerpt(role)}" if role == "function" else '"function_call"'
        raise ValueError(f"{where}{what}: {_NO_TOOLS}")
    if not tools and role == "tool":
        raise ValueError(f"{where}role {excerpt(role)}: {_NO_TOOLS}")
    sharegpt = f"; {_SHAREGPT}" if "from" in m or role in _SHAREGPT_ROLES else ""
    if "role" not in m:
        raise ValueError(f'{where}"role" is missing: one of {", ".join(ROLES)}{", tool" if tools else ""}{sharegpt}')
    if role not in ROLES and not (tools and role == "tool"):
        raise ValueError(f"{where}role {excerpt(role)} is not one of {', '.join(ROLES)}{', tool' if tools else ''}{sharegpt}")
    if role == "system" and i != 0:
        raise ValueError(f"{where}a system message may only come first")
    if not tools and m.get("tool_calls"):
        raise ValueError(f'{where}"tool_calls": {_NO_TOOLS}')
    content = m.get("content")
    if content is None and isinstance(m.get("refusal"), str):
        raise ValueError(f'{where}"refusal" is not trained: put its text in "content" (the words the model is to learn)')
    # A call alone is a whole answer (OpenAI writes its content null), and a tool may answer nothing.
    optional = role == "tool" or (role == "assistant" and bool(m.get("tool_calls")))
    if isinstance(content, list):
        return role, _text({"content": _parts_text(content, where)}, "content", where=where, required=not optional)
    return role, _text(m, "content", where=where, required=not optional)


def _tools(obj: dict) -> tuple[dict, ...]:
    """A chat row's "tools", checked as OpenAI checks them: functions with a name, each once."""
    given = obj.get("tools")
    if not given:
        return ()
    if not isinstance(given, list):
        raise ValueError(f'"tools" must be a list of {{"type": "function", "function": {{"name": ...}}}}, got {_json_kind(given)}')
    if len(given) > MAX_TOOLS:
        raise ValueError(f'"tools" holds {len(given)} tools; at most {MAX_TOOLS}')
    names: set[str] = set()
    for n, tool in enumerate(given):
        where = f'"tools"[{n}]: '
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ValueError(f'{where}must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        name = _tool_name(tool["function"], where)
        if name in names:
            raise ValueError(f"{where}the name {excerpt(name)} is defined twice")
        names.add(name)
        parameters = tool["function"].get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(f'{where}"parameters" must be a JSON Schema object, got {_json_kind(parameters)}')
        _not_too_deep(tool, where)
    return tuple(given)


def _tool_name(function: dict, where: str) -> str:
    name = function.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise ValueError(f"{where}the function's name {excerpt(name)} must be 1 to 64 letters, digits, _ or -")
    return name


def _not_too_deep(value: Any, where: str) -> None:
    """ValueError where `value` holds objects or arrays more than MAX_TOOL_NESTING deep (itself the first), or a
    number JSON has no way to write: Python's reader takes NaN and Infinity, and reads 1e999 as infinity, and
    the template would write them as NaN and Infinity, which JSON readers refuse (the model would learn calls
    that no client can read, or another number than the row's)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where}NaN or an infinite number (Infinity, or a number past 1.8e308) is not JSON: "
                             "the model would learn to write what no JSON reader reads; write it as a string")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_TOOL_NESTING:
            raise ValueError(f"{where}nested more than {MAX_TOOL_NESTING} levels deep; no function needs as many")
        pending.extend((child, depth + 1) for child in children)


def _tool_calls(m: dict, where: str, tools: tuple[dict, ...]) -> tuple[ToolCall, ...]:
    """An assistant message's calls, each of one of the row's tools, its arguments a JSON object."""
    given = m.get("tool_calls")
    if not given:
        return ()
    if not isinstance(given, list):
        raise ValueError(f'{where}"tool_calls" must be a list of calls, got {_json_kind(given)}')
    defined = {tool["function"]["name"] for tool in tools}
    calls = []
    for n, call in enumerate(given):
        at = f'{where}tool_calls[{n}]: '
        if not isinstance(call, dict) or call.get("type", "function") != "function" \
                or not isinstance(call.get("function"), dict):
            raise ValueError(f'{at}must be {{"id": ..., "type": "function", "function": {{"name": ..., "arguments": ...}}}}')
        name = _tool_name(call["function"], at)
        if name not in defined:
            raise ValueError(f"{at}calls {excerpt(name)}, which the row's \"tools\" do not define: the model would "
                             "learn to call a tool it was never shown; add its definition to the row's tools")
        arguments = call["function"].get("arguments", "{}")
        if isinstance(arguments, str):  # OpenAI's form: the arguments as a JSON text
            try:
                arguments = read_json(arguments)
            except ValueError as exc:
                raise ValueError(f'{at}"arguments": {exc}') from None
        if not isinstance(arguments, dict):
            raise ValueError(f'{at}"arguments" must be a JSON object (the call\'s named arguments), got {_json_kind(arguments)}')
        _not_too_deep(arguments, f'{at}"arguments": ')
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ValueError(f'{at}"id" must be a string, got {_json_kind(call_id)}')
        calls.append(ToolCall(name, arguments, call_id))
    return tuple(calls)


def _parts_text(parts: list, where: str) -> str:
    """The text of content given as OpenAI's parts ([{"type": "text", "text": ...}, ...]): its text parts,
    joined with a newline as vLLM joins them when it serves the model. Other parts (images, audio) are refused:
    the text models trained here cannot see them, and the answer may depend on them."""
    texts = []
    for n, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(f"{where}content part {n} is of type {excerpt(kind)}: only text parts are trained "
                             '([{"type": "text", "text": ...}]); leave out rows that need an image or audio')
        texts.append(_text(part, "text", where=f"{where}content part {n}: ", required=False))
    return "\n".join(texts)


def _parse_chat(obj: dict, line: int) -> Example:
    obj = _from_legacy_functions(obj)
    tools = _tools(obj)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    parsed: list[Message] = []
    asking: Message | None = None  # the last message but tool messages: the one a tool message answers
    answerable: set[str | None] = set()  # the ids of its calls (a set: a message may make thousands of calls)
    for i, m in enumerate(messages):
        where = f"messages[{i}]: "
        if not isinstance(m, dict):
            raise ValueError(f"{where}must be an object with role and content")
        role, content = _message(m, i, where, tools=True)
        weight = m.get("weight", 1)
        if "weight" in m and role != "assistant":
            raise ValueError(f"{where}weight is only allowed on assistant messages")
        if weight not in (0, 1) or isinstance(weight, bool):
            raise ValueError(f"{where}weight must be 0 or 1, got {excerpt(weight)}")
        calls = _tool_calls(m, where, tools) if role == "assistant" else ()
        if role != "assistant" and m.get("tool_calls"):
            raise ValueError(f'{where}"tool_calls" are made by assistant messages only, not by {role}')
        parsed.append(Message(role, content, weight, calls,
                              _answered_call(m, where, asking, answerable) if role == "tool" else None))
        if role != "tool":
            asking, answerable = parsed[-1], {c.id for c in calls}
    if not any(m.role == "assistant" for m in parsed):
        raise ValueError("no assistant message: there is nothing to learn")
    if parsed[-1].role != "assistant":
        raise ValueError(
            f"the last message is from {parsed[-1].role}; it must be from the assistant "
            "(the model learns to end its turn there)"
        )
    if not any(m.role == "assistant" and m.weight == 1 for m in parsed):
        raise ValueError("every assistant message has weight 0: there is nothing to learn")
    return Example(line=line, messages=tuple(parsed), tools=tools)


def _from_legacy_functions(obj: dict) -> dict:
    """A chat row in OpenAI's legacy function calling ("functions", an assistant's "function_call", a message of
    role "function"), as today's form writes the same row: tools, tool_calls, role "tool". Files made for
    OpenAI's fine-tuning in 2023 are written so; the rendering and the checks are those of today's form."""
    messages = obj.get("messages")
    legacy = [isinstance(m, dict) and (bool(m.get("function_call")) or m.get("role") == "function")
              for m in messages] if isinstance(messages, list) else []
    if not obj.get("functions") and not any(legacy):
        return obj
    row = dict(obj)
    if obj.get("functions"):
        if obj.get("tools"):
            raise ValueError('"functions" and "tools" both given: OpenAI\'s legacy "functions" are the tools of '
                             "today's form; give one of the two")
        if not isinstance(obj["functions"], list):
            raise ValueError(f'"functions" must be a list of functions, got {_json_kind(obj["functions"])}')
        row["tools"] = [{"type": "function", "function": f} for f in obj["functions"]]
    if not isinstance(messages, list):
        return row  # refused as a chat row without messages
    read = []
    for m, old in zip(messages, legacy, strict=True):
        if old and m.get("function_call"):
            if m.get("tool_calls"):
                raise ValueError('a message gives both "function_call" and "tool_calls"; give one of the two')
            m = {k: v for k, v in m.items() if k != "function_call"} | {
                "tool_calls": [{"type": "function", "function": m["function_call"]}]}
        elif old:
            m = {**m, "role": "tool"}  # a function's result, named by the function rather than by a call's id
        read.append(m)
    row["messages"] = read
    return row


def _answered_call(m: dict, where: str, asking: Message | None, ids: set[str | None]) -> str | None:
    """A tool message's tool_call_id, checked against the calls it answers: those of `asking`, the message
    just before it but tool messages (tool messages after it answer the same message's calls)."""
    if asking is None or not asking.tool_calls:
        raise ValueError(f"{where}a tool message answers a call: it must follow an assistant message with "
                         '"tool_calls" (or another tool message)')
    call_id = m.get("tool_call_id")
    if call_id is None:
        return None
    if not isinstance(call_id, str) or call_id not in ids:
        given = [c.id for c in asking.tool_calls if c.id is not None]
        named = ", ".join(excerpt(i) for i in given[:5]) + (f" and {len(given) - 5} more" if len(given) > 5 else "")
        raise ValueError(f'{where}"tool_call_id" {excerpt(call_id)} is not the id of a call of the assistant message '
                         f"before it ({named or 'its calls have no id'})")
    return call_id


def _parse_prompt_completion(obj: dict, line: int) -> Example:
    _refuse_tools(obj, "")
    prompt = _text(obj, "prompt")
    completion = _text(obj, "completion")
    return Example(line=line, messages=(Message("user", prompt), Message("assistant", completion)))


def _parse_alpaca(obj: dict, line: int) -> Example:
    _refuse_tools(obj, "")
    instruction = _text(obj, "instruction")
    extra = _text(obj, "input", required=False)
    output = _text(obj, "output")
    # The Stanford Alpaca layout: the optional input follows the instruction after a blank line.
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(line=line, messages=(Message("user", prompt), Message("assistant", output)))


def _parse_text(obj: dict, line: int) -> Example:
    _refuse_tools(obj, "")
    return Example(line=line, text=_text(obj, "text"))


def _parse_preference(obj: dict, line: int) -> Example:
    _refuse_tools(obj, "")  # trl's rows carry them beside the prompt, OpenAI's in its input (below)
    if "input" in obj:  # OpenAI's: the prompt's messages under input, each answer a list of one assistant message
        given = obj["input"]
        if not isinstance(given, dict) or "messages" not in given:
            raise ValueError('"input" must be an object with "messages" (the conversation before the answers)')
        _refuse_tools(given, "input.")
        prompt = _prompt_messages(given["messages"], "input.messages")
        chosen = _answer(obj["preferred_output"], "preferred_output")
        rejected = _answer(obj["non_preferred_output"], "non_preferred_output")
    else:  # trl's: the prompt a string or messages, each answer a string or a list of one assistant message
        given = obj["prompt"]
        prompt = ((Message("user", _text(obj, "prompt")),) if isinstance(given, str)
                  else _prompt_messages(given, "prompt"))
        chosen, rejected = _answer(obj["chosen"], "chosen"), _answer(obj["rejected"], "rejected")
    if chosen == rejected:
        raise ValueError("the preferred and the other answer are the same: there is no preference to learn")
    return Example(line=line, messages=prompt, chosen=chosen, rejected=rejected)


def _prompt_messages(messages: Any, where: str) -> tuple[Message, ...]:
    """The conversation a preference row's answers reply to: chat turns ending with a user turn."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _json_kind(messages)
        either = " a string or" if where == "prompt" else ""  # trl's prompt may be a string; OpenAI's input is messages
        raise ValueError(f'"{where}" must be{either} a non-empty list of messages, got {got}')
    parsed = []
    for i, m in enumerate(messages):
        at = f"{where}[{i}]: "
        if not isinstance(m, dict):
            raise ValueError(f"{at}must be an object with role and content")
        parsed.append(Message(*_message(m, i, at)))
    if parsed[-1].role != "user":
        raise ValueError(f'"{where}" must end with a user message: the answers reply to it '
                         f"(the last is from {parsed[-1].role})")
    return tuple(parsed)


def _answer(value: Any, key: str) -> str:
    """One side of a preference: a string, or a list of exactly one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f'"{key}" is empty')
        return value
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        got = f"a list of {len(value)}" if isinstance(value, list) else _json_kind(value)
        raise ValueError(f'"{key}" must be one assistant message ([{{"role": "assistant", "content": ...}}]) '
                         f"or a string, got {got}")
    if value[0].get("role") != "assistant":
        raise ValueError(f'"{key}"[0]: role {excerpt(value[0].get("role"))} must be assistant: it is an answer')
    if value[0].get("weight", 1) != 1:
        # A chat row's weight 0 shows a turn without learning it; an answer of a pair is always compared, so a
        # weight would be silently ignored: the row means something the trainer does not do.
        raise ValueError(f'"{key}"[0]: weight {excerpt(value[0].get("weight"))} does not apply to a preference answer: '
                         "both answers of a pair are always compared; leave out the weight, or the row")
    return _message(value[0], 0, f'"{key}"[0]: ')[1]


_PARSERS = {
    "chat": _parse_chat,
    "prompt_completion": _parse_prompt_completion,
    "alpaca": _parse_alpaca,
    "text": _parse_text,
    "preference": _parse_preference,
}


def validate_lines(lines: Iterable[bytes], source: str = "dataset") -> Dataset:
    validator = DatasetValidator()
    for raw in lines:
        validator.feed(raw)
    return validator.finish(source)
