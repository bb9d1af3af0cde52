"""Record formats into one shape: a conversation (list of role/content messages), or plain text.

Detected from the first record's fields, or set by `data.format`:
- messages:          {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
- prompt_completion: {"prompt": "...", "completion": "..."}            -> user, assistant
- alpaca:            {"instruction": "...", "input": "...", "output": "..."} -> user, assistant
- text:              {"text": "..."}                                   -> trained on every token
"""

from __future__ import annotations

from lorafit.errors import DataError

FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


def detect_format(record) -> str:
    data = record.data
    for name, fields in FORMATS.items():
        if all(f in data for f in fields):
            return name
    known = "; ".join(f"{n}: {', '.join(f)}" for n, f in FORMATS.items())
    raise DataError(f"{record.source}: unknown record format, fields {sorted(data)[:8]} (known formats: {known})")


def _text_field(record, name: str, required: bool = True) -> str:
    if name not in record.data or record.data[name] is None:
        if required:
            raise DataError(f"{record.source}: missing field '{name}'")
        return ""
    value = record.data[name]
    if not isinstance(value, str):
        raise DataError(f"{record.source}: field '{name}' must be text, got {type(value).__name__}")
    return value


def _check_messages(record, messages) -> list[dict]:
    if not isinstance(messages, list):
        raise DataError(f"{record.source}: field 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{record.source}: field 'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        where = f"{record.source}: field 'messages[{i}]'"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: role {role!r} is not system, user or assistant")
        if not isinstance(content, str):
            raise DataError(f"{where}: content must be text, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            index = i + (len(out) - len(turns))
            raise DataError(f"{record.source}: field 'messages[{index}]': roles out of order, expected {expected} "
                            f"(an optional system message, then user and assistant taking turns), got {m['role']}")
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError(f"{record.source}: field 'messages' must end with an assistant message")
    return out


def to_conversation(record, fmt: str, system_prompt: str | None = None) -> list[dict] | str:
    """The record as messages (or plain text for `text`), with the config's system prompt where none is given."""
    if fmt == "text":
        return _text_field(record, "text")
    if fmt == "messages":
        if "messages" not in record.data:
            raise DataError(f"{record.source}: missing field 'messages'")
        messages = _check_messages(record, record.data["messages"])
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text_field(record, "prompt")},
                    {"role": "assistant", "content": _text_field(record, "completion")}]
    elif fmt == "alpaca":
        instruction, extra = _text_field(record, "instruction"), _text_field(record, "input", required=False)
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                    {"role": "assistant", "content": _text_field(record, "output")}]
    else:
        raise DataError(f"unknown data format {fmt!r} (known: {', '.join(FORMATS)})")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages
