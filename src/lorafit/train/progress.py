"""What the user sees while a run goes: a live bar on a terminal, plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# evaluation scores kept out of the one-line status: the table after each evaluation has them all
_DETAIL = ("perplexity", "precision", "recall", "valid_rate")


def compare_columns(before: dict, best: dict, after: dict) -> tuple[list[str], list[str], list[list]]:
    """(column names, metric names, values per metric) for base model, best evaluation and final adapter; a value
    is None where that evaluation lacks the metric. The terminal summary and `lorafit report` both use it."""
    columns = [("base model", before), (f"best (step {best.get('step')})", best), ("final", after)]
    columns = [(name, scores) for name, scores in columns if scores]
    keys = [k for k in dict.fromkeys([*before, *best, *after])
            if k != "step" and any(isinstance(s.get(k), (int, float)) for _, s in columns)]
    values = [[s.get(k) if isinstance(s.get(k), (int, float)) else None for _, s in columns] for k in keys]
    return [name for name, _ in columns], keys, values


class Progress:
    def __init__(self, console: Console | None = None, live: bool | None = None, quiet: bool = False):
        self.console = console or Console(stderr=False)
        # a live bar only when our output is a terminal; logs, CI and pipes get one plain line per step
        self.live = _is_terminal(self.console.file) if live is None else live
        self.quiet = quiet
        self._bar = None
        self.last_eval: dict = {}  # the latest evaluation's headline scores, shown with every step

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]lorafit[/dim] {text}", soft_wrap=not self.live)  # log lines stay whole

    def data_report(self, train, val) -> None:
        self.say(f"data: {train.examples} training examples ({train.format}), {val.examples} validation; "
                 f"truncated {train.truncated}, dropped {train.dropped_overlong} over-long, "
                 f"skipped {train.skipped_bad} bad")

    def scores(self, title: str, scores: dict) -> None:
        if self.quiet or not scores:
            return
        shown = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
        self.last_eval = {k: v for k, v in shown.items() if not any(d in k for d in _DETAIL)}
        self.say(f"{title}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def start(self, total: int, first: int) -> None:
        self.total, self.first, self.t0 = total, first, time.perf_counter()
        self.last_eval = {}
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
        info = (f"loss {record['loss']:.4f}" + "".join(f"  {k} {v:.4g}" for k, v in self.last_eval.items())
                + f"  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
                + (f"  gpu mem {record['gpu_mem_gb']:.1f} GB" if "gpu_mem_gb" in record else "")
                + (f"  cpu mem {record['cpu_mem_gb']:.1f} GB" if "cpu_mem_gb" in record and "gpu_mem_gb" not in record
                   else ""))
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], info=info)
        else:
            self.console.print(f"step {record['step']}/{self.total}  {info}  eta {_fmt_eta(eta)}", highlight=False,
                               soft_wrap=True)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def summary(self, before: dict, best: dict, after: dict) -> None:
        """Base model, best evaluation during training and final adapter, side by side."""
        names, keys, values = compare_columns(before, best, after)
        if self.quiet or not keys:
            return
        cell = lambda v: f"{v:.4g}" if v is not None else "-"  # noqa: E731
        self.table("evaluation", ["metric", *names], [[k] + [cell(v) for v in row] for k, row in zip(keys, values)])

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for r in rows:
            table.add_row(*r)
        self.console.print(table)
