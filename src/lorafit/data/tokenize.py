"""Conversations into token ids and labels through the tokenizer's chat template.

Which tokens carry loss is decided on the rendered text, not guessed from token ids: the text between the render
of messages[:i] (with the generation prompt) and the render of messages[:i+1] is assistant turn i, end-of-turn
token included (so the model learns to stop). The full text is tokenized once and each token is labelled by where
its characters lie, so merges across turn boundaries cannot shift the mask.
"""

from __future__ import annotations

from lorafit.data.example import IGNORE_INDEX
from lorafit.errors import DataError

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template ChatML (adding its tokens if missing); leave others alone."""
    if getattr(tokenizer, "chat_template", None):
        return
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHATML_TEMPLATE


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = render(tokenizer, messages[:i], add_generation_prompt=True)
        end_text = render(tokenizer, messages[: i + 1])
        if not full.startswith(start_text) or not full.startswith(end_text):
            raise DataError("the chat template does not render conversations prefix by prefix, so assistant turns "
                            "cannot be located; set data.loss_on: all or use a template that does")
        spans.append((len(start_text), len(end_text)))
    return full, spans


def tokenize_conversation(tokenizer, conversation: list[dict] | str, loss_on: str = "assistant"):
    """(input_ids, labels) with labels = IGNORE_INDEX on every token that carries no loss."""
    if isinstance(conversation, str):  # plain text: every token, then EOS
        ids = tokenizer(conversation, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids)
    text, spans = assistant_spans(tokenizer, conversation)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if loss_on == "all":
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        if end <= start:
            continue
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[t] = ids[t]
    return ids, labels


def tokenize_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to the assistant's turn (for generation)."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
