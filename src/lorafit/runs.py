"""`lorafit runs` and `lorafit compare`: what the runs under a folder did, read from what each one wrote.

A run folder holds run.json (config, base model, data fingerprints, versions, before/best/after scores; written at
the end) and metrics.jsonl (one row per logged step, evaluation rows with `eval/...` keys, warning rows from
lorafit.train.watch). A folder with metrics.jsonl but no run.json is a run that has not finished (or was killed).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from lorafit.errors import LorafitError

# the headline score of each built-in generation metric; other metrics show their first score
HEADLINE = {"json": "json_f1", "classification": "accuracy", "exact_match": "exact_match", "rouge": "rouge_l",
            "bleu": "bleu"}


@dataclass
class RunSummary:
    path: str
    name: str
    status: str  # finished, unfinished, or "unreadable: why"
    method: str | None = None
    model: str | None = None
    steps: int = 0
    final_train_loss: float | None = None
    best_train_loss: float | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    metric: str | None = None  # the headline evaluation metric, scored before training and after
    before: float | None = None
    after: float | None = None
    tokens_per_s: float | None = None  # median over logged steps
    warnings: dict = field(default_factory=dict)  # kind -> count
    date: str = ""


def read_run(path: str | Path) -> tuple[Path, dict | None, list[dict]]:
    """(run folder, run.json or None, metrics rows); `path` is a run folder or its run.json. Raises LorafitError."""
    folder = Path(path)
    if folder.name == "run.json" and folder.is_file():
        folder = folder.parent
    run_file, metrics_file = folder / "run.json", folder / "metrics.jsonl"
    if not folder.is_dir():
        raise LorafitError(f"{folder}: run folder not found")
    if not run_file.is_file() and not metrics_file.is_file():
        raise LorafitError(f"{folder}: not a lorafit run (no run.json or metrics.jsonl)")
    run = None
    if run_file.is_file():
        try:
            run = json.loads(run_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LorafitError(f"{run_file}: not valid JSON ({e})") from None
        if not isinstance(run, dict):
            raise LorafitError(f"{run_file}: expected an object, got {type(run).__name__}")
    rows = []
    if metrics_file.is_file():
        for line in metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill, as MetricsLog skips it
            if isinstance(row, dict):
                rows.append(row)
    return folder, run, rows


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def headline_metric(run: dict) -> str | None:
    """The score that says how good the model is: the first generation metric's headline, else val_loss."""
    after = run.get("metrics", {}).get("after", {})
    for name in run.get("config", {}).get("eval", {}).get("metrics", []):
        key = HEADLINE.get(name)
        if key in after:
            return key
        if key is None:  # a user metric: its first numeric score
            found = [k for k, v in after.items() if _num(v) is not None and not k.startswith("val_")]
            if found:
                return found[0]
    return "val_loss" if "val_loss" in after else None


