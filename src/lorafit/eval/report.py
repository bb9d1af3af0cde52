"""Scores for people: tables of metrics, and the confusions of a classifier."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_scores(scores: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="scores")
    table.add_column("metric")
    table.add_column("value")
    for key, value in scores.items():
        if isinstance(value, (int, float)):
            table.add_row(key, _cell(value))
    console.print(table)
    confused = scores.get("most_confused")
    if confused:
        console.print("most confused (gold -> predicted: count): "
                      + ", ".join(f"{g} -> {p}: {n}" for g, p, n in confused[:5]))


def compare_table(title: str, rows: list[tuple[str, str]], before: dict, after: dict,
                  console: Console | None = None) -> None:
    """Metric rows (key, label) for the base model and the fine-tuned one side by side."""
    console = console or Console()
    table = Table(title=title)
    for column in ("metric", "base model", "fine-tuned"):
        table.add_column(column)
    for key, label in rows:
        if key in before or key in after:
            table.add_row(label, _cell(before.get(key, "-")), _cell(after.get(key, "-")))
    console.print(table)
