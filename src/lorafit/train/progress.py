"""What the user sees while a run goes: a live bar on a terminal, plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, console: Console | None = None, live: bool | None = None, quiet: bool = False):
        self.console = console or Console(stderr=False)
        self.live = sys.stdout.isatty() if live is None else live
        self.quiet = quiet
        self._bar = None

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]lorafit[/dim] {text}")

    def data_report(self, train, val) -> None:
        self.say(f"data: {train.examples} training examples ({train.format}), {val.examples} validation; "
                 f"truncated {train.truncated}, dropped {train.dropped_overlong} over-long, "
                 f"skipped {train.skipped_bad} bad")

    def scores(self, title: str, scores: dict) -> None:
        if self.quiet or not scores:
            return
        shown = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
        self.say(f"{title}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def start(self, total: int, first: int) -> None:
        self.total, self.first, self.t0 = total, first, time.perf_counter()
        if self.live and not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=first, info="")

    def step(self, record: dict) -> None:
        if self.quiet:
            return
        done = record["step"] - self.first
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - record["step"])
        info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
                + (f"  {record['gpu_mem_gb']:.1f} GB" if "gpu_mem_gb" in record else ""))
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], info=info)
        else:
            self.console.print(f"step {record['step']}/{self.total}  {info}  eta {_fmt_eta(eta)}", highlight=False)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def summary(self, before: dict, best: dict, after: dict) -> None:
        """Base model, best evaluation during training and final adapter, side by side."""
        columns = [("base model", before), (f"best (step {best.get('step')})", best), ("final", after)]
        columns = [(name, scores) for name, scores in columns if scores]
        keys = [k for k in dict.fromkeys([*before, *best, *after])
                if k != "step" and any(isinstance(s.get(k), (int, float)) for _, s in columns)]
        if self.quiet or not keys:
            return
        cell = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        self.table("evaluation", ["metric"] + [n for n, _ in columns], [[k] + [cell(s.get(k)) for _, s in columns]
                                                                         for k in keys])

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for r in rows:
            table.add_row(*r)
        self.console.print(table)