def summarize_run(path: str | Path, root: str | Path | None = None) -> RunSummary:
    folder, run, rows = read_run(path)
    name = str(folder.relative_to(root)) if root and folder.is_relative_to(root) else str(folder)
    stamp_file = folder / "run.json" if run is not None else folder / "metrics.jsonl"
    date = datetime.fromtimestamp(stamp_file.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    losses = [(r["step"], r["loss"]) for r in rows if _num(r.get("loss")) is not None and "step" in r]
    val = [(r["step"], r["eval/val_loss"]) for r in rows if _num(r.get("eval/val_loss")) is not None]
    speeds = [r["tokens_per_s"] for r in rows if _num(r.get("tokens_per_s")) is not None]
    warnings: dict[str, int] = {}
    for r in rows:
        if "warning" in r:
            warnings[str(r["warning"])] = warnings.get(str(r["warning"]), 0) + 1
    summary = RunSummary(str(folder), name or ".", "finished" if run is not None else "unfinished", date=date,
                         steps=max((s for s, _ in losses), default=0), warnings=warnings,
                         final_train_loss=losses[-1][1] if losses else None,
                         best_train_loss=min(v for _, v in losses) if losses else None,
                         best_val_loss=min((v for s, v in val if s > 0), default=None),
                         tokens_per_s=statistics.median(speeds) if speeds else None)
    if run is None:
        return summary
    config = run.get("config", {})
    summary.method = config.get("method")
    summary.model = Path(run.get("base_model", {}).get("path") or config.get("model", {}).get("path") or "?").name
    summary.steps = run.get("steps", summary.steps)
    metrics = run.get("metrics", {})
    summary.final_val_loss = _num(metrics.get("after", {}).get("val_loss"))
    if summary.final_val_loss is not None:
        seen = [v for v in (summary.best_val_loss, summary.final_val_loss) if v is not None]
        summary.best_val_loss = min(seen)
    summary.metric = headline_metric(run)
    if summary.metric:
        summary.before = _num(metrics.get("before", {}).get(summary.metric))
        summary.after = _num(metrics.get("after", {}).get(summary.metric))
    return summary


def find_runs(folder: str | Path = "runs") -> list[RunSummary]:
    """Every run under a folder (the folder itself included), oldest first; unreadable ones say why."""
    root = Path(folder)
    if not root.is_dir():
        raise LorafitError(f"{root}: folder not found")
    folders = {p.parent for pattern in ("run.json", "metrics.jsonl") for p in root.rglob(pattern)}
    out = []
    for run_dir in sorted(folders):
        if "checkpoints" in run_dir.relative_to(root).parts:
            continue
        try:
            out.append(summarize_run(run_dir, root))
        except LorafitError as e:  # the folder is the row's name already; the message names the file in it
            reason = str(e).replace(f"{run_dir}/", "")
            out.append(RunSummary(str(run_dir), str(run_dir.relative_to(root)) or ".", f"unreadable: {reason}"))
    return sorted(out, key=lambda s: (s.date, s.name))


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def compare_runs(a: str | Path, b: str | Path) -> dict:
    """Differences between two runs: settings (config, data, base model, versions, device) and scores."""
    (folder_a, run_a, _), (folder_b, run_b, _) = read_run(a), read_run(b)
    for folder, run in ((folder_a, run_a), (folder_b, run_b)):
        if run is None:
            raise LorafitError(f"{folder}: run has not finished (no run.json); compare needs finished runs")
    settings = []
    for section in ("config", "data", "base_model", "versions", "device", "compute_dtype"):
        flat_a, flat_b = _flatten(run_a.get(section), f"{section}."), _flatten(run_b.get(section), f"{section}.")
        for key in dict.fromkeys([*flat_a, *flat_b]):
            if flat_a.get(key) != flat_b.get(key):
                settings.append([key, flat_a.get(key), flat_b.get(key)])
    summary_a, summary_b = summarize_run(folder_a), summarize_run(folder_b)
    scores = []
    for key in ("steps", "final_train_loss", "best_train_loss", "best_val_loss", "tokens_per_s"):
        scores.append(_score_row(key, getattr(summary_a, key), getattr(summary_b, key)))
    for phase in ("before", "best", "after"):
        phase_a, phase_b = run_a.get("metrics", {}).get(phase, {}), run_b.get("metrics", {}).get(phase, {})
        for key in dict.fromkeys([*phase_a, *phase_b]):
            if key != "step" and (_num(phase_a.get(key)) is not None or _num(phase_b.get(key)) is not None):
                scores.append(_score_row(f"{phase}/{key}", phase_a.get(key), phase_b.get(key)))
    return {"a": str(folder_a), "b": str(folder_b), "settings": settings, "scores": scores,
            "warnings": [summary_a.warnings, summary_b.warnings]}


def _score_row(key: str, a, b) -> list:
    a, b = _num(a), _num(b)
    return [key, a, b, b - a if a is not None and b is not None else None]


# --- output ------------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def print_runs(summaries: list[RunSummary], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not summaries:
        console.print("no runs found (a run folder has run.json or metrics.jsonl)")
        return
    table = Table(title="runs")
    for column in ("run", "method", "model", "steps", "train loss final/best", "val loss final/best",
                   "metric before -> after", "tokens/s", "warnings", "date"):
        table.add_column(column, overflow="fold")
    for s in summaries:
        if s.status.startswith("unreadable"):
            table.add_row(s.name, s.status, *[""] * 7, s.date)
            continue
        metric = f"{s.metric} {_fmt(s.before)} -> {_fmt(s.after)}" if s.metric else "-"
        warns = ", ".join(f"{k} {n}" for k, n in s.warnings.items()) or "-"
        table.add_row(s.name + ("" if s.status == "finished" else " (unfinished)"), s.method or "-", s.model or "-",
                      str(s.steps), f"{_fmt(s.final_train_loss)} / {_fmt(s.best_train_loss)}",
                      f"{_fmt(s.final_val_loss)} / {_fmt(s.best_val_loss)}", metric, _fmt(s.tokens_per_s), warns,
                      s.date)
    console.print(table)


def print_compare(diff: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"A: {diff['a']}\nB: {diff['b']}", highlight=False, markup=False)
    settings = Table(title="settings that differ")
    for column in ("setting", "A", "B"):
        settings.add_column(column, overflow="fold")
    for key, a, b in diff["settings"]:
        settings.add_row(key, _fmt(a), _fmt(b))
    console.print(settings if diff["settings"] else "settings: identical")
    scores = Table(title="scores")
    for column in ("metric", "A", "B", "B - A"):
        scores.add_column(column, justify="left" if column == "metric" else "right")
    for key, a, b, delta in diff["scores"]:
        scores.add_row(key, _fmt(a), _fmt(b), "-" if delta is None else f"{delta:+.4g}")
    console.print(scores)
    for label, warnings in zip("AB", diff["warnings"]):
        if warnings:
            console.print(f"warnings in {label}: " + ", ".join(f"{k} {n}" for k, n in warnings.items()))


def runs_as_json(summaries: list[RunSummary]) -> str:
    return json.dumps([asdict(s) for s in summaries], indent=1)
