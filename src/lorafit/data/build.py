"""From files to tokenized training and validation examples, with a report of what was cut, dropped or skipped.

Every record is accounted for: records = examples + skipped_bad + dropped_overlong + no_target_tokens
(truncated examples are still examples).
"""

from __future__ import annotations

import random
from pathlib import Path

from lorafit.config import DataConfig
from lorafit.data.example import IGNORE_INDEX, DataReport, Example
from lorafit.data.formats import detect_format, to_conversation
from lorafit.data.load import MAX_SKIP_REASONS, Record, load_records
from lorafit.data.tokenize import ensure_chat_template, tokenize_conversation
from lorafit.errors import DataError


def _skip(report: DataReport, error: DataError) -> None:
    report.skipped_bad += 1
    if len(report.skipped_sources) < MAX_SKIP_REASONS:
        report.skipped_sources.append(str(error))


def _pick_format(records: list[Record], cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if not cfg.skip_bad_examples:
        return detect_format(records[0])
    for record in records:  # when skipping bad records, a malformed first record should not decide the format
        try:
            return detect_format(record)
        except DataError:
            continue
    return detect_format(records[0])  # none is recognisable: raise the first record's error


def records_to_examples(records: list[Record], cfg: DataConfig, tokenizer, report: DataReport,
                        uncut: list[Example] | None = None) -> list[Example]:
    """Examples as training uses them; `uncut` (if given) also gets every tokenized record before the length rule
    and the target check, for `lorafit data stats` and `preview`."""
    fmt = report.format = _pick_format(records, cfg)
    examples = []
    for record in records:
        try:
            conversation = to_conversation(record, fmt, cfg.system_prompt)
        except DataError as e:
            if not cfg.skip_bad_examples:
                raise
            _skip(report, e)
            continue
        try:
            ids, labels = tokenize_conversation(tokenizer, conversation, cfg.loss_on)
        except DataError as e:  # a template problem: it would hit every record, so never skipped
            raise DataError(f"{record.source}: {e}") from None
        if uncut is not None:
            uncut.append(Example(ids, labels, record.source))
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop":
                report.dropped_overlong += 1
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            report.truncated += 1
        # the first token's label is never used (nothing predicts it), so it does not count as a target
        if all(label == IGNORE_INDEX for label in labels[1:]):
            report.no_target_tokens += 1
            continue
        examples.append(Example(ids, labels, record.source))
    report.examples = len(examples)
    return examples


def build_examples(cfg: DataConfig, tokenizer, path: str | Path | None = None) -> tuple[list[Example], DataReport]:
    """Examples from one file or folder (default: data.train) and the report of what happened to its records.

    Gives the tokenizer ChatML if it has no chat template (see ensure_chat_template).
    """
    path = path if path is not None else cfg.train
    if not path:
        raise DataError("data.train is not set: give a training file or folder")
    report = DataReport()
    records = load_records(path, skip_bad=cfg.skip_bad_examples, report=report)
    report.records = len(records) + report.skipped_bad
    if cfg.format != "text":
        ensure_chat_template(tokenizer)
    examples = records_to_examples(records, cfg, tokenizer, report)
    if not examples:
        raise DataError(f"{path}: no usable examples ({report.records} records: {report.skipped_bad} bad, "
                        f"{report.dropped_overlong} longer than max_length {cfg.max_length}, "
                        f"{report.no_target_tokens} without target tokens)")
    return examples, report


def split_validation(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded random `ratio` of the examples held out; both keep file order."""
    if ratio <= 0:
        return examples, []
    n_val = max(1, round(len(examples) * ratio))
    if n_val >= len(examples):
        raise DataError(f"{len(examples)} examples are too few to hold out val_ratio {ratio} and keep some to train")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def build_datasets(cfg: DataConfig, tokenizer, seed: int):
    """(train, val, train_report, val_report): val from data.val, else a seeded val_ratio split of train, else none."""
    train, train_report = build_examples(cfg, tokenizer, cfg.train)
    if cfg.val:
        val, val_report = build_examples(cfg, tokenizer, cfg.val)
    elif cfg.val_ratio > 0:
        try:
            train, val = split_validation(train, cfg.val_ratio, seed)
        except DataError as e:
            raise DataError(f"{cfg.train}: {e}") from None
        # the held-out examples leave the train report, so each report still adds up
        train_report.records -= len(val)
        train_report.examples = len(train)
        val_report = DataReport(records=len(val), examples=len(val), format=train_report.format)
    else:
        val, val_report = [], DataReport(format=train_report.format)
    return train, val, train_report, val_report
