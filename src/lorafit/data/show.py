"""Terminal output of `lorafit data stats` and `lorafit data preview` (the numbers come from lorafit.data.inspect)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lorafit.data.inspect import DataStats, PreviewExample, plain_preview

BAR_WIDTH = 40
LOSS_STYLE, MASKED_STYLE = "bold green", "dim"


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def print_stats(stats: DataStats, console: Console | None = None) -> None:
    console = console or Console()
    say = lambda text, style=None: console.print(text, style=style, highlight=False, markup=False)  # noqa: E731
    say(f"{stats.path}: {stats.format}, max_length {stats.max_length} (overlong: {stats.overlong})")
    say(f"records {_n(stats.records)} -> training examples {_n(stats.examples)}: truncated {_n(stats.truncated)} "
        f"({_n(stats.tokens_cut)} tokens cut, {_n(stats.targets_cut)} of them loss tokens), dropped "
        f"{_n(stats.dropped_overlong)} over-long, {_n(stats.no_target_tokens)} without loss tokens, "
        f"{_n(stats.skipped_bad)} bad")
    for source in stats.skipped_sources:
        say(f"  skipped {source}", "yellow")
    if stats.lengths:
        s = stats.lengths
        say(f"tokens per record: min {_n(s['min'])}, median {_n(s['median'])}, p90 {_n(s['p90'])}, p99 "
            f"{_n(s['p99'])}, max {_n(s['max'])}, mean {_n(s['mean'])}; {_n(s['total'])} in all, "
            f"{_n(stats.target_tokens)} loss tokens kept")
    _histogram(stats, console)
    _duplicates(stats, say)
    if stats.roles:
        roles = ", ".join(f"{role} {_n(n)}" for role, n in stats.roles["messages"].items())
        turns = ", ".join(f"{k} turn{'s' * (int(k) != 1)}: {_n(v)}" for k, v in stats.roles["assistant_turns"].items())
        say(f"messages by role: {roles}; assistant turns per example: {turns}")
    if stats.labels:
        _labels(stats.labels, console)
    for hint in hints(stats):
        say(f"hint: {hint}", "yellow")


def _histogram(stats: DataStats, console: Console) -> None:
    if not stats.histogram:
        return
    top = max(row["count"] for row in stats.histogram) or 1
    table = Table(title="token length per record", box=None, show_header=False, pad_edge=False)
    for justify in ("right", "left", "right"):
        table.add_column(justify=justify)
    marked = False
    for row in stats.histogram:
        if row["over_max_length"] and not marked:
            table.add_row(Text(f"max_length {stats.max_length}", style="bold red"), Text("─" * BAR_WIDTH, "red"), "")
            marked = True
        span = f">= {row['lo']}" if row["hi"] is None else str(row["lo"]) if row["hi"] == row["lo"] + 1 else (
            f"{row['lo']}-{row['hi'] - 1}")
        bar = "█" * round(row["count"] / top * BAR_WIDTH) or ("▏" if row["count"] else "")
        style = "red" if row["over_max_length"] else "green"
        table.add_row(span, Text(bar, style), _n(row["count"]))
    if not marked:
        table.add_row(Text(f"max_length {stats.max_length}", style="bold green"), Text("(above every record)", "dim"),
                      "")
    console.print(table)


def _duplicates(stats: DataStats, say) -> None:
    exact, near = stats.exact_duplicates, stats.near_duplicates
    say(f"exact duplicates: {_n(exact['extra_copies'])} extra copies in {_n(exact['groups'])} groups")
    for group in exact["examples"]:
        say(f"  {' = '.join(group)}", "dim")
    say(f"near duplicates (word 3-gram Jaccard >= {near['threshold']}, system messages ignored): "
        f"{_n(near['extra_copies'])} extra copies in {_n(near['groups'])} groups")
    for group in near["examples"]:
        say(f"  {' ~ '.join(group)}", "dim")
    conflicts = stats.conflicting_answers
    if conflicts.get("prompts"):
        say(f"same prompt, different answers: {_n(conflicts['prompts'])} prompts", "yellow")
        for group in conflicts["examples"]:
            say(f"  {' / '.join(group)}", "dim")


def _labels(labels: dict, console: Console) -> None:
    total, top = sum(labels.values()), max(labels.values())
    table = Table(title=f"answers ({len(labels)} distinct: looks like classification)")
    for name in ("answer", "examples", "share", ""):
        table.add_column(name, justify="right" if name in ("examples", "share") else "left")
    for label, count in labels.items():
        table.add_row(Text(label[:60]), _n(count), f"{count / total:.1%}", "█" * round(count / top * 20))
    console.print(table)


def hints(stats: DataStats) -> list[str]:
    """What the numbers suggest doing, in the words of lorafit's settings."""
    out = []
    if stats.records and not stats.examples:
        out.append("no record would reach training: raise --max-length (data.max_length)")
    elif stats.truncated or stats.dropped_overlong:
        longest = stats.lengths.get("max", 0)
        out.append(f"{stats.truncated + stats.dropped_overlong} records are longer than max_length {stats.max_length} "
                   f"(longest {longest}): raise data.max_length, or shorten them")
    if stats.targets_cut:
        out.append(f"truncation cuts {stats.targets_cut} loss tokens: the model never sees those answers end")
    if stats.exact_duplicates.get("extra_copies") or stats.near_duplicates.get("extra_copies"):
        out.append("duplicates weigh their examples more and leak between train and validation splits: dedupe them")
    if stats.labels and len(stats.labels) > 1:
        counts = list(stats.labels.values())
        if max(counts) >= 3 * min(counts):
            out.append(f"answers are imbalanced ({max(counts)} vs {min(counts)}): a model can score well by "
                       "favouring the common ones; balance or weigh the data, and read per-label F1")
    return out


def print_preview(examples: list[PreviewExample], console: Console | None = None, plain: bool | None = None) -> None:
    """Each example through the chat template: loss tokens highlighted, masked ones dimmed. Without a terminal
    (or with plain=True) loss spans are marked ⟦ ⟧ instead, since colours would be lost."""
    console = console or Console()
    plain = not console.is_terminal if plain is None else plain
    if plain:
        console.print("loss-carrying tokens are inside ⟦ ⟧; the rest are masked (no loss)", highlight=False)
    else:
        console.print(Text.assemble(("loss-carrying tokens", LOSS_STYLE), " are highlighted; ",
                                    ("masked tokens", MASKED_STYLE), " are dimmed"))
    for ex in examples:
        targets = sum(b - a for a, b, _, loss in ex.segments if loss)
        title = (f"{ex.source}: {len(ex.input_ids)} tokens, {targets} carry loss"
                 + (" (truncated to max_length)" if ex.truncated else ""))
        console.rule(Text(title), style="dim")
        if plain:
            console.print(plain_preview(ex), highlight=False, markup=False, soft_wrap=True)
        else:
            text = Text()
            for _, _, piece, loss in ex.segments:
                text.append(piece, LOSS_STYLE if loss else MASKED_STYLE)
            console.print(text, soft_wrap=True)
