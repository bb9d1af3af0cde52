"""The unit every data path produces: one tokenized example with its loss mask."""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, system, padding), as torch's cross_entropy expects


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX where no loss
    source: str = ""  # "file:line", for messages that point the user at the record

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class DataReport:
    """What happened to the records on the way to examples; printed before training and kept in run.json."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    skipped_bad: int = 0
    no_target_tokens: int = 0
    format: str = ""
    skipped_sources: list[str] = field(default_factory=list)  # first few "file:line: reason", for the user
