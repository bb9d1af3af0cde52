"""`lorafit report RUN_DIR`: one self-contained HTML page about a run (inline CSS, plots as base64 PNG, nothing
fetched from the network), with the plots also written beside it as PNG files.

What it reads from the run folder: run.json (resolved config, before/best/final scores, data, versions),
metrics.jsonl (per-step loss, learning rate, tokens/s, memory, evaluations, and training warnings) and
eval/before_predictions.jsonl and eval/after_predictions.jsonl (the base model's and the adapter's answers).
A run that has not finished (no run.json yet) still gets its curves.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

import yaml

from lorafit.errors import LorafitError
from lorafit.report.plots import draw_plots
from lorafit.train.progress import compare_columns

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827; margin: 0;
       background: #f3f4f6; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 0 0 12px; }
section { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
.sub { color: #6b7280; margin: 0; }
.facts { display: flex; flex-wrap: wrap; gap: 8px 24px; margin-top: 12px; }
.facts div span { color: #6b7280; display: block; font-size: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e5e7eb; vertical-align: top; }
th { background: #f9fafb; font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; }
.better { color: #15803d; font-weight: 600; } .worse { color: #b91c1c; font-weight: 600; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.plots figure { margin: 0; } .plots img { width: 100%; height: auto; border: 1px solid #f3f4f6; }
.answers td { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; white-space: pre-wrap;
              word-break: break-word; width: 25%; }
.answers td.hit { background: #f0fdf4; } .answers td.miss { background: #fef2f2; }
.warning { border-left: 4px solid #f59e0b; background: #fffbeb; padding: 8px 12px; margin: 8px 0; }
pre { background: #f9fafb; border: 1px solid #e5e7eb; padding: 12px; overflow-x: auto; font-size: 12px; }
#config { columns: 3 300px; }
.none { color: #6b7280; font-style: italic; }
"""


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return rows


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def answer_text(text) -> str:
    """An answer as the report shows it: trimmed, cut at 2,000 characters, and visible when empty."""
    text = str(text).strip()
    return (text[:2000] + " [...]" if len(text) > 2000 else text) or "(empty answer)"


def _header(run_dir: Path, run: dict, rows: list[dict]) -> str:
    cfg = run.get("config", {})
    train_report = run.get("data", {}).get("train_report", {})
    val_report = run.get("data", {}).get("val_report", {})
    steps = run.get("steps") or max((r.get("step", 0) for r in rows), default=0)
    speeds = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    facts = [("model", cfg.get("model", {}).get("path", "?")), ("method", cfg.get("method", "?")),
             ("device", run.get("device", "?")), ("steps", f"{steps}" + (" (stopped early)" if run.get("stopped_early")
                                                                          else "")),
             ("training examples", train_report.get("examples", "?")),
             ("validation examples", val_report.get("examples", "?")),
             ("final training loss", _num(run.get("final_train_loss"))),
             ("mean throughput", f"{sum(speeds) / len(speeds):,.0f} tokens/s" if speeds else "-")]
    state = "" if run else "<p class='sub'>run.json is not written yet: the run is unfinished or was stopped.</p>"
    return (f"<section><h1>lorafit run report</h1><p class='sub'>{escape(str(run_dir))}</p>{state}"
            "<div class='facts'>" + "".join(f"<div><span>{escape(k)}</span>{escape(str(v))}</div>" for k, v in facts)
            + "</div></section>")


def _metrics_table(run: dict) -> str:
    metrics = run.get("metrics", {})
    before, best, after = metrics.get("before", {}), metrics.get("best", {}), metrics.get("after", {})
    names, keys, values = compare_columns(before, best, after)
    if not keys:
        return "<section><h2>Evaluation</h2><p class='none'>no evaluation recorded</p></section>"
    has_change = bool(before) and bool(after)
    head = "".join(f"<th>{escape(n)}</th>" for n in ["metric", *names, *(["change"] if has_change else [])])
    body = []
    for key, row in zip(keys, values):
        cells = "".join(f"<td class='num'>{_num(v)}</td>" for v in row)
        if has_change:
            base, final = before.get(key), after.get(key)
            change = ""
            if isinstance(base, (int, float)) and isinstance(final, (int, float)):
                lower = "loss" in key or "perplexity" in key
                better = final < base if lower else final > base
                css = "better" if better else ("worse" if final != base else "")
                change = f"<span class='{css}'>{final - base:+.4g}</span>"
            cells += f"<td class='num'>{change}</td>"
        body.append(f"<tr><td>{escape(key)}</td>{cells}</tr>")
    return (f"<section><h2>Evaluation: base model, best, final</h2><table id='metrics'><tr>{head}</tr>"
            + "".join(body) + "</table>" + _confusions(before, after) + "</section>")


