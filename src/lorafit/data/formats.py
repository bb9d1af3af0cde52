"""Record formats into one shape: a conversation (a list of role/content messages), or plain text.

Detected from the first record's fields, or set by `data.format`:
- messages:          {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
- prompt_completion: {"prompt": "...", "completion": "..."}                      -> user, assistant
- alpaca:            {"instruction": "...", "input": "..." (optional), "output": "..."} -> user, assistant
- text:              {"text": "..."}                                             -> every token carries loss
"""

from __future__ import annotations

from lorafit.data.load import Record
from lorafit.errors import DataError

# the fields that identify each format, in the order detection tries them
FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython")


def _known() -> str:
    return "; ".join(f"{name} ({', '.join(fields)})" for name, fields in FORMATS.items())


def detect_format(record: Record) -> str:
    """The first format whose identifying fields the record has; DataError naming the fields it has otherwise."""
    for name, fields in FORMATS.items():
        if all(f in record.data for f in fields):
            return name
    found = ", ".join(sorted(map(str, record.data))[:10]) or "none"
    raise DataError(f"{record.source}: cannot tell the record format from its fields ({found}); known formats: "
                    f"{_known()}. Rename the fields, or set data.format")


def _type_name(value) -> str:
    names = {type(None): "null", dict: "object", list: "list", str: "text"}
    return names.get(type(value), type(value).__name__)


def _valid_text(value: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\\ud800" escapes, but a lone surrogate is not text a tokenizer can take
        raise DataError(f"{where} holds an invalid \\u escape (a lone UTF-16 surrogate)") from None
    return value


def _text(record: Record, name: str, required: bool = True) -> str:
    value = record.data.get(name)
    if value is None:
        if required:
            raise DataError(f"{record.source}: missing field '{name}'" +
                            ("" if name in record.data else f" (fields: {', '.join(sorted(map(str, record.data)))})"))
        return ""
    if not isinstance(value, str):
        raise DataError(f"{record.source}: field '{name}' must be text, got {_type_name(value)}")
    return _valid_text(value, f"{record.source}: field '{name}'")


def _check_messages(record: Record) -> list[dict]:
    where = f"{record.source}: field 'messages'"
    if "messages" not in record.data:
        raise DataError(f"{record.source}: missing field 'messages'")
    messages = record.data["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where} must be a list of {{role, content}} objects, got {_type_name(messages)}")
    if not messages:
        raise DataError(f"{where} is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} must be an object with role and content, got {_type_name(m)}")
        role, content = m.get("role"), m.get("content")
        if role in TOOL_ROLES or m.get("tool_calls"):
            raise DataError(f"{where}: message {i} is a tool call or tool result; tool use is not supported yet "
                            "(keep only system, user and assistant messages)")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; roles must be system, user or assistant")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) content must be text, got {_type_name(content)}")
        out.append({"role": role, "content": _valid_text(content, f"{where}: message {i} content")})
    turns = out[1:] if out[0]["role"] == "system" else out
    offset = len(out) - len(turns)
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"{where}: message {i + offset} is {m['role']} where {expected} was expected; roles "
                            "must be an optional system message first, then user and assistant taking turns, "
                            "starting with user")
    if not any(m["role"] == "assistant" for m in turns):
        raise DataError(f"{where} has no assistant message, so there is nothing to learn")
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where} must end with an assistant message, got {turns[-1]['role']}")
    return out


def to_conversation(record: Record | dict, fmt: str, system_prompt: str | None = None) -> list[dict] | str:
    """The record as messages (or as plain text for `text`); the system prompt is added where the record has none."""
    if not isinstance(record, Record):
        record = Record("<record>", record)
    if fmt == "text":
        text = _text(record, "text")
        if not text:
            raise DataError(f"{record.source}: field 'text' is empty")
        return text
    if fmt == "messages":
        messages = _check_messages(record)
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text(record, "prompt")},
                    {"role": "assistant", "content": _text(record, "completion")}]
    elif fmt == "alpaca":
        instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
                    {"role": "assistant", "content": _text(record, "output")}]
    else:
        raise DataError(f"unknown data format {fmt!r}; known formats: {_known()}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
