"""The curves of a run, drawn from metrics.jsonl with matplotlib's Agg renderer (no display, no pyplot state).

Each plot is a function of the log's rows that returns a Figure, or None when the run logged nothing for it (a CPU
run has no GPU memory; a run without generation metrics has no metric curves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError

COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777"]


@dataclass
class Plot:
    name: str  # file-name part: loss, metrics, lr, throughput, memory
    title: str
    path: Path  # the PNG written beside the report
    png: bytes


def _figure(title: str, ylabel: str):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LorafitError("lorafit report draws its plots with matplotlib: pip install matplotlib "
                           "(or pip install 'lorafit[report]')") from None
    fig = Figure(figsize=(7.2, 3.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "warning" not in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _dedupe(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """One point per step (the last): the final evaluation shares its step with the last training record."""
    last = dict(zip(steps, values))
    return list(last), list(last.values())


def loss_plot(rows: list[dict]):
    steps, loss = _series(rows, "loss")
    val_steps, val = _dedupe(*_series(rows, "eval/val_loss"))
    if not steps and not val_steps:
        return None
    fig, ax = _figure("Training and validation loss", "loss (per target token)")
    if steps:
        ax.plot(steps, loss, color=COLORS[0], linewidth=1.4, label="training loss")
    if val_steps:
        ax.plot(val_steps, val, color=COLORS[1], marker="o", linewidth=1.4, label="validation loss")
    for i, step in enumerate(r["step"] for r in rows if "warning" in r):
        ax.axvline(step, color=COLORS[4], linestyle=":", linewidth=1, label="warning" if i == 0 else None)
    ax.legend(frameon=False)
    return fig


def metric_plot(rows: list[dict]):
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k.startswith("eval/") and "val_loss" not in k and "perplexity" not in k]
    if not keys:
        return None
    fig, ax = _figure("Evaluation metrics (generated answers)", "score")
    for i, key in enumerate(keys):
        steps, values = _dedupe(*_series(rows, key))
        ax.plot(steps, values, color=COLORS[i % len(COLORS)], marker="o", linewidth=1.4, label=key[len("eval/"):])
    ax.legend(frameon=False, fontsize=8, ncol=2)
    return fig


def lr_plot(rows: list[dict]):
    steps, lr = _series(rows, "lr")
    if not steps:
        return None
    fig, ax = _figure("Learning rate", "learning rate")
    ax.plot(steps, lr, color=COLORS[3], linewidth=1.4)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def throughput_plot(rows: list[dict]):
    steps, speed = _series(rows, "tokens_per_s")
    if not steps:
        return None
    fig, ax = _figure("Throughput", "tokens / s")
    mean = sum(speed) / len(speed)
    ax.plot(steps, speed, color=COLORS[2], linewidth=1.2, label=f"per step (mean {mean:,.0f})")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False)
    return fig


def memory_plot(rows: list[dict]):
    series = [(key, label, _series(rows, key)) for key, label in
              (("gpu_mem_gb", "GPU (peak allocated)"), ("cpu_mem_gb", "CPU (peak resident)"))]
    series = [s for s in series if s[2][0]]
    if not series:
        return None
    fig, ax = _figure("Memory", "GiB")
    for i, (_, label, (steps, values)) in enumerate(series):
        ax.plot(steps, values, color=COLORS[(i + 5) % len(COLORS)], linewidth=1.4, label=label)
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False)
    return fig


PLOTS = [("loss", loss_plot), ("metrics", metric_plot), ("lr", lr_plot), ("throughput", throughput_plot),
         ("memory", memory_plot)]


def draw_plots(rows: list[dict], folder: Path, stem: str) -> list[Plot]:
    """Every plot the log has data for, written as FOLDER/STEM_NAME.png; the bytes are kept for embedding."""
    import io

    plots = []
    for name, draw in PLOTS:
        fig = draw(rows)
        if fig is None:
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        path = Path(folder) / f"{stem}_{name}.png"
        path.write_bytes(buffer.getvalue())
        plots.append(Plot(name, fig.axes[0].get_title(loc="left"), path, buffer.getvalue()))
    return plots