def _confusions(before: dict, after: dict) -> str:
    parts = []
    for name, scores in (("base model", before), ("fine-tuned", after)):
        pairs = scores.get("most_confused") or []
        if pairs:
            text = ", ".join(f"{g} &rarr; {p} ({n})" for g, p, n in
                             [(escape(str(g)), escape(str(p)), n) for g, p, n in pairs[:5]])
            parts.append(f"<p><b>most confused, {name}:</b> {text}</p>")
    return "".join(parts)


def _plots(plots) -> str:
    if not plots:
        return "<section><h2>Curves</h2><p class='none'>metrics.jsonl has no rows</p></section>"
    figures = "".join(
        f"<figure id='plot-{p.name}'><img alt='{escape(p.title)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.png).decode()}'></figure>" for p in plots)
    return f"<section><h2>Curves</h2><div class='plots'>{figures}</div></section>"


def _answers(run_dir: Path, samples: int) -> str:
    before = _read_jsonl(run_dir / "eval" / "before_predictions.jsonl")
    after = _read_jsonl(run_dir / "eval" / "after_predictions.jsonl")
    if not before and not after:
        return ("<section><h2>Answers</h2><p class='none'>no generated answers saved (set eval.metrics to compare "
                "the base model's and the fine-tuned model's answers)</p></section>")
    count = max(len(before), len(after))
    columns = [("base model", before), ("fine-tuned", after)]
    columns = [(name, preds) for name, preds in columns if preds]
    head = "".join(f"<th>{n}</th>" for n in ["input", "reference", *[name for name, _ in columns]])
    rows = []
    for i in range(min(samples, count)):
        first = (after or before)[i] if i < len(after or before) else {}
        cells = [f"<td>{escape(answer_text(first.get(key, '')))}</td>" for key in ("input", "reference")]
        for _, preds in columns:
            pred = preds[i] if i < len(preds) else {}
            text = str(pred.get("prediction", ""))
            hit = text.strip() == str(pred.get("reference", "")).strip()
            cells.append(f"<td class='{'hit' if hit else 'miss'}'>{escape(answer_text(text))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f"<section><h2>Answers on held-out inputs ({min(samples, count)} of {count})</h2>"
            "<p class='sub'>green: the answer equals the reference exactly</p>"
            f"<table class='answers' id='answers'><tr>{head}</tr>{''.join(rows)}</table></section>")


def _warnings(rows: list[dict]) -> str:
    found = [r for r in rows if "warning" in r]
    if not found:
        return "<section><h2>Warnings</h2><p class='none'>no warnings were logged during training</p></section>"
    items = "".join(f"<div class='warning'><b>step {r.get('step')}: {escape(str(r['warning']))}</b><br>"
                    f"{escape(str(r.get('message', '')))}</div>" for r in found)
    return f"<section id='warnings'><h2>Warnings ({len(found)})</h2>{items}</section>"


def _config(run: dict) -> str:
    if not run.get("config"):
        return ""
    text = yaml.safe_dump(run["config"], sort_keys=False, default_flow_style=False)
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items() if v)
    return (f"<section><h2>Resolved config</h2><pre id='config'>{escape(text)}</pre>"
            f"<p class='sub'>{escape(versions)}</p></section>")


def write_report(run_dir: str | Path, out: str | Path | None = None, samples: int = 10) -> Path:
    """Write RUN_DIR's report to OUT (default RUN_DIR/report.html) and its plots beside it as OUT-STEM_NAME.png;
    `samples` is how many held-out answers are shown side by side. Returns the HTML file's path."""
    run_dir = Path(run_dir)
    run_path, log_path = run_dir / "run.json", run_dir / "metrics.jsonl"
    if not run_path.is_file() and not log_path.is_file():
        raise LorafitError(f"{run_dir}: not a lorafit run folder (no run.json or metrics.jsonl)")
    run = json.loads(run_path.read_text(encoding="utf-8")) if run_path.is_file() else {}
    rows = _read_jsonl(log_path)
    out = Path(out) if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(rows, out.parent, out.stem)
    body = (_header(run_dir, run, rows) + _metrics_table(run) + _plots(plots) + _answers(run_dir, samples)
            + _warnings(rows) + _config(run))
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>lorafit report: "
            f"{escape(run_dir.name)}</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n")
    out.write_text(page, encoding="utf-8")
    return out
