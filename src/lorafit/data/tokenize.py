"""Conversations into token ids and labels through the tokenizer's own chat template.

Which tokens carry loss is decided on the rendered text, not guessed from token ids: the text between the render
of messages[:i] (with the generation prompt) and the render of messages[:i+1] is assistant turn i, end-of-turn
token included, so the model learns to stop. The full text is then tokenized once and each token is labelled by
where its characters lie, so the ids are exactly those the model sees at inference, and merges across a turn
boundary cannot shift the mask.
"""

from __future__ import annotations

import json

from jinja2 import TemplateError

from lorafit.data.example import IGNORE_INDEX
from lorafit.errors import DataError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + END + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template ChatML; a tokenizer that has one keeps it.

    Turns end with <|im_end|> when the vocabulary has it. Otherwise (a base model's tokenizer) they end with the
    EOS token instead: adding <|im_end|> would need a new embedding row, and ending on EOS makes generation stop.
    """
    if getattr(tokenizer, "chat_template", None):
        return
    vocab = tokenizer.get_vocab()
    end = "<|im_end|>" if "<|im_end|>" in vocab or not tokenizer.eos_token else tokenizer.eos_token
    tokenizer.chat_template = "{% set END = " + json.dumps(end) + " %}" + CHATML_TEMPLATE


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; call ensure_chat_template(tokenizer) first") from None
        raise DataError(f"the chat template refused the conversation: {e}") from None
    except (TemplateError, TypeError, KeyError) as e:  # a broken template, or raise_exception() inside it
        raise DataError(f"the chat template refused the conversation: {type(e).__name__}: {e}") from None


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn in it."""
    full = render(tokenizer, messages)
    eos = tokenizer.eos_token or None
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        after = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])
        if not (after.startswith(before) and full.startswith(after)):
            raise DataError(
                f"the chat template is not prefix-stable: rendering the first {i} messages does not give the start "
                "of the rendered conversation (templates that rewrite earlier turns, e.g. drop reasoning, do "
                "this), so assistant tokens cannot be located; set data.loss_on: all, or use a template "
                "that renders each turn the same way whatever follows")
        start, end = len(before), len(after)
        # the turn ends at its EOS (e.g. <|im_end|>): what the template adds after it (a newline) is never generated
        if eos and (cut := full.rfind(eos, start, end)) >= 0:
            end = cut + len(eos)
        spans.append((start, end))
    return full, spans


def _encode(tokenizer, text: str, **kwargs) -> dict:
    try:
        return tokenizer(text, add_special_tokens=False, **kwargs)
    except NotImplementedError:  # offsets need a fast (Rust) tokenizer
        raise DataError("labelling assistant tokens needs a fast tokenizer (tokenizer.json); "
                        "set data.loss_on: all to train on every token instead") from None


def label_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where its characters lie inside one of the (sorted) spans, IGNORE_INDEX elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        # a zero-width token counts where it sits; a token straddling a span edge belongs to neither side
        if spans[k][0] <= a < spans[k][1] and b <= spans[k][1]:
            labels[t] = ids[t]
    return labels


def tokenize_conversation(tokenizer, conversation: list[dict] | str,
                          loss_on: str = "assistant") -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels hold the token id where the token carries loss and IGNORE_INDEX elsewhere.

    A string is plain text: its tokens (with whatever BOS the tokenizer adds to raw text) then EOS, all with loss.
    """
    if isinstance(conversation, str):
        ids = list(tokenizer(conversation, add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return ids, list(ids)
    if loss_on == "all":
        ids = list(_encode(tokenizer, render(tokenizer, conversation))["input_ids"])
        return ids, list(ids)
    if loss_on != "assistant":
        raise DataError(f"data.loss_on must be assistant or all, got {loss_on!r}")
    text, spans = assistant_spans(tokenizer, conversation)
    encoded = _encode(tokenizer, text, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    return ids, label_spans(ids, encoded["offset_mapping"], spans)


def tokenize_prompt(tokenizer, conversation: list[dict]) -> list[int]:
    """Token ids of a conversation up to the start of the assistant's reply (for generation)."""
    return list(_encode(tokenizer, render(tokenizer, conversation, add_generation_prompt=True))["input_ids"])
