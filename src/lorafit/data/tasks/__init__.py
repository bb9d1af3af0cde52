"""Synthetic fine-tuning tasks, generated from a seed with no network: small enough to train on a CPU in minutes.

Each task module has `generate(n, seed) -> list[dict]` (chat records: system, user, assistant) and `SYSTEM_PROMPT`.
`write_splits` turns a generator into train/test JSONL files whose test user messages never appear in train, so a
test score measures what was learned, not what was memorised.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

TASK_NAMES = ("medication", "intents")

# Test records come from seeds far from the train seed, so `seed=1`'s train set is not `seed=0`'s test set.
_TEST_SEED_STRIDE = 1_000_003
_MAX_TEST_ATTEMPTS = 50


def load_task(name: str) -> ModuleType:
    """The task module by name; imported on demand so that this package does not import its own children."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def chat_record(system: str, user: str, assistant: str) -> dict:
    return {"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]}


def user_text(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def split_without_overlap(generate: Callable[[int, int], list[dict]], n_train: int, n_test: int,
                          seed: int) -> tuple[list[dict], list[dict]]:
    """Train from `seed`; test from other seeds, dropping any record whose user text is in train or already in test."""
    train = generate(n_train, seed)
    seen = {user_text(r) for r in train}
    test: list[dict] = []
    for attempt in range(1, _MAX_TEST_ATTEMPTS + 1):
        if len(test) == n_test:
            break
        for record in generate(n_test, seed + attempt * _TEST_SEED_STRIDE):
            if user_text(record) not in seen and len(test) < n_test:
                seen.add(user_text(record))
                test.append(record)
    if len(test) == n_test:
        return train, test
    raise ValueError(f"found only {len(test)} of {n_test} test records unlike the {n_train} train records; "
                     "the task's templates are too few for these sizes")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_splits(generate: Callable[[int, int], list[dict]], folder: Path, name: str, n_train: int, n_test: int,
                 seed: int) -> tuple[Path, Path]:
    """Write `{name}_train.jsonl` and `{name}_test.jsonl` into `folder`; returns their paths."""
    train, test = split_without_overlap(generate, n_train, n_test, seed)
    folder = Path(folder)
    return write_jsonl(folder / f"{name}_train.jsonl", train), write_jsonl(folder / f"{name}_test.jsonl", test)
