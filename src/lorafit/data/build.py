"""From files to tokenized training and validation examples, with a report of what was cut, dropped or skipped."""

from __future__ import annotations

import random

from lorafit.config import DataConfig
from lorafit.data.example import IGNORE_INDEX, DataReport, Example
from lorafit.data.formats import detect_format, to_conversation
from lorafit.data.load import load_records
from lorafit.data.tokenize import tokenize_conversation
from lorafit.errors import DataError


def records_to_examples(records, cfg: DataConfig, tokenizer, report: DataReport) -> list[Example]:
    fmt = cfg.format if cfg.format != "auto" else detect_format(records[0])
    report.format = fmt
    examples = []
    for record in records:
        try:
            conversation = to_conversation(record, fmt, cfg.system_prompt)
        except DataError as e:
            if not cfg.skip_bad_examples:
                raise
            report.skipped_bad += 1
            if len(report.skipped_sources) < 20:
                report.skipped_sources.append(str(e))
            continue
        ids, labels = tokenize_conversation(tokenizer, conversation, cfg.loss_on)
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop":
                report.dropped_overlong += 1
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            report.truncated += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):
            report.no_target_tokens += 1  # nothing to learn (e.g. the answer was cut away)
            continue
        examples.append(Example(ids, labels, record.source))
    report.examples = len(examples)
    return examples


def build_examples(cfg: DataConfig, tokenizer, path: str) -> tuple[list[Example], DataReport]:
    report = DataReport()
    records = load_records(path, skip_bad=cfg.skip_bad_examples, report=report)
    examples = records_to_examples(records, cfg, tokenizer, report)
    if not examples:
        raise DataError(f"{path}: no usable examples ({report.records} records; {report.dropped_overlong} over "
                        f"max_length {cfg.max_length}, {report.skipped_bad} bad, {report.no_target_tokens} without "
                        "target tokens)")
    return examples, report


def build_datasets(cfg: DataConfig, tokenizer, seed: int):
    """(train, val, train_report, val_report): val from data.val, else a seeded val_ratio split of train."""
    if not cfg.train:
        raise DataError("data.train is not set: give a training file or folder")
    train, train_report = build_examples(cfg, tokenizer, cfg.train)
    if cfg.val:
        val, val_report = build_examples(cfg, tokenizer, cfg.val)
    elif cfg.val_ratio > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(train) * cfg.val_ratio))
        if n_val >= len(train):
            raise DataError(f"{cfg.train}: {len(train)} examples are too few to hold out val_ratio {cfg.val_ratio}")
        held = set(order[:n_val])
        val = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
        val_report = DataReport(examples=len(val), format=train_report.format)
        train_report.examples = len(train)
    else:
        val, val_report = [], DataReport()
    return train, val, train_report, val_report
